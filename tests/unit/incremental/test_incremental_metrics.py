"""Incremental metrics: session accuracy, FOR, NCR and the performance drop on hand-computed cases; the exact
operating curve of every gate against a per-threshold loop through ``predict``; NCR@kFOR read-off."""

from __future__ import annotations

import pytest
import torch

from edgetune.core.errors import ConfigError, DataError, ShapeError
from edgetune.incremental.gates import make_gate
from edgetune.incremental.metrics import (
    OperatingCurve,
    forgetting,
    ncr_at_for,
    novel_class_recall,
    operating_curve,
    performance_drop,
    session_accuracy,
)

RULES = ["vanilla", "base-gate", "novel-ball", "margin", "base-gate-or-vanilla"]


def test_session_accuracy_by_hand() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # base 0, 1; novel 2, 3
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 0, 0])
    out = session_accuracy(pred, target, [0, 1])
    assert out["acc"] == pytest.approx(4 / 8)
    assert out["base_acc"] == pytest.approx(3 / 4)
    assert out["novel_acc"] == pytest.approx(1 / 4)
    assert out["hm"] == pytest.approx(2 * 0.75 * 0.25 / (0.75 + 0.25))
    only_base = session_accuracy(pred[:4], target[:4], torch.tensor([0, 1]))
    assert only_base["novel_acc"] is None and only_base["hm"] is None
    assert only_base["acc"] == pytest.approx(0.75) == only_base["base_acc"]
    zero = session_accuracy(torch.tensor([1, 0]), torch.tensor([0, 2]), [0, 1])
    assert zero["hm"] == 0.0
    with pytest.raises(ShapeError):
        session_accuracy(pred, target[:3], [0])


def test_forgetting_recall_and_drop_by_hand() -> None:
    assert forgetting(0.9, 0.88) == pytest.approx(0.02)
    assert forgetting(0.8, 0.78, relative=True) == pytest.approx(0.025)
    assert forgetting(0.8, 0.85) == pytest.approx(-0.05)
    with pytest.raises(ConfigError, match="give 0.95, not 95"):
        forgetting(95, 93)
    with pytest.raises(ConfigError, match="relative=False"):
        forgetting(0.0, 0.0, relative=True)
    target = torch.tensor([0, 5, 5, 5, 6, 1])
    pred = torch.tensor([0, 5, 0, 5, 6, 6])
    assert novel_class_recall(pred, target, [5, 6]) == pytest.approx(3 / 4)
    assert novel_class_recall(pred, target, [5]) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="no test example of the novel classes"):
        novel_class_recall(pred, target, [9])
    assert performance_drop([0.95, 0.9, 0.8]) == pytest.approx(0.15)
    assert performance_drop([0.9]) == 0.0
    with pytest.raises(ConfigError):
        performance_drop([])


def _naive_point(rule: str, scores: torch.Tensor, is_base: torch.Tensor, target: torch.Tensor,
                 threshold: float) -> tuple[float, float]:
    """FOR and NCR at one threshold from the gate's predictions and the plain metric definitions."""
    base_cols = torch.nonzero(is_base).flatten()
    base_classes = base_cols.tolist()
    base_ex = torch.tensor([int(t) in base_classes for t in target])
    pred0 = base_cols[scores[:, is_base].argmax(dim=1)]  # session 0: base prototypes only
    pred = make_gate(rule, 0.05).predict(scores, is_base, threshold)
    acc0 = session_accuracy(pred0[base_ex], target[base_ex], base_classes)["acc"]
    acc_t = session_accuracy(pred[base_ex], target[base_ex], base_classes)["acc"]
    novel = sorted({int(t) for t in target if int(t) not in base_classes})
    return forgetting(acc0, acc_t), novel_class_recall(pred, target, novel)


