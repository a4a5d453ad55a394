"""Metrics of few-shot class-incremental learning and of controllable forgetting (FOR, NCR, NCR@kFOR).

Session metrics (FSCIL): top-1 accuracy over all seen classes, on base and on novel classes' examples, their
harmonic mean, and the performance drop from the base session to the last one.

Controllable forgetting (Paramonov et al., ICASSP 2025, arXiv 2501.15998; research notes §1.1):

- ``Acc_base^0``: accuracy on the base test images predicting over the base prototypes only;
  ``Acc_base^t``: on the same images after session ``t``, over all seen classes.
- ``FOR_t = Acc_base^0 - Acc_base^t`` as a fraction (0.02 = 2 points); ``relative=True`` gives
  ``FOR_t / Acc_base^0`` instead (the paper's normalisation is not confirmed, [X]: absolute is the default).
- ``NCR_t``: fraction of the novel classes' test images predicted with their label, over all seen classes.
- The operating curve sweeps a gate's threshold and records (FOR, NCR); ``NCR@kFOR`` is the best NCR with
  ``FOR <= k`` on it (the *oracle* read-off; the *a-priori* figures are realised FOR and NCR at the threshold a
  gate calibrated on base data, see :mod:`edgetune.incremental.ncd`).

All rates are fractions in [0, 1]; functions take ``(N,)`` int tensors of predicted and true class ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgetune.core.errors import ConfigError, DataError, ShapeError
from edgetune.incremental.gates import NoveltyGate, split_scores

__all__ = [
    "CurveSweep",
    "OperatingCurve",
    "curve_sweep",
    "forgetting",
    "ncr_at_for",
    "novel_class_recall",
    "operating_curve",
    "performance_drop",
    "session_accuracy",
    "sweep_parts",
]


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.ndim != 1 or target.ndim != 1 or len(pred) != len(target):
        raise ShapeError(f"predictions and targets must both be (N,), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if len(target) == 0:
        raise DataError("no test examples: the metrics need at least one")


def _isin(target: Tensor, classes: Sequence[int] | Tensor) -> Tensor:
    return torch.isin(target, torch.as_tensor(list(classes) if not isinstance(classes, Tensor) else classes,
                                              dtype=target.dtype, device=target.device))


def session_accuracy(pred: Tensor, target: Tensor, base_classes: Sequence[int] | Tensor) -> dict[str, float | None]:
    """Accuracy over all examples (``acc``), over base-class and other (novel) examples (``base_acc``,
    ``novel_acc``: None when no example of that kind) and their harmonic mean ``hm`` (None unless both exist).

    pred / target: ``(N,)`` class ids; base_classes: the base session's class ids.
    """
    _check_pair(pred, target)
    correct = (pred == target).double()
    is_base = _isin(target, base_classes)
    base = float(correct[is_base].mean()) if bool(is_base.any()) else None
    novel = float(correct[~is_base].mean()) if bool((~is_base).any()) else None
    hm = None
    if base is not None and novel is not None:
        hm = 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
    return {"acc": float(correct.mean()), "base_acc": base, "novel_acc": novel, "hm": hm}


def forgetting(base_acc_0: float, base_acc_t: float, relative: bool = False) -> float:
    """FOR: base accuracy lost since the base session, ``a0 - at`` (fractions), or ``(a0 - at) / a0`` when
    ``relative``. Negative when base accuracy rose."""
    for name, a in (("base_acc_0", base_acc_0), ("base_acc_t", base_acc_t)):
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"{name}={a} is not an accuracy fraction in [0, 1] (give 0.95, not 95)")
    if relative:
        if base_acc_0 == 0.0:
            raise ConfigError("relative forgetting divides by the base session's accuracy, which is 0 here: use "
                              "relative=False")
        return (base_acc_0 - base_acc_t) / base_acc_0
    return base_acc_0 - base_acc_t


def novel_class_recall(pred: Tensor, target: Tensor, novel_classes: Sequence[int] | Tensor) -> float:
    """NCR: fraction of the examples of ``novel_classes`` predicted with their label. pred / target ``(N,)``."""
    _check_pair(pred, target)
    mask = _isin(target, novel_classes)
    if not bool(mask.any()):
        raise DataError(f"no test example of the novel classes {list(novel_classes)[:10]}: novel-class recall "
                        "needs their test examples")
    return float((pred[mask] == target[mask]).double().mean())


def performance_drop(accs: Sequence[float]) -> float:
    """PD: accuracy of the first (base) session minus that of the last one."""
    if len(accs) == 0:
        raise ConfigError("performance_drop needs the accuracy of at least one session")
    return float(accs[0]) - float(accs[-1])


@dataclass(frozen=True)
class OperatingCurve:
    """A gate's threshold sweep: ``threshold``, ``forgetting`` (FOR) and ``recall`` (NCR), each ``(M,)``,
    ordered from the threshold that flags the fewest samples to the one that flags the most."""

    threshold: Tensor
    forgetting: Tensor
    recall: Tensor

    def pairs(self) -> list[tuple[float, float]]:
        """``[(FOR, NCR), ...]`` as floats."""
        return [(float(f), float(r)) for f, r in zip(self.forgetting.tolist(), self.recall.tolist(), strict=True)]


@dataclass(frozen=True)
class CurveSweep:
    """One sorted sweep of a gate over a test set, read at any thresholds (:func:`curve_sweep`).

    ``u (M,)``: the gate's statistic of the examples not always flagged, oriented so that an example is flagged
    iff ``u < threshold`` and sorted; ``cum_for`` / ``cum_ncr (M + 1,)``: FOR and NCR earned by flagging the first
    ``i`` of them; ``const_for`` / ``const_ncr``: those of the examples flagged whatever the threshold.
    """

    flags_below: bool
    u: Tensor
    cum_for: Tensor
    cum_ncr: Tensor
    const_for: float
    const_ncr: float
    dtype: torch.dtype = torch.float64

    def at(self, thresholds: Tensor | Sequence[float]) -> OperatingCurve:
        """The curve at ``thresholds`` (the gate's natural units), ordered from fewest to most flagged. Thresholds
        are rounded to the statistic's dtype first, as a comparison in :meth:`NoveltyGate.predict` rounds them."""
        th = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1).to(self.dtype).double()
        return self._read(torch.sort(th if self.flags_below else -th).values)

    def full(self) -> OperatingCurve:
        """The whole curve: nothing flagged, then each distinct statistic value in turn (midpoint thresholds)."""
        vals = torch.unique(self.u)  # sorted
        if len(vals) == 0:
            return self._read(torch.zeros(1, dtype=torch.float64, device=self.u.device))
        return self._read(torch.cat([vals[:1] - 1.0, (vals[1:] + vals[:-1]) / 2, vals[-1:] + 1.0]))

    def _read(self, th_u: Tensor) -> OperatingCurve:
        """Points at ascending thresholds in u's orientation (flagged iff ``u < threshold``)."""
        th_u = th_u.to(self.u.device)
        count = torch.searchsorted(self.u, th_u, side="left")  # examples with u < threshold
        natural = th_u if self.flags_below else -th_u
        return OperatingCurve(natural.cpu(), (self.const_for + self.cum_for[count]).cpu(),
                              (self.const_ncr + self.cum_ncr[count]).cpu())


