"""Novelty gates (NCD rules A-D): predict against a per-sample loop, a hand case, the a-priori calibration
guarantee of A/D on the calibration set and on a fresh draw, B/C's simulated calibration against a loop, and
bad input (budgets, wrong-class / empty / mismatched calibration sets, the small-set warning)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.gates import (
    GATES,
    NoveltyGateConfig,
    make_gate,
    split_scores,
    unknown_mask,
)

RULES = ["vanilla", "base-gate", "novel-ball", "margin", "base-gate-or-vanilla"]


def _naive_predict(rule: str, scores: torch.Tensor, is_base: torch.Tensor, threshold: float) -> list[int]:
    """One sample at a time, straight from the rules' definitions."""
    out = []
    base_cols = [c for c in range(scores.shape[1]) if is_base[c]]
    novel_cols = [c for c in range(scores.shape[1]) if not is_base[c]]
    for row in scores.tolist():
        bc = max(base_cols, key=lambda c: (row[c], -c))  # first column among equal maxima
        sb = row[bc]
        nc = max(novel_cols, key=lambda c: (row[c], -c)) if novel_cols else None
        sn = row[nc] if nc is not None else -math.inf
        novel = {"vanilla": sn > sb, "base-gate": sb < threshold, "novel-ball": sn > threshold,
                 "margin": sn + threshold > sb, "base-gate-or-vanilla": sb < threshold or sn > sb}[rule]
        out.append(nc if novel and nc is not None else bc)
    return out


def _sphere(n_per: int, classes: int, dim: int, spread: float, seed: int, centres: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    y = torch.arange(classes).repeat_interleave(n_per)
    z = F.normalize(centres[y] + spread * torch.randn(len(y), dim, generator=g), dim=1)
    return z, y, centres


def test_registry_holds_the_five_rules() -> None:
    assert sorted(GATES.names()) == sorted(RULES)
    assert NoveltyGateConfig().rule == "base-gate-or-vanilla" and NoveltyGateConfig().budget == 0.05


@pytest.mark.parametrize("rule", RULES)
def test_predict_matches_a_per_sample_loop(rule: str) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(200, 7, generator=g) * 2 - 1
    scores[:5, 2] = scores[:5, 0]  # a few exact ties between two base columns
    is_base = torch.tensor([True, False, True, True, False, True, False])  # base and novel rows interleaved
    for threshold in (-0.5, 0.0, 0.1, 0.4, 0.9):
        got = make_gate(rule, 0.05).predict(scores, is_base, threshold)
        assert got.dtype == torch.int64
        assert got.tolist() == _naive_predict(rule, scores, is_base, threshold)
    # session 0: no novel prototype, everything stays with the base classes whatever the gate
    only_base = torch.ones(7, dtype=torch.bool)
    got = make_gate(rule, 0.05).predict(scores, only_base, 0.9)
    assert got.tolist() == scores.argmax(dim=1).tolist()


def test_hand_case() -> None:
    # columns: base 0, base 1, novel 2
    scores = torch.tensor([[0.9, 0.1, 0.5],   # s_b 0.9, s_n 0.5: confident base
                           [0.3, 0.2, 0.25],  # s_b 0.3, s_n 0.25: unsure, novel a bit lower
                           [0.2, 0.4, 0.6],   # novel wins outright
                           [0.1, 0.05, 0.0]])  # far from everything
    is_base = torch.tensor([True, True, False])
    assert make_gate("vanilla", 0.05).predict(scores, is_base, 0.0).tolist() == [0, 0, 2, 0]
    assert make_gate("base-gate", 0.05).predict(scores, is_base, 0.35).tolist() == [0, 2, 1, 2]
    assert make_gate("base-gate-or-vanilla", 0.05).predict(scores, is_base, 0.35).tolist() == [0, 2, 2, 2]
    assert make_gate("novel-ball", 0.05).predict(scores, is_base, 0.45).tolist() == [2, 0, 2, 0]
    assert make_gate("margin", 0.05).predict(scores, is_base, 0.1).tolist() == [0, 2, 2, 0]  # 0.05 + 0.1 > 0.1
    s_b, base_arg, s_n, novel_arg = split_scores(scores, is_base)
    assert s_b.tolist() == pytest.approx([0.9, 0.3, 0.4, 0.1]) and base_arg.tolist() == [0, 0, 1, 0]
    assert s_n.tolist() == pytest.approx([0.5, 0.25, 0.6, 0.0]) and novel_arg.tolist() == [2, 2, 2, 2]
    # OOD by-product: far from the base prototypes (s_b < 0.35) and from the novel one (s_n < 0.3)
    assert unknown_mask(scores, is_base, 0.35, 0.3).tolist() == [False, True, False, True]


@pytest.mark.parametrize("rule", ["base-gate", "base-gate-or-vanilla"])
@pytest.mark.parametrize("budget", [0.02, 0.05, 0.1])
def test_base_gate_meets_the_budget_on_its_calibration_set(rule: str, budget: float) -> None:
    z, y, _ = _sphere(60, 20, 32, 0.25, seed=0)
    protos = F.normalize(torch.stack([z[y == c].mean(0) for c in range(20)]), dim=1)
    gate = make_gate(rule, budget, count="all")
    tau = gate.calibrate(z, y, protos, budget)
    s_b = (z @ protos.T).max(dim=1).values
    flagged = float((s_b < tau).double().mean())
    n = len(z)
    assert flagged <= budget + 1 / n
    assert flagged >= budget - 1 / n  # and it is the loosest such threshold, not a timid one
    # counting only the correctly classified samples: the loss the budget is about
    tau_c = make_gate(rule, budget, count="correct").calibrate(z, y, protos, budget)
    correct = (z @ protos.T).argmax(dim=1) == y
    lost = float(((s_b < tau_c) & correct).double().mean())
    assert budget - 1 / n <= lost <= budget + 1 / n
    assert tau_c >= tau


def test_realised_forgetting_on_a_fresh_draw_lands_near_the_budget() -> None:
    """A novel class at the base data's own distribution would take all flagged base samples: the forgetting of
    rule A on a fresh draw is then the fresh flagged fraction among correctly classified samples."""
    train_z, train_y, centres = _sphere(100, 20, 32, 0.25, seed=0)
    protos = F.normalize(torch.stack([train_z[train_y == c].mean(0) for c in range(20)]), dim=1)
    z, y, _ = _sphere(100, 20, 32, 0.25, seed=1, centres=centres)  # 2000 held-out calibration samples
    test_z, test_y, _ = _sphere(150, 20, 32, 0.25, seed=2, centres=centres)
    novel = F.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(5)), dim=1)
    scores = torch.cat([test_z @ protos.T, test_z @ novel.T], dim=1)
    is_base = torch.tensor([True] * 20 + [False])
    acc0 = float(((test_z @ protos.T).argmax(1) == test_y).double().mean())
    for budget in (0.02, 0.05):
        realised = {}
        for count in ("all", "correct"):
            gate = make_gate("base-gate", budget, count=count)
            tau = gate.calibrate(z, y, protos, budget)
            acc_t = float((gate.predict(scores, is_base, tau) == test_y).double().mean())
            realised[count] = acc0 - acc_t
        assert abs(realised["correct"] - budget) < 0.015  # counting only the samples whose loss is forgetting
        assert 0.0 < realised["all"] <= budget + 0.005  # every flagged sample: the conservative bound
        assert realised["all"] < realised["correct"]


