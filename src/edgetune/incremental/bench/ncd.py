"""Bench suite ``incremental-ncd``: controllable forgetting on one-shot novel classes (Paramonov et al., ICASSP
2025), on a backbone trained on the base classes of digits (P1) or SynGlyph-100 (P2): each novel class alone from
one example (``draws`` supports each), gates calibrated a priori on held-out base images to each forgetting budget;
realised FOR and NCR per rule and budget, vanilla FOR / NCR, and the oracle NCR@2FOR / NCR@5FOR."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgetune.bench.harness import (
    DEFAULT_RESULTS_DIR,
    BenchContext,
    last_run_rows,
    register_suite,
    run_header,
)
from edgetune.data import DataConfig, load_dataset
from edgetune.incremental.bench.backbones import fit_backbone
from edgetune.incremental.bench.fscil import PROTOCOLS, QUICK, merge_options
from edgetune.incremental.features import Backbone
from edgetune.incremental.ncd import RULES, ncd_protocol
from edgetune.incremental.plots import plot_operating_curves
from edgetune.incremental.prototypes import class_sums, prototypes_from_sums

__all__: list[str] = []


def _features(name: str, p: dict[str, Any], seed: int, ctx: BenchContext) -> dict[str, Any]:
    base = list(range(p["base"]))
    model, opts = p["model"]
    net, _, summary = fit_backbone(DataConfig(**p["data"], classes=base, seed=0), model, opts, p["train"],
                                   seed=seed, device=ctx.device)
    full = load_dataset(DataConfig(**p["data"], seed=0))
    bb = Backbone(net, transform=full.transform, device=ctx.device)
    (ztr, ytr), (zte, yte), (zv, yv) = bb.extract(full.train), bb.extract(full.test), bb.extract(full.val)
    kb, kt, kv = ytr < len(base), yte < len(base), yv < len(base)
    protos = prototypes_from_sums(*class_sums(ztr[kb], ytr[kb], base)).float()
    return {"args": (protos, zv[kv], yv[kv], zte[kt], yte[kt], ztr[~kb], ytr[~kb], zte[~kt], yte[~kt]),
            "backbone_test_acc": summary.get("test_acc")}


def table(csv_path: Path) -> str:
    run = last_run_rows(csv_path)
    if not run:
        return ""
    lines = [(f"{run_header(run[0])}; one novel class at a time from {run[0]['shots']} example(s), "
              f"{run[0]['draws']} draws per class; mean +/- std over "
              f"backbone seeds {sorted({r['backbone_seed'] for r in run})}; FOR and NCR in points."), "",
             "| protocol | rule | budget | realised FOR | NCR | oracle NCR@budget | calibration samples |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for r in run:
        groups.setdefault((r["protocol"], r["rule"], r["budget"]), []).append(r)

    def cell(rs: list[dict[str, str]], k: str) -> str:
        vals = [100 * float(r[k]) for r in rs if r.get(k) not in (None, "")]
        if not vals:
            return ""
        return f"{statistics.fmean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")

    for (proto, rule, budget), rs in groups.items():
        b = f"{100 * float(budget):g}%" if budget else "-"
        lines.append(f"| {proto} | {rule} | {b} | {cell(rs, 'for')} | {cell(rs, 'ncr')} | {cell(rs, 'oracle_ncr')} | "
                     f"{rs[0]['calibration_samples']} |")
    return "\n".join(lines) + "\n"


@register_suite("incremental-ncd", "controllable forgetting: one-shot novel classes, novelty gates calibrated a "
                "priori to forgetting budgets (digits, SynGlyph-100)",
                options={"protocols": "comma-separated subset of digits,synglyph (default both)",
                         "seeds": "backbone seeds (default 2; 1 when quick)",
                         "draws": "supports per novel class (default 5; 2 when quick)",
                         "plot_dir": "where the FOR-NCR plots go (default bench/results; quick: the scratch folder)"},
                table=table)
def ncd_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    names = str(ctx.option("protocols", "digits,synglyph")).split(",")
    seeds = int(ctx.option("seeds", 1 if ctx.quick else 2))
    draws = int(ctx.option("draws", 2 if ctx.quick else 5))
    budgets = (0.02, 0.05)
    for name in names:
        p = merge_options(PROTOCOLS[name], QUICK.get(name, {})) if ctx.quick else PROTOCOLS[name]
        for seed in range(seeds):
            f = _features(name, p, seed, ctx)
            res = ncd_protocol(*f["args"], budgets=budgets, rules=RULES, draws=draws, shots=1, seed=seed)
            common = {"protocol": name, "backbone_seed": seed, "draws": draws, "shots": 1,
                      "novel_classes": len(res["protocol"]["novel_classes"]),
                      "calibration_samples": res["protocol"]["n_val"], "base_acc": res["base_acc"],
                      "backbone_test_acc": f["backbone_test_acc"]}
            yield {**common, "rule": "vanilla", "budget": None, "for": res["vanilla"]["for"],
                   "ncr": res["vanilla"]["ncr"]}
            for rule, r in res["rules"].items():
                for b in budgets:
                    stats = r["budgets"][f"{b:g}"]
                    oracle = r["oracle"].get(f"ncr@{100 * b:g}for", {}).get("mean")
                    yield {**common, "rule": rule, "budget": b, "for": stats["for"], "ncr": stats["ncr"],
                           "for_std_episodes": stats.get("for_std"), "ncr_std_episodes": stats.get("ncr_std"),
                           "threshold": stats["threshold"], "oracle_ncr": oracle}
            if seed == 0:
                plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if ctx.quick else DEFAULT_RESULTS_DIR))
                curves = {k: [tuple(pt) for pt in v] for k, v in res["curves"].items() if k != "vanilla"}
                points = {k: tuple(v) for k, v in res["points"].items()}
                plot_operating_curves(curves, plot_dir / f"incremental-ncd-{name}.png",
                                      f"{name}: one-shot novel class, FOR vs NCR (seed 0)", points)
