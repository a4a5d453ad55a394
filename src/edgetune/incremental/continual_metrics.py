"""Continual-learning figures from the accuracy matrix ``R (T, T)``: ``R[i, j]`` is the test accuracy on problem
``j`` after learning problems ``0..i`` (a fraction in [0, 1]; NaN where it was not measured).

Definitions (problems counted from 0, ``T`` problems):

- average accuracy after problem ``i``: ``ACC_i = mean_{j <= i} R[i, j]``; :func:`average_accuracy` gives
  ``ACC_{T-1}`` (Lopez-Paz & Ranzato 2017, GEM; Chaudhry et al. 2018).
- average incremental accuracy: ``mean_i ACC_i`` (Rebuffi et al. 2017, iCaRL).
- forgetting of problem ``j < T-1``: ``f_j = max_{j <= l <= T-2} R[l, j] - R[T-1, j]`` (the best it ever was
  before the end, minus the end); :func:`forgetting` is the mean over the old problems ``j < T-1`` (Chaudhry et
  al. 2018, RWalk; PyCIL and Avalanche report the same). Positive = forgotten.
- backward transfer: ``BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])`` (GEM). Negative = forgotten; positive =
  later problems helped earlier ones.
- forward transfer (GEM): ``FWT = mean_{j >= 1} (R[j-1, j] - b_j)``, ``b_j`` the accuracy on problem ``j``
  before any learning. It needs the entries above the diagonal, which a method with a head per problem cannot
  give (problem ``j`` has no head before it is learned): NaN then.
- knowledge transfer: ``KT = mean_j (R[j, j] - A_j)``, ``A_j`` the accuracy of the same model trained on
  problem ``j`` alone from the pretrained start (the "forward transfer" of the continual-NLP literature HOP
  follows, Ke et al. 2020-2021: what learning earlier problems did to learning the new one). A method that
  learns every problem from a fresh adapter, as HOP does, has ``KT = 0`` by construction against itself.

With one problem there is no old problem: forgetting and BWT are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from edgetune.core.errors import ShapeError

__all__ = ["average_accuracy", "average_incremental_accuracy", "backward_transfer", "check_accuracy_matrix",
           "forgetting", "forgetting_per_problem", "forward_transfer", "knowledge_transfer", "summarize_matrix"]


def check_accuracy_matrix(r: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """``R`` as a float64 ``(T, T)`` tensor, checked: square, fractions in [0, 1], measured on and below the
    diagonal (``R[i, j]`` for ``j <= i``); above it NaN is allowed."""
    m = torch.as_tensor(r, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ShapeError(f"the accuracy matrix must be square (T, T) with T >= 1 problems, got {tuple(m.shape)}")
    lower = torch.tril(torch.ones_like(m, dtype=torch.bool))
    if bool(m[lower].isnan().any()):
        i, j = (int(v) for v in torch.nonzero(m.isnan() & lower)[0])
        raise ShapeError(f"R[{i}, {j}] is NaN: every problem j <= i must be tested after learning problem i")
    seen = m[~m.isnan()]
    if bool(((seen < 0) | (seen > 1)).any()):
        raise ShapeError(f"accuracies must be fractions in [0, 1], got values from {float(seen.min()):.4g} to "
                         f"{float(seen.max()):.4g} (divide percentages by 100)")
    return m


def _vector(v: Tensor | Sequence[float], t: int, what: str) -> Tensor:
    out = torch.as_tensor(v, dtype=torch.float64)
    if out.shape != (t,):
        raise ShapeError(f"{what} needs one accuracy per problem, shape ({t},), got {tuple(out.shape)}")
    return out


def average_accuracy(r: Tensor | Sequence[Sequence[float]], after: int | None = None) -> float:
    """``ACC_i = mean_{j <= i} R[i, j]`` after problem ``after`` (default the last)."""
    m = check_accuracy_matrix(r)
    i = m.shape[0] - 1 if after is None else after
    if not 0 <= i < m.shape[0]:
        raise ShapeError(f"after={after} is not a problem index of a {m.shape[0]}-problem matrix")
    return float(m[i, : i + 1].mean())


def average_incremental_accuracy(r: Tensor | Sequence[Sequence[float]]) -> float:
    """``mean_i ACC_i`` over every step of the sequence."""
    m = check_accuracy_matrix(r)
    return sum(average_accuracy(m, i) for i in range(m.shape[0])) / m.shape[0]


def forgetting_per_problem(r: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """``f_j = max_{j <= l <= T-2} R[l, j] - R[T-1, j]`` for each old problem ``j < T-1``: ``(T-1,)``."""
    m = check_accuracy_matrix(r)
    t = m.shape[0]
    return torch.stack([m[j:t - 1, j].max() - m[t - 1, j] for j in range(t - 1)]) if t > 1 else m.new_zeros(0)


def forgetting(r: Tensor | Sequence[Sequence[float]]) -> float:
    """Mean forgetting over the old problems (NaN with one problem)."""
    f = forgetting_per_problem(r)
    return float(f.mean()) if f.numel() else math.nan


def backward_transfer(r: Tensor | Sequence[Sequence[float]]) -> float:
    """``mean_{j < T-1} (R[T-1, j] - R[j, j])`` (NaN with one problem)."""
    m = check_accuracy_matrix(r)
    t = m.shape[0]
    return float((m[t - 1, : t - 1] - m.diagonal()[: t - 1]).mean()) if t > 1 else math.nan


def forward_transfer(r: Tensor | Sequence[Sequence[float]], initial: Tensor | Sequence[float]) -> float:
    """GEM's ``mean_{j >= 1} (R[j-1, j] - b_j)``; ``initial`` = ``b (T,)``. NaN when an ``R[j-1, j]`` is NaN."""
    m = check_accuracy_matrix(r)
    t = m.shape[0]
    b = _vector(initial, t, "forward transfer")
    if t < 2:
        return math.nan
    above = torch.stack([m[j - 1, j] for j in range(1, t)])
    return float((above - b[1:]).mean())


def knowledge_transfer(r: Tensor | Sequence[Sequence[float]], alone: Tensor | Sequence[float]) -> float:
    """``mean_j (R[j, j] - A_j)``; ``alone`` = ``A (T,)``, each problem's accuracy when learned alone."""
    m = check_accuracy_matrix(r)
    return float((m.diagonal() - _vector(alone, m.shape[0], "knowledge transfer")).mean())


def summarize_matrix(r: Tensor | Sequence[Sequence[float]], *, alone: Tensor | Sequence[float] | None = None,
                     initial: Tensor | Sequence[float] | None = None) -> dict[str, float]:
    """Every figure above in one dict (``kt`` with ``alone``, ``fwt`` with ``initial``; NaN otherwise)."""
    m = check_accuracy_matrix(r)
    return {"avg_acc": average_accuracy(m), "avg_inc_acc": average_incremental_accuracy(m),
            "forgetting": forgetting(m), "bwt": backward_transfer(m),
            "fwt": forward_transfer(m, initial) if initial is not None else math.nan,
            "kt": knowledge_transfer(m, alone) if alone is not None else math.nan}
