"""Linear merge, model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time").

``theta = sum_i w_i theta_i`` with the weights normalised to sum to 1 (a weighted average; equal weights: the
uniform soup), or used as given with ``normalize: false``. Needs no base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import model_validator
from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig

__all__ = ["LinearConfig", "LinearMerger", "weighted_sum"]


class LinearConfig(MergeConfig):
    """Linear merge / model soups (Wortsman et al. 2022). normalize: divide the weights by their sum."""

    method: Literal["linear"] = "linear"
    normalize: bool = True

    @model_validator(mode="after")
    def _sum(self) -> LinearConfig:
        if self.normalize and self.weights is not None and sum(self.weights) == 0:
            raise ValueError(f"weights {self.weights} sum to 0, so they cannot be normalised to sum to 1; change them "
                             "or set normalize: false")
        return self


def weighted_sum(xs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i x_i`` over tensors of one shape ``S`` -> ``S`` (a new tensor, summed in the given order)."""
    out = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:], strict=True):
        out.add_(x, alpha=w)
    return out


class LinearMerger(Merger):
    """Weighted average of the models (no base model)."""

    needs_base = False
    cfg: LinearConfig

    def weights(self, n: int) -> list[float]:
        w = super().weights(n)
        if not self.cfg.normalize:
            return w
        total = sum(w)
        return [x / total for x in w]

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        return weighted_sum(xs, self.weights(len(xs)))


MERGERS.add("linear", LinearMerger, config=LinearConfig,
            summary="linear / model soups (Wortsman et al. 2022): weighted average of the models")
