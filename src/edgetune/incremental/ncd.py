"""The one-shot novel-class protocol of controllable forgetting, on features (no training).

Paramonov et al., ICASSP 2025 (arXiv 2501.15998); research notes §1.1 and §4.1. From one base model's features:
for each novel class and each of ``draws`` random supports of ``shots`` training examples, the class's prototype
is added beside the base prototypes (one novel class at a time, always from the same base model) and every gate
is evaluated on the base test set plus that class's test examples:

- vanilla (argmax over all prototypes): realised FOR and NCR;
- each rule x budget: the *a-priori* threshold, calibrated once on held-out base data before any novel class
  exists, and the realised FOR and NCR at it;
- each rule: the *oracle* read-off NCR@kFOR (k = 2 %, 5 %) on that episode's exact operating curve.

Figures are averaged over classes x draws (mean and sample std over episodes; per-class means are kept), and
each rule's curve is averaged at common thresholds (quantiles of its statistic on the base test set, pooled over
episodes, flagging 0 to 30 % of the base test examples, plus the a-priori thresholds), so the a-priori points lie
on the averaged curves.
``Acc_base^0`` (session 0) is the argmax over the base prototypes only. FOR is absolute (a fraction of base
test examples) unless ``relative``. Rates are fractions; the result is plain JSON-ready data.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edgetune.core.errors import ConfigError
from edgetune.incremental.gates import NoveltyGate, VanillaGate, check_budget, make_gate
from edgetune.incremental.metrics import ncr_at_for, sweep_parts
from edgetune.incremental.prototypes import check_feature_sets

__all__ = ["RULES", "ncd_protocol"]

#: the gated rules, in report order (vanilla is always reported too)
RULES = ("base-gate", "base-gate-or-vanilla", "novel-ball", "margin")

#: flagged fractions of base test examples at which the averaged curves are read: the region budgets live in
#: (FOR up to ~30 points), every quarter point
_LEVELS = np.linspace(0.0, 0.3, 121)


def ncd_protocol(base_protos: Tensor, val_z: Tensor, val_y: Tensor, base_test_z: Tensor, base_test_y: Tensor,
                 novel_train_z: Tensor, novel_train_y: Tensor, novel_test_z: Tensor, novel_test_y: Tensor, *,
                 budgets: Sequence[float] = (0.02, 0.05), rules: Sequence[str] = RULES, draws: int = 5,
                 shots: int = 1, seed: int = 0, oracle_at: Sequence[float] = (0.02, 0.05), relative: bool = False,
                 gate_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the one-shot novel-class protocol; see the module docstring.

    base_protos: ``(Cb, D)`` base prototypes, row = base class id. val_z / val_y: ``(Nv, D)`` / ``(Nv,)`` held-out
    base training data (calibration only). base_test_z / base_test_y: ``(Nb, D)`` / ``(Nb,)``. novel_train_* /
    novel_test_*: features and labels of the novel classes (any ids not among the base ones). Features are
    L2-normalized here (a no-op for unit rows). budgets / oracle_at: fractions. rules: gate names (``vanilla`` is
    always run). draws, shots: supports per class and examples per support, drawn with
    ``numpy.random.default_rng(seed)`` (same seed, same result). gate_options: extra
    :class:`~edgetune.incremental.gates.NoveltyGateConfig` options (``count``, ``max_pseudo``...;
    ``pseudo_shots`` defaults to ``shots``).

    Returns a dict: ``protocol`` (the settings and sizes), ``base_acc``, ``vanilla`` / ``rules`` (per rule:
    ``budgets`` -> threshold, FOR and NCR mean / std / per class; ``oracle`` -> NCR@kFOR; ``curve``), ``curves``
    (rule -> averaged ``[FOR, NCR]`` points), ``points`` (a-priori and vanilla ``[FOR, NCR]``) and ``summary``
    (flat figures).
    """
    if draws < 1 or shots < 1:
        raise ConfigError(f"draws={draws} and shots={shots} must both be at least 1")
    budgets = [check_budget(b) for b in budgets]
    ks = [float(k) for k in oracle_at]
    names = list(dict.fromkeys(r.lower() for r in rules if r.lower() != "vanilla"))
    protos = F.normalize(base_protos.float(), dim=1)
    n_base = len(protos)
    check_feature_sets(protos, (val_z, val_y, "calibration"), (base_test_z, base_test_y, "base test"),
                  (novel_train_z, novel_train_y, "novel training"), (novel_test_z, novel_test_y, "novel test"))
    bad = sorted({int(c) for c in base_test_y.tolist()} - set(range(n_base)))
    if bad:
        raise ConfigError(f"base test labels {bad[:10]} are not base classes (0-{n_base - 1}, the rows of "
                          "base_protos): the novel classes' test data goes in novel_test_z / novel_test_y")
    bad = sorted({int(c) for c in val_y.tolist()} - set(range(n_base)))
    if bad:
        raise ConfigError(f"a calibration set from the wrong classes: labels {bad[:10]} are not base classes "
                          f"(0-{n_base - 1}); the calibration set must be held-out BASE training data")
    classes = sorted({int(c) for c in novel_test_y.tolist()})
    clash = sorted(set(classes) & set(range(n_base)))
    if clash:
        raise ConfigError(f"novel classes {clash[:10]} share ids with base classes (0-{n_base - 1}): give the novel "
                          "classes their own labels")
    if not classes:
        raise ConfigError("no novel test examples: the protocol needs test examples of each novel class")
    train_rows = {c: np.flatnonzero(novel_train_y.cpu().numpy() == c) for c in classes}
    short = [f"class {c}: {len(r)}" for c, r in train_rows.items() if len(r) < shots]
    if short:
        raise ConfigError(f"shots={shots} but some novel classes have fewer training examples ({'; '.join(short[:5])})"
                          ": lower shots or give more training examples")

    options = {"pseudo_shots": shots, **(gate_options or {})}
    gates: dict[str, NoveltyGate] = {r: make_gate(r, budgets[0], **options) for r in names}
    vz = F.normalize(val_z.float(), dim=1)
    thresholds = {r: [float(g.calibrate(vz, val_y, protos, b)) for b in budgets] for r, g in gates.items()}

    bt = F.normalize(base_test_z.float(), dim=1)
    s_bt = bt @ protos.T  # (Nb, Cb)
    base_acc = float((s_bt.argmax(dim=1) == base_test_y.to(s_bt.device)).double().mean())

    # episodes: (class, novel prototype) for each class and draw
    rng = np.random.default_rng(seed)
    nz = F.normalize(novel_train_z.float(), dim=1)
    episodes: list[tuple[int, Tensor]] = []
    for c in classes:
        for _ in range(draws):
            pick = torch.as_tensor(rng.choice(train_rows[c], size=shots, replace=False), device=nz.device)
            episodes.append((c, F.normalize(nz[pick].mean(dim=0), dim=0)))
    tz = F.normalize(novel_test_z.float(), dim=1)
    test_of = {c: tz[novel_test_y.to(tz.device) == c] for c in classes}
    # every rule is a function of the best base score s_b and the novel one s_n, and with one novel class a flagged
    # novel example is always right: per class, s_b and what flagging each example costs in FOR / earns in NCR
    # are fixed; only the novel prototype's scores change between draws
    s_b_test = s_bt.max(dim=1).values  # (Nb,)
    cost_base = (s_bt.argmax(dim=1) == base_test_y.to(s_bt.device)).double() / len(bt)  # (Nb,)
    if relative:
        if base_acc == 0.0:
            raise ConfigError("relative forgetting divides by the base accuracy, which is 0 here: use relative=False")
        cost_base = cost_base / base_acc
    parts = {}
    for c in classes:
        n_c = len(test_of[c])
        parts[c] = (torch.cat([s_b_test, (test_of[c] @ protos.T).max(dim=1).values]),  # s_b (Nb + Nc,)
                    torch.cat([cost_base, cost_base.new_zeros(n_c)]),  # FOR cost (Nb + Nc,)
                    torch.cat([cost_base.new_zeros(len(bt)), cost_base.new_full((n_c,), 1.0 / n_c)]))  # NCR gain

    # common thresholds per rule: quantiles of its statistic on the base test set pooled over episodes
    grids = {}
    for r, g in gates.items():
        pooled = torch.cat([g.statistic_of(s_b_test, bt @ p).double() for _, p in episodes])
        pooled = pooled[torch.isfinite(pooled)]
        levels = torch.as_tensor(_LEVELS if g.flags_below else 1.0 - _LEVELS, dtype=torch.float64)
        grid = _quantiles(pooled, levels) if len(pooled) else torch.zeros(0, dtype=torch.float64)
        grids[r] = torch.unique(torch.cat([grid, torch.tensor(thresholds[r], dtype=torch.float64)]))

    vanilla = VanillaGate()
    van: list[tuple[float, float]] = []
    apriori: dict[str, list[list[tuple[float, float]]]] = {r: [[] for _ in budgets] for r in gates}
    oracle: dict[str, list[list[float | None]]] = {r: [[] for _ in ks] for r in gates}
    curve_sum = {r: torch.zeros(2, len(grids[r]), dtype=torch.float64) for r in gates}
    for c, p in episodes:
        s_b, cost, gain = parts[c]
        s_n = torch.cat([bt @ p, test_of[c] @ p])  # (Nb + Nc,) cosine to the novel prototype
        v = sweep_parts(vanilla, s_b, s_n, cost, gain).at([0.0])
        van.append((float(v.forgetting[0]), float(v.recall[0])))
        for r, g in gates.items():
            sweep = sweep_parts(g, s_b, s_n, cost, gain)
            for i, t in enumerate(thresholds[r]):
                pt = sweep.at([t])
                apriori[r][i].append((float(pt.forgetting[0]), float(pt.recall[0])))
            full = sweep.full()
            for i, k in enumerate(ks):
                oracle[r][i].append(ncr_at_for(full, k))
            on_grid = sweep.at(grids[r])  # ordered by flagged count; grids[r] ascends in natural units
            f, n = on_grid.forgetting, on_grid.recall
            curve_sum[r] += torch.stack([f, n] if g.flags_below else [f.flip(0), n.flip(0)])

    ep_class = [c for c, _ in episodes]
    result: dict[str, Any] = {
        "protocol": {"novel_classes": classes, "draws": draws, "shots": shots, "seed": seed, "budgets": budgets,
                     "rules": names, "oracle_at": ks, "relative": relative, "n_val": len(val_z),
                     "n_base_test": len(bt), "n_novel_test": len(tz), "n_episodes": len(episodes),
                     "gate_options": dict(options)},
        "base_acc": base_acc,
        "vanilla": _pair_stats(van, ep_class),
        "rules": {},
        "curves": {"vanilla": [list(_mean_pair(van))]},
        "points": {"vanilla": list(_mean_pair(van))},
    }
    summary: dict[str, float] = {"base_acc": base_acc, "vanilla_for": result["vanilla"]["for"],
                                 "vanilla_ncr": result["vanilla"]["ncr"]}
    for r in gates:
        key = r.replace("-", "_")
        per_budget = {}
        for i, b in enumerate(budgets):
            stats = {"threshold": thresholds[r][i], **_pair_stats(apriori[r][i], ep_class)}
            per_budget[f"{b:g}"] = stats
            result["points"][f"{r} {100 * b:g}%"] = [stats["for"], stats["ncr"]]
            summary[f"{key}_{100 * b:g}pct_for"] = stats["for"]
            summary[f"{key}_{100 * b:g}pct_ncr"] = stats["ncr"]
        orc = {}
        for i, k in enumerate(ks):
            name = f"ncr@{100 * k:g}for"
            orc[name] = _value_stats(oracle[r][i], ep_class)
            if orc[name]["mean"] is not None:
                summary[f"{key}_oracle_ncr_at_{100 * k:g}for"] = orc[name]["mean"]
        mean_curve = (curve_sum[r] / len(episodes)).tolist()
        result["rules"][r] = {"budgets": per_budget, "oracle": orc,
                              "curve": {"threshold": grids[r].tolist(), "for": mean_curve[0], "ncr": mean_curve[1]}}
        result["curves"][r] = [[f, n] for f, n in zip(mean_curve[0], mean_curve[1], strict=True)]
    result["summary"] = summary
    return result