def _toy(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    is_base = torch.tensor([True, True, True, False, True, False])  # two novel classes, 3 and 5
    target = torch.tensor([0, 1, 2, 4] * 10 + [3, 5] * 8)
    scores = torch.rand(len(target), 6, generator=g) * 0.6
    scores[torch.arange(len(target)), target] += 0.35  # informative but noisy
    scores = ((scores * 50).round() / 50).double()  # ties in every statistic; float64 keeps midpoints exact
    return scores, is_base, target


@pytest.mark.parametrize("rule", RULES)
def test_operating_curve_matches_predict_at_every_threshold(rule: str) -> None:
    for seed in range(3):
        scores, is_base, target = _toy(seed)
        curve = operating_curve(make_gate(rule, 0.05), scores, is_base, target)
        assert len(curve.threshold) == len(curve.forgetting) == len(curve.recall)
        for th, f, r in zip(curve.threshold.tolist(), curve.forgetting.tolist(), curve.recall.tolist(), strict=True):
            nf, nr = _naive_point(rule, scores, is_base, target, th)
            assert f == pytest.approx(nf, abs=1e-12) and r == pytest.approx(nr, abs=1e-12)
        # thresholds given: same values, and on a grid that includes points between the curve's own
        # (float32 scores too: a threshold on a tie is rounded as predict's comparison rounds it)
        grid = torch.linspace(-1.0, 1.0, 41).tolist()
        for sc in (scores, scores.float()):
            on_grid = operating_curve(make_gate(rule, 0.05), sc, is_base, target, thresholds=grid)
            assert len(on_grid.threshold) == len(grid)
            for th, f, r in zip(on_grid.threshold.tolist(), on_grid.forgetting.tolist(), on_grid.recall.tolist(),
                                strict=True):
                nf, nr = _naive_point(rule, sc, is_base, target, th)
                assert f == pytest.approx(nf, abs=1e-12) and r == pytest.approx(nr, abs=1e-12)


@pytest.mark.parametrize("rule", ["base-gate", "novel-ball", "margin", "base-gate-or-vanilla"])
def test_curve_runs_from_no_flag_to_all_flagged(rule: str) -> None:
    scores, is_base, target = _toy(0)
    curve = operating_curve(make_gate(rule, 0.05), scores, is_base, target)
    f, r = curve.forgetting, curve.recall
    assert bool((f[1:] >= f[:-1] - 1e-12).all()) and bool((r[1:] >= r[:-1] - 1e-12).all())  # monotone
    base_ex = is_base[target]
    acc0 = float((torch.nonzero(is_base).flatten()[scores[:, is_base].argmax(1)] == target)[base_ex].double().mean())
    assert float(f[-1]) == pytest.approx(acc0)  # everything flagged: all base accuracy lost
    if rule != "base-gate-or-vanilla":
        assert float(f[0]) == 0.0 and float(r[0]) == 0.0  # nothing flagged
    rel = operating_curve(make_gate(rule, 0.05), scores, is_base, target, relative=True)
    torch.testing.assert_close(rel.forgetting, f / acc0)


def test_ncr_at_for_by_hand() -> None:
    pairs = [(0.0, 0.1), (0.01, 0.3), (0.02, 0.5), (0.03, 0.55), (0.05, 0.7), (0.08, 0.9)]
    assert ncr_at_for(pairs, 0.02) == 0.5
    assert ncr_at_for(pairs, 0.05) == 0.7
    assert ncr_at_for(pairs, 0.049) == 0.55
    assert ncr_at_for([(0.03, 0.4)], 0.02) is None  # no point within the budget
    curve = OperatingCurve(torch.arange(6.0), torch.tensor([p[0] for p in pairs], dtype=torch.float64),
                           torch.tensor([p[1] for p in pairs], dtype=torch.float64))
    assert curve.pairs() == pairs
    assert ncr_at_for(curve, 0.02) == 0.5 and ncr_at_for(curve, 1.0) == 0.9


def test_curve_bad_input() -> None:
    scores, is_base, target = _toy(0)
    gate = make_gate("base-gate", 0.05)
    with pytest.raises(ConfigError, match="at least one novel prototype"):
        operating_curve(gate, scores, torch.ones(6, dtype=torch.bool), target)
    with pytest.raises(DataError, match="base and of novel"):
        operating_curve(gate, scores[:40], is_base, target[:40])
    with pytest.raises(ShapeError, match="index the 6 score columns"):
        operating_curve(gate, scores[:2], is_base, torch.tensor([0, 7]))
    with pytest.raises(ShapeError):
        operating_curve(gate, scores, is_base, target[:5])
