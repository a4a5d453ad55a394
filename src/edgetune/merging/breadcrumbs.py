"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks").

Per tensor, each task vector ``tau_i = theta_i - theta_0`` keeps a middle band of its entries ranked by magnitude:
the top ``beta`` fraction (outliers, default 1%) is masked, the next ``density`` fraction (default 90%) is kept and
the small-magnitude rest is masked too. Then task arithmetic: ``theta_0 + scaling * sum_i w_i masked(tau_i)``.
Counts are ``round(beta * n)`` and ``round(density * n)`` (at least 1) of the tensor's ``n`` entries, ties broken
by lower index; ``beta + density`` may not pass 1. Density 1 with beta 0 is task arithmetic exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.task_arithmetic import add_task_vectors, task_vectors
from edgetune.merging.ties import count_of, top_magnitude_mask

__all__ = ["BreadcrumbsConfig", "BreadcrumbsMerger", "breadcrumbs_mask"]


class BreadcrumbsConfig(MergeConfig):
    """Model Breadcrumbs (Davari & Belilovsky 2024). beta: fraction of largest magnitudes masked; density: fraction
    kept after them; scaling: lambda."""

    method: Literal["breadcrumbs"] = "breadcrumbs"
    density: float = Field(default=0.9, gt=0, le=1)
    beta: float = Field(default=0.01, ge=0, lt=1)
    scaling: float = 1.0

    @model_validator(mode="after")
    def _band(self) -> BreadcrumbsConfig:
        if self.beta + self.density > 1 + 1e-9:
            raise ValueError(f"beta + density = {self.beta} + {self.density} passes 1: the band kept below the top "
                             f"beta outliers holds at most {1 - self.beta:g} of the entries; lower density or beta")
        return self


def breadcrumbs_mask(tau: Tensor, density: float, beta: float) -> Tensor | None:
    """Boolean mask (shape of ``tau``) of the kept band, or None when it keeps every entry."""
    n = tau.numel()
    n_out = count_of(beta, n)
    n_keep = min(max(1, count_of(density, n)), n - n_out)
    if n_out == 0 and n_keep == n:
        return None
    return top_magnitude_mask(tau, n_out + n_keep) & ~top_magnitude_mask(tau, n_out)


class BreadcrumbsMerger(Merger):
    """Mask both magnitude tails of each task vector, then task arithmetic."""

    density_option = "density"
    cfg: BreadcrumbsConfig

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        taus = []
        for tau in task_vectors(xs, base):
            keep = breadcrumbs_mask(tau, self.cfg.density, self.cfg.beta)
            taus.append(tau if keep is None else
                        torch.where(keep, tau, torch.zeros((), dtype=tau.dtype, device=tau.device)))
        return add_task_vectors(base, taus, self.weights(len(xs)), self.cfg.scaling)


MERGERS.add("breadcrumbs", BreadcrumbsMerger, config=BreadcrumbsConfig, keep_all={"density": 1.0, "beta": 0.0},
            as_task_arithmetic={"density": 1.0, "beta": 0.0},
            summary="Model Breadcrumbs (Davari & Belilovsky 2024): mask both magnitude tails of task vectors, then sum")