def _quantiles(x: Tensor, levels: Tensor) -> Tensor:
    """Lower empirical quantiles of ``x`` at ``levels`` (any size, unlike ``torch.quantile``)."""
    xs = torch.sort(x).values
    idx = (levels * (len(xs) - 1)).floor().long().clamp(0, len(xs) - 1)
    return xs[idx]


def _mean_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return (statistics.fmean(f for f, _ in pairs), statistics.fmean(n for _, n in pairs))


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _pair_stats(pairs: list[tuple[float, float]], ep_class: list[int]) -> dict[str, Any]:
    """Mean, std over episodes and per-class means of (FOR, NCR) pairs."""
    fs, ns = [f for f, _ in pairs], [n for _, n in pairs]
    per: dict[str, dict[str, float]] = {}
    for c in dict.fromkeys(ep_class):
        sel = [i for i, e in enumerate(ep_class) if e == c]
        per[str(c)] = {"for": statistics.fmean(fs[i] for i in sel), "ncr": statistics.fmean(ns[i] for i in sel)}
    return {"for": statistics.fmean(fs), "for_std": _std(fs), "ncr": statistics.fmean(ns), "ncr_std": _std(ns),
            "per_class": per}


def _value_stats(values: list[float | None], ep_class: list[int]) -> dict[str, Any]:
    """Mean / std over the episodes where the value is defined, their count, and per-class means."""
    ok = [v for v in values if v is not None]
    per: dict[str, float | None] = {}
    for c in dict.fromkeys(ep_class):
        vs = [v for v, e in zip(values, ep_class, strict=True) if e == c and v is not None]
        per[str(c)] = statistics.fmean(vs) if vs else None
    mean = statistics.fmean(ok) if ok else None
    return {"mean": mean, "std": _std(ok) if ok else None, "n": len(ok), "per_class": per}