def _simulated_forgetting(rule: str, z: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, t: float) -> float:
    """Loop reference of the B / C calibration: each sample a one-shot pseudo prototype of its class (that class
    left out of the base prototypes), the mean fraction of other-class samples it would capture."""
    fracs = []
    for i in range(len(z)):
        c = int(y[i])
        others = [j for j in range(len(z)) if int(y[j]) != c]
        caught = 0
        for j in others:
            sim = float(z[i] @ z[j])
            s_b = max(float(z[j] @ protos[k]) for k in range(len(protos)) if k != c)
            caught += (sim > t) if rule == "novel-ball" else (s_b - sim < t)
        fracs.append(caught / len(others))
    return sum(fracs) / len(fracs)


@pytest.mark.parametrize("rule", ["novel-ball", "margin"])
def test_simulated_calibration_matches_a_loop(rule: str, caplog: pytest.LogCaptureFixture) -> None:
    z, y, _ = _sphere(8, 4, 6, 0.6, seed=3)  # 32 samples: every one a pseudo prototype
    z = F.normalize(z.double(), dim=1)  # float64 throughout, so the loop's pair values equal the gate's
    protos = F.normalize(torch.stack([z[y == c].mean(0) for c in range(4)]), dim=1)
    budget = 0.1
    with caplog.at_level(logging.WARNING):
        t = make_gate(rule, budget, count="all").calibrate(z, y, protos, budget)
    assert _simulated_forgetting(rule, z, y, protos, t) <= budget + 1e-9
    # the loosest such threshold: one step further captures more than the budget
    step = 1e-9 if rule == "margin" else -1e-9
    assert _simulated_forgetting(rule, z, y, protos, t + step) > budget