def curve_sweep(gate: NoveltyGate, scores: Tensor, is_base: Tensor, target: Tensor, *,
                relative: bool = False) -> CurveSweep:
    """Sort ``gate``'s statistic once so that FOR and NCR can be read exactly at any threshold.

    scores: ``(N, C)`` cosine scores of base and novel test examples to all prototypes; is_base: ``(C,)`` bool;
    target: ``(N,)`` true class ids (= columns). FOR counts base examples the base prototypes alone classify
    correctly and the gate flags (a flagged base example goes to a novel class: lost); NCR counts novel examples
    the gate flags and the novel prototypes classify correctly.
    """
    if target.ndim != 1 or scores.ndim != 2 or len(scores) != len(target):
        raise ShapeError(f"scores must be (N, C) with targets (N,), got {tuple(scores.shape)} and "
                         f"{tuple(target.shape)}")
    s_b, base_arg, s_n, novel_arg = split_scores(scores, is_base)
    if not bool((~is_base).any()):
        raise ConfigError("the operating curve needs at least one novel prototype (is_base is all True)")
    t = target.to(base_arg.device).long()
    if len(t) == 0 or int(t.min()) < 0 or int(t.max()) >= len(is_base):
        span = f"{int(t.min())}..{int(t.max())}" if len(t) else "none"
        raise ShapeError(f"target class ids must index the {len(is_base)} score columns, got {span}")
    base_ex = is_base[t]
    n_base, n_novel = int(base_ex.sum()), int((~base_ex).sum())
    if n_base == 0 or n_novel == 0:
        raise DataError(f"the operating curve needs test examples of base and of novel classes, got {n_base} "
                        f"base and {n_novel} novel")
    scale = 1.0 / n_base
    if relative:
        acc0 = float((base_arg[base_ex] == t[base_ex]).double().mean())
        if acc0 == 0.0:
            raise ConfigError("relative forgetting divides by the base accuracy, which is 0 here: use relative=False")
        scale /= acc0
    cost = (base_ex & (base_arg == t)).double() * scale
    gain = (~base_ex & (novel_arg == t)).double() / n_novel
    return sweep_parts(gate, s_b, s_n, cost, gain)


