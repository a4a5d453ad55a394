"""The loss barrier along the linear path between two models (Frankle et al. 2020), as Git Re-Basin reports it
(:mod:`edgetune.merging.rebasin`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["BarrierCurve", "interpolate_state_dicts", "interpolation_barrier"]

StateDict = Mapping[str, Tensor]


def interpolate_state_dicts(sd_a: StateDict, sd_b: StateDict, alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) sd_a + alpha sd_b`` on floating tensors (in their dtype); other tensors copied from ``sd_a``."""
    return {k: torch.lerp(v, sd_b[k].to(v.dtype), alpha) if v.is_floating_point() else v.clone()
            for k, v in sd_a.items()}


class BarrierCurve(NamedTuple):
    """losses: one per alpha; barrier: ``max_a loss(a) - ((1 - a) loss(0) + a loss(1))``."""

    barrier: float
    losses: list[float]


@torch.no_grad()
def interpolation_barrier(model_fn: Callable[[], nn.Module], sd_a: StateDict, sd_b: StateDict,
                          loss_fn: Callable[[nn.Module], float | Tensor], alphas: Sequence[float]) -> BarrierCurve:
    """The loss along the linear path ``(1 - a) sd_a + a sd_b`` and its barrier (Frankle et al. 2020; as used by
    Ainsworth et al. 2023). ``model_fn()``: a fresh module to load each point into (put in eval mode);
    ``loss_fn(model)``: its loss. The end points are evaluated too when ``alphas`` lacks 0 or 1."""
    cache: dict[float, float] = {}

    def loss_at(alpha: float) -> float:
        if alpha not in cache:
            model = model_fn()
            model.load_state_dict(interpolate_state_dicts(sd_a, sd_b, alpha))
            cache[alpha] = float(loss_fn(model.eval()))
        return cache[alpha]

    losses = [loss_at(float(a)) for a in alphas]
    lo, hi = loss_at(0.0), loss_at(1.0)
    barrier = max(loss - ((1 - a) * lo + a * hi) for a, loss in zip(alphas, losses, strict=True))
    return BarrierCurve(float(barrier), losses)
