"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

With task vectors ``tau_i = theta_i - theta_0`` (each fine-tune minus the base it was fine-tuned from):
``theta = theta_0 + lambda * sum_i w_i tau_i``. ``scaling`` is lambda (the paper picks 0.3-0.5 on validation data
when adding several tasks; 1 with one model gives that model back). Weights default to 1 each; a negative weight
subtracts a task vector, which makes the model forget that task.

Large tensors are merged in slices of rows (:func:`row_chunks`, at most :data:`CHUNK_ELEMENTS` entries each) into
one preallocated output, so the intermediates (task vectors, their weighted sum) take a slice per input instead of
a whole tensor per input; each entry goes through the same operations, so the result does not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.linear import weighted_sum

__all__ = ["CHUNK_ELEMENTS", "TaskArithmeticConfig", "TaskArithmeticMerger", "add_task_vectors", "row_chunks",
           "rows_of", "task_vectors"]

#: entries per slice of a large tensor (1 MiB of float32): the working set of a merge is a few slices per input
CHUNK_ELEMENTS = 1 << 18


class TaskArithmeticConfig(MergeConfig):
    """Task arithmetic (Ilharco et al. 2023). scaling: lambda, the factor on the weighted sum of task vectors."""

    method: Literal["task_arithmetic"] = "task_arithmetic"
    scaling: float = 1.0


def task_vectors(xs: Sequence[Tensor], base: Tensor) -> list[Tensor]:
    """``tau_i = x_i - base`` for each model's tensor ``S`` -> a list of ``S``."""
    return [x - base for x in xs]


def add_task_vectors(base: Tensor, taus: Sequence[Tensor], weights: Sequence[float], scaling: float) -> Tensor:
    """``base + scaling * sum_i w_i tau_i`` (shape ``S``); every task-vector method ends here."""
    return base + scaling * weighted_sum(taus, weights)


def rows_of(t: Tensor) -> Tensor:
    """``t`` viewed with at least one dimension (a 0-d tensor as ``(1,)``), so its rows can be sliced."""
    return t.unsqueeze(0) if t.dim() == 0 else t


def row_chunks(shape: Sequence[int], max_elements: int | None = None) -> list[slice]:
    """Slices of dim 0 that cover a tensor of ``shape`` (at least 1-d) in order, each of at most ``max_elements``
    (default :data:`CHUNK_ELEMENTS`) entries, at least one row. Rows are consecutive in flat (C) order, so a slice is
    a run of flat indices."""
    max_elements = CHUNK_ELEMENTS if max_elements is None else max_elements
    row = math.prod(shape[1:])
    step = max(1, max_elements // max(row, 1))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)] or [slice(0, 0)]


class TaskArithmeticMerger(Merger):
    """Base plus the scaled, weighted sum of the task vectors."""

    cfg: TaskArithmeticConfig

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        w, out = self.weights(len(xs)), torch.empty_like(base)
        rows, b_rows, x_rows = rows_of(out), rows_of(base), [rows_of(x) for x in xs]
        for sl in row_chunks(rows.shape):
            rows[sl] = add_task_vectors(b_rows[sl], task_vectors([x[sl] for x in x_rows], b_rows[sl]), w,
                                        self.cfg.scaling)
        return out


MERGERS.add("task_arithmetic", TaskArithmeticMerger, config=TaskArithmeticConfig, as_task_arithmetic={},
            keep_all={}, summary="task arithmetic (Ilharco et al. 2023): base + lambda * sum of weighted task vectors")
