"""Continual metrics against a hand-computed accuracy matrix, naive loops on random ones, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from edgetune.core.errors import ShapeError
from edgetune.incremental.continual_metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    check_accuracy_matrix,
    forgetting,
    forgetting_per_problem,
    forward_transfer,
    knowledge_transfer,
    summarize_matrix,
)

NAN = math.nan
# rows: after learning problem i; columns: tested on problem j (NaN: not yet learned, except where measured)
R = [[0.9, 0.3, NAN],
     [0.6, 0.8, 0.4],
     [0.7, 0.5, 0.6]]


def test_hand_computed_matrix() -> None:
    assert average_accuracy(R) == pytest.approx((0.7 + 0.5 + 0.6) / 3)
    assert average_accuracy(R, after=0) == pytest.approx(0.9)
    assert average_accuracy(R, after=1) == pytest.approx(0.7)
    assert average_incremental_accuracy(R) == pytest.approx((0.9 + 0.7 + 0.6) / 3)
    # problem 0: best before the end max(0.9, 0.6) = 0.9, end 0.7 -> 0.2; problem 1: 0.8 - 0.5 = 0.3
    torch.testing.assert_close(forgetting_per_problem(R), torch.tensor([0.2, 0.3], dtype=torch.float64))
    assert forgetting(R) == pytest.approx(0.25)
    assert backward_transfer(R) == pytest.approx(((0.7 - 0.9) + (0.5 - 0.8)) / 2)
    # R[0, 1] = 0.3 and R[1, 2] = 0.4 against chance 0.25 and 0.5
    assert forward_transfer(R, [0.5, 0.25, 0.5]) == pytest.approx(((0.3 - 0.25) + (0.4 - 0.5)) / 2)
    assert knowledge_transfer(R, [0.8, 0.8, 0.7]) == pytest.approx((0.1 + 0.0 - 0.1) / 3)


def test_forgetting_takes_the_best_earlier_value_not_the_first() -> None:
    r = [[0.5, NAN, NAN], [0.9, 0.7, NAN], [0.6, 0.7, 0.8]]  # problem 0 got better after problem 1
    assert forgetting_per_problem(r)[0] == pytest.approx(0.3)
    assert backward_transfer(r) == pytest.approx(((0.6 - 0.5) + (0.7 - 0.7)) / 2)  # BWT compares with R[j, j]


def _naive(r: torch.Tensor, alone: torch.Tensor, initial: torch.Tensor) -> dict[str, float]:
    t = r.shape[0]
    acc = [sum(float(r[i, j]) for j in range(i + 1)) / (i + 1) for i in range(t)]
    forg = []
    for j in range(t - 1):
        best = max(float(r[lv, j]) for lv in range(j, t - 1))
        forg.append(best - float(r[t - 1, j]))
    bwt = [float(r[t - 1, j] - r[j, j]) for j in range(t - 1)]
    fwt = [float(r[j - 1, j] - initial[j]) for j in range(1, t)]
    kt = [float(r[j, j] - alone[j]) for j in range(t)]
    return {"avg_acc": acc[-1], "avg_inc_acc": sum(acc) / t, "forgetting": sum(forg) / len(forg),
            "bwt": sum(bwt) / len(bwt), "fwt": sum(fwt) / len(fwt), "kt": sum(kt) / t}


@pytest.mark.parametrize("t", [2, 3, 6])
def test_random_matrices_match_naive_loops(t: int) -> None:
    g = torch.Generator().manual_seed(t)
    r = torch.rand(t, t, generator=g, dtype=torch.float64)
    alone, initial = torch.rand(t, generator=g, dtype=torch.float64), torch.rand(t, generator=g, dtype=torch.float64)
    got = summarize_matrix(r, alone=alone, initial=initial)
    want = _naive(r, alone, initial)
    assert got == pytest.approx(want)


def test_single_problem_and_missing_upper_entries() -> None:
    got = summarize_matrix([[0.8]], alone=[0.75])
    assert got["avg_acc"] == pytest.approx(0.8) and got["kt"] == pytest.approx(0.05)
    assert math.isnan(got["forgetting"]) and math.isnan(got["bwt"]) and math.isnan(got["fwt"])
    # a head per problem cannot be tested before its problem: FWT is NaN, the rest is defined
    r = [[0.9, NAN], [0.8, 0.7]]
    assert math.isnan(forward_transfer(r, [0.5, 0.5]))
    assert summarize_matrix(r)["forgetting"] == pytest.approx(0.1)


def test_zero_forgetting_matrix() -> None:
    r = torch.tensor([[0.9, NAN], [0.9, 0.6]])
    assert forgetting(r) == 0.0 and backward_transfer(r) == 0.0


@pytest.mark.parametrize("bad, match", [
    ([[0.5, 0.5]], "square"),
    ([[0.5, NAN], [NAN, 0.5]], r"R\[1, 0\] is NaN"),
    ([[90.0, NAN], [80.0, 70.0]], "fractions in \\[0, 1\\]"),
    ([], "square"),
])
def test_bad_matrices(bad: list, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        check_accuracy_matrix(bad)


def test_bad_reference_vectors_and_index() -> None:
    with pytest.raises(ShapeError, match="one accuracy per problem"):
        knowledge_transfer(R, [0.5, 0.5])
    with pytest.raises(ShapeError, match="after=3"):
        average_accuracy(R, after=3)
