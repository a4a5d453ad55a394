"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models").

Per tensor (the paper's per layer), with the task vectors ``tau_i = theta_i - theta_0`` of N fine-tunes of one
base, flattened: ``cos`` is the mean cosine over the N(N-1)/2 pairs, ``t = N cos / (1 + (N - 1) cos)`` and
``theta = t * mean_i(theta_i) + (1 - t) * theta_0``. Takes no weights: ``t`` comes from the angle.

Guards (ours; the paper assumes fine-tunes at a positive angle): a pair with a zero task vector has cosine 0 (a
model that did not move says nothing about agreement); ``cos`` is clamped to [0, 1], so ``t`` is in [0, 1] and
fine-tunes that disagree on average (``cos <= 0``) give the base for that tensor, where the formula would
otherwise extrapolate away from the fine-tunes (or divide by zero at ``cos = -1 / (N - 1)``). One model: that model
is returned, with a warning (no angle can be measured).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.task_arithmetic import task_vectors

__all__ = ["ModelStockConfig", "ModelStockMerger", "mean_pairwise_cosine", "model_stock_ratio"]

log = logging.getLogger(__name__)


class ModelStockConfig(MergeConfig):
    """Model Stock (Jang et al. 2024): no options; the interpolation ratio comes from the task vectors' angle."""

    method: Literal["model_stock"] = "model_stock"

    @model_validator(mode="after")
    def _no_weights(self) -> ModelStockConfig:
        if self.weights is not None:
            raise ValueError("model_stock takes no weights (it sets the ratio to the base from the angle between the "
                             "fine-tunes); remove `weights`")
        return self


def mean_pairwise_cosine(taus: list[Tensor]) -> float:
    """Mean cosine over all pairs of the flattened task vectors (a pair with a zero vector counts 0)."""
    flat = torch.stack([t.flatten() for t in taus])  # (N, numel)
    norms = flat.norm(dim=1)
    dots = flat @ flat.T  # (N, N)
    n = len(taus)
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            den = float(norms[i] * norms[j])
            total += float(dots[i, j]) / den if den > 0 else 0.0
    return total / (n * (n - 1) // 2)


def model_stock_ratio(cos: float, n: int) -> float:
    """``t = N cos / (1 + (N - 1) cos)`` with ``cos`` clamped to [0, 1]."""
    cos = min(1.0, max(0.0, cos))
    return n * cos / (1 + (n - 1) * cos)


class ModelStockMerger(Merger):
    """Interpolate between the mean of the fine-tunes and the base, by their angle."""

    takes_weights = False
    cfg: ModelStockConfig

    def __init__(self, cfg: ModelStockConfig) -> None:
        super().__init__(cfg)
        self._warned = False

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        if len(xs) == 1:
            if not self._warned:
                log.warning("model_stock needs at least 2 fine-tuned models to measure their angle; with one, the "
                            "merge returns that model")
                self._warned = True
            return xs[0].clone()
        t = model_stock_ratio(mean_pairwise_cosine(task_vectors(xs, base)), len(xs))
        return t * torch.stack(xs).mean(0) + (1 - t) * base


MERGERS.add("model_stock", ModelStockMerger, config=ModelStockConfig,
            summary="Model Stock (Jang et al. 2024): interpolate the fine-tunes' mean toward the base by their angle")