@pytest.mark.parametrize("bad", [0, 1, 5, -0.1, float("nan")])
def test_bad_budgets_are_config_errors(bad: float) -> None:
    with pytest.raises(ConfigError, match="outside \\(0, 1\\)"):
        validate(NoveltyGateConfig, {"budget": bad})
    with pytest.raises(ConfigError, match="budget"):
        make_gate("base-gate", bad)
    z, y, _ = _sphere(30, 20, 8, 0.3, seed=0)
    protos = F.normalize(torch.stack([z[y == c].mean(0) for c in range(20)]), dim=1)
    with pytest.raises(ConfigError, match="budget"):
        make_gate("base-gate", 0.05).calibrate(z, y, protos, bad)


def test_percentage_budget_gets_a_hint() -> None:
    with pytest.raises(ConfigError, match="5 looks like a percentage: use 0.05"):
        validate(NoveltyGateConfig, {"budget": 5})


def test_unknown_rule_and_key_are_named() -> None:
    with pytest.raises(ConfigError, match='Did you mean "margin"'):
        make_gate("margn", 0.05)
    with pytest.raises(ConfigError, match="unknown key"):
        validate(NoveltyGateConfig, {"budgte": 0.05})


@pytest.mark.parametrize("rule", RULES)
def test_bad_calibration_sets(rule: str) -> None:
    z, y, _ = _sphere(30, 20, 8, 0.3, seed=0)
    protos = F.normalize(torch.stack([z[y == c].mean(0) for c in range(20)]), dim=1)
    gate = make_gate(rule, 0.05)
    wrong = y.clone()
    wrong[:3] = torch.tensor([20, 25, 25])
    with pytest.raises(ConfigError, match=r"wrong classes: labels \[20, 25\].*held-out BASE training data"):
        gate.calibrate(z, wrong, protos, 0.05)
    with pytest.raises(ConfigError, match="empty"):
        gate.calibrate(z[:0], y[:0], protos, 0.05)
    with pytest.raises(ShapeError, match=r"\(600, 8\).*\(20, 16\)"):
        gate.calibrate(z, y, torch.randn(20, 16), 0.05)
    with pytest.raises(ShapeError, match="labels"):
        gate.calibrate(z, y[:10], protos, 0.05)


@pytest.mark.parametrize("rule", ["base-gate", "margin"])
def test_small_calibration_set_warns(rule: str, caplog: pytest.LogCaptureFixture) -> None:
    z, y, _ = _sphere(9, 10, 8, 0.3, seed=0)  # 90 samples, as the notes' digits case
    protos = F.normalize(torch.stack([z[y == c].mean(0) for c in range(10)]), dim=1)
    with caplog.at_level(logging.WARNING, logger="edgetune.incremental.gates"):
        make_gate(rule, 0.02).calibrate(z, y, protos, 0.02)
    assert any("90 samples" in r.getMessage() and "500" in r.getMessage() for r in caplog.records)
    caplog.clear()
    big, by, _ = _sphere(60, 10, 8, 0.3, seed=0)  # 600 samples: enough for 2% (~12 below the quantile)
    with caplog.at_level(logging.WARNING, logger="edgetune.incremental.gates"):
        make_gate(rule, 0.02).calibrate(big, by, protos, 0.02)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="edgetune.incremental.gates"):
        make_gate(rule, 0.01).calibrate(big, by, protos, 0.01)  # 1% of 600 = 6 below the quantile: too few
    assert any("1000" in r.getMessage() for r in caplog.records)


def test_simulated_gates_need_two_classes_and_enough_shots() -> None:
    z, y, _ = _sphere(10, 3, 8, 0.3, seed=0)
    protos = F.normalize(torch.stack([z[y == c].mean(0) for c in range(3)]), dim=1)
    one = y == 0
    with pytest.raises(ConfigError, match="at least 2 base classes"):
        make_gate("margin", 0.05).calibrate(z[one], y[one], protos, 0.05)
    with pytest.raises(ConfigError, match="pseudo_shots=20"):
        make_gate("novel-ball", 0.05, pseudo_shots=20).calibrate(z, y, protos, 0.05)


def test_scores_shape_errors() -> None:
    gate = make_gate("base-gate", 0.05)
    with pytest.raises(ShapeError, match=r"\(4, 3\).*\(2,\)"):
        gate.predict(torch.zeros(4, 3), torch.tensor([True, False]), 0.1)
    with pytest.raises(ConfigError, match="no prototype is marked as a base class"):
        gate.predict(torch.zeros(4, 2), torch.tensor([False, False]), 0.1)
