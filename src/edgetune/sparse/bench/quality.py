"""``sparse-quality`` suite: the paper's claim at our scale, one (method, seed) run per row.

Runs a recipe (default ``sparse/fmnist-mlp-1pct``) with ``sparse.method`` set to each method (``dense``
drops the sparse section) and each seed, and yields test accuracy, active-neuron fraction, density and
wall time. Each call may run a slice (``methods=[chts] seeds=[0]``): rows append to the CSV, and
:func:`quality_table` turns every row of the CSV into the mean +- std table of the report.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from edgetune.bench.harness import BenchContext, register_suite
from edgetune.core.state import atomic_write_json
from edgetune.sparse.bench.quality_plot import plot_quality_runs, read_curves

__all__ = ["ALL_METHODS", "quality_table"]

log = logging.getLogger(__name__)
ALL_METHODS = ("dense", "static", "set", "rigl", "cht", "chts", "chtss")


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@register_suite("sparse-quality", summary="dense vs static/SET/RigL/CHT/CHTs/CHTss: accuracy, active neurons, time",
                options={"recipe": "recipe to run (default sparse/fmnist-mlp-1pct)",
                         "methods": "list of methods (dense = no sparse section)", "seeds": "list of seeds",
                         "epochs": "override train.epochs", "density": "override sparse.density",
                         "set": "extra key=value overrides (list)"},
                table=lambda path: quality_table(path))
def _sparse_quality(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    from edgetune.recipe import load_recipe
    from edgetune.runner import run

    recipe = ctx.option("recipe", "sparse/fmnist-mlp-1pct")
    methods = _as_list(ctx.option("methods", ["dense", "set", "chts"] if ctx.quick else list(ALL_METHODS)))
    seeds = _as_list(ctx.option("seeds", [0] if ctx.quick else [0, 1, 2]))
    extra = ["data.name=digits", "model.widths=[256,256,256]", "sparse.density=0.1", "train.epochs=8"] if ctx.quick else []
    extra += [str(x) for x in _as_list(ctx.option("set", []))]
    if ctx.option("epochs") is not None:
        extra.append(f"train.epochs={ctx.option('epochs')}")
    if ctx.option("density") is not None:
        extra.append(f"sparse.density={ctx.option('density')}")
    runs = Path(ctx.out_dir)
    for method in methods:
        for seed in seeds:
            over = [*extra, f"seed={seed}", "train.progress=false", f"output_dir={runs}"]
            over.append("sparse=null" if method == "dense" else f"sparse.method={method}")
            cfg = load_recipe(recipe, over)
            run_dir = runs / _run_name(cfg.name, cfg.train.epochs, method, seed, extra)
            again = _has_checkpoint(run_dir)
            log.info("sparse-quality: %s seed %s%s", method, seed, f" (resuming {run_dir})" if again else "")
            res = run(cfg, run_dir, resume=again, write_report=False,
                      command=f"edgetune bench sparse-quality {method} {seed}")
            atomic_write_json(run_dir / "bench-row.json", {"method": method, "seed": seed, "settings": _settings(extra)})
            plot_quality_runs(runs, runs / "curves.png", title=f"{recipe}: {cfg.train.epochs} epochs")
            s = res.summary
            mm = s.get("method_metrics", {})
            yield {"recipe": recipe, "method": method, "run_seed": seed, "dataset": s.get("dataset"),
                   "epochs": cfg.train.epochs, "density": mm.get("sparse_density", 1.0),
                   "test_acc": s.get("test_acc"), "active_neurons": mm.get("sparse_active_neurons", 1.0),
                   "wall_time_s": s.get("wall_time_s"), "steps": s.get("steps"), "nonzeros": s.get("nonzeros"),
                   "parameters": s.get("parameters"), "overrides": " ".join(extra),
                   "torch_threads": cfg.train.num_threads or torch.get_num_threads(),
                   "topology_updates": int(mm["sparse_updates"]) if "sparse_updates" in mm else None,
                   "best_test_acc_late": _best_late(run_dir, cfg)}


def _best_late(run_dir: Path, cfg: Any) -> float | None:
    """Best per-epoch test accuracy once topology updates have stopped (epoch >= stop_fraction * epochs).

    The figure the official CHT code reports ("best epoch after T_end"). It is selected on the test set,
    so it is optimistic; ``test_acc`` (last epoch) is the honest one. None when the run evaluated no test split.
    """
    from edgetune.sparse.config import SparseConfig

    sparse = getattr(cfg, "sparse", None)
    stop = sparse.stop_fraction if sparse is not None else SparseConfig.model_fields["stop_fraction"].default
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    first = math.ceil(stop * cfg.train.epochs)
    accs = [a for epoch, a in read_curves(path)[0] if epoch >= first]
    return max(accs) if accs else None


def _run_name(name: str, epochs: int, method: str, seed: int, overrides: list[str]) -> str:
    """Folder of one row's run; rows with other settings (overrides besides epochs) get other folders."""
    settings = _settings(overrides, keep_density=True)
    tag = f"-{hashlib.sha1(settings.encode()).hexdigest()[:8]}" if settings else ""
    return f"{name}-e{epochs}-{method}-s{seed}{tag}"


def _has_checkpoint(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a committed checkpoint of an unfinished run (resume it, do not restart)."""
    return (run_dir / "config.yaml").is_file() and any((run_dir / "checkpoints").glob("*.json"))


def _settings(overrides: str | list[str], keep_density: bool = False) -> str:
    """The overrides of a row that change the method's setting (epochs and density have their own columns)."""
    items = overrides.split() if isinstance(overrides, str) else overrides
    drop = ("train.epochs=",) if keep_density else ("train.epochs=", "sparse.density=")
    return " ".join(o for o in items if not o.startswith(drop))


def _mean_std(rows: list[dict[str, str]], key: str) -> str:
    """``mean ± std`` of column ``key`` over ``rows`` (count in brackets when some rows lack it; – when all do)."""
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    if not vals:
        return "–"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.4f} ± {sd:.4f}" + (f" ({len(vals)})" if len(vals) != len(rows) else "")


def quality_table(csv_path: str | Path, recipe: str | None = None) -> str:
    """Markdown table (mean +- std over seeds) of every row in a sparse-quality CSV.

    Rows group by recipe, data, epochs, settings, method and number of topology updates (rows written
    before that column existed show ``–``; since the updates stop before ``T_end``, as the official code's,
    a 100-epoch CHT run has 74 where older ones had 75)."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if recipe is None or r["recipe"] == recipe]
    groups: dict[tuple[str, str, str, str, str, str], list[dict[str, str]]] = {}
    for r in rows:
        key = (r["recipe"], r["dataset"], r["epochs"], _settings(r.get("overrides", "")), r["method"],
               r.get("topology_updates") or "")
        groups.setdefault(key, []).append(r)
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    lines = [("| recipe | data | epochs | settings | method | updates | seeds | test acc (mean ± std) | "
              "active neurons | density | wall time (s) | best test acc after T_end |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (rec, data, ep, extra, method, ups), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][:4], order.get(kv[0][4], 99), kv[0][5])):
        act = statistics.mean(float(r["active_neurons"]) for r in rs)
        wall = statistics.mean(float(r["wall_time_s"]) for r in rs)
        lines.append(f"| {rec} | {data} | {ep} | {extra or 'recipe'} | {method} | {ups or '–'} | {len(rs)} | "
                     f"{_mean_std(rs, 'test_acc')} | {act:.3f} | {float(rs[0]['density']):.4f} | {wall:.0f} | "
                     f"{_mean_std(rs, 'best_test_acc_late')} |")
    return "\n".join(lines) + "\n"