def sweep_parts(gate: NoveltyGate, s_b: Tensor, s_n: Tensor, cost: Tensor, gain: Tensor) -> CurveSweep:
    """The sweep of :func:`curve_sweep` from its parts, all ``(N,)``: best base and novel scores, and what flagging
    each example costs in FOR (a correctly classified base example: ``1 / N_base``) and earns in NCR (a novel
    example its novel prototypes classify correctly: ``1 / N_novel``). For callers that reuse scores."""
    raw = gate.statistic_of(s_b, s_n)
    stat = raw.double()
    u = stat if gate.flags_below else -stat  # flagged iff u < threshold (in u's orientation)
    always = gate.always_of(s_b, s_n)
    keep = ~always & torch.isfinite(u)
    u, order = torch.sort(u[keep])
    zero = u.new_zeros(1)
    cost, gain = cost.double(), gain.double()
    return CurveSweep(gate.flags_below, u, torch.cat([zero, torch.cumsum(cost[keep][order], 0)]),
                      torch.cat([zero, torch.cumsum(gain[keep][order], 0)]), float(cost[always].sum()),
                      float(gain[always].sum()), raw.dtype if raw.is_floating_point() else torch.float64)


def operating_curve(gate: NoveltyGate, scores: Tensor, is_base: Tensor, target: Tensor, *,
                    thresholds: Tensor | Sequence[float] | None = None, relative: bool = False) -> OperatingCurve:
    """FOR and NCR of ``gate`` swept over its threshold, exact (one sort; see :func:`curve_sweep`).

    scores ``(N, C)``, is_base ``(C,)`` bool, target ``(N,)`` class ids. thresholds: where to evaluate, in the
    gate's natural units; None: every distinct value of the gate's statistic (the whole curve).
    """
    sweep = curve_sweep(gate, scores, is_base, target, relative=relative)
    return sweep.full() if thresholds is None else sweep.at(thresholds)


def ncr_at_for(curve: OperatingCurve | Sequence[tuple[float, float]], k: float) -> float | None:
    """NCR@kFOR: the largest NCR among the curve's points with ``FOR <= k`` (None when no point qualifies, e.g.
    a rule whose forgetting exceeds ``k`` even before its threshold flags anything). ``k`` a fraction."""
    if isinstance(curve, OperatingCurve):
        f, r = curve.forgetting, curve.recall
    else:
        pairs = list(curve)
        f = torch.tensor([float(p[0]) for p in pairs], dtype=torch.float64)
        r = torch.tensor([float(p[1]) for p in pairs], dtype=torch.float64)
    ok = f <= k + 1e-12
    return float(r[ok].max()) if bool(ok.any()) else None
