"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

With task vectors ``tau_i = theta_i - theta_0`` (each fine-tune minus the base it was fine-tuned from):
``theta = theta_0 + lambda * sum_i w_i tau_i``. ``scaling`` is lambda (the paper picks 0.3-0.5 on validation data
when adding several tasks; 1 with one model gives that model back). Weights default to 1 each; a negative weight
subtracts a task vector, which makes the model forget that task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.linear import weighted_sum

__all__ = ["TaskArithmeticConfig", "TaskArithmeticMerger", "add_task_vectors", "task_vectors"]


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


class TaskArithmeticMerger(Merger):
    """Base plus the scaled, weighted sum of the task vectors."""

    cfg: TaskArithmeticConfig

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        return add_task_vectors(base, task_vectors(xs, base), self.weights(len(xs)), self.cfg.scaling)


MERGERS.add("task_arithmetic", TaskArithmeticMerger, config=TaskArithmeticConfig, as_task_arithmetic={},
            keep_all={}, summary="task arithmetic (Ilharco et al. 2023): base + lambda * sum of weighted task vectors")
