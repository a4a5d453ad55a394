"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks").

Per tensor, each task vector ``tau_i = theta_i - theta_0`` keeps a middle band of its entries ranked by magnitude:
the top ``beta`` fraction (outliers, default 1%) is masked, the next ``density`` fraction (default 90%) is kept and
the small-magnitude rest is masked too. Then task arithmetic: ``theta_0 + scaling * sum_i w_i masked(tau_i)``.
Counts are ``round(beta * n)`` and ``round(density * n)`` (at least 1) of the tensor's ``n`` entries, ties broken
by lower index; ``beta + density`` may not pass 1. Density 1 with beta 0 is task arithmetic exactly. Large tensors
are merged slice by slice, with each task vector's two magnitude cuts taken over the whole tensor first (as TIES
does, :mod:`edgetune.merging.ties`): the same result, a working set of a few slices per input.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.task_arithmetic import add_task_vectors, row_chunks, rows_of, task_vectors
from edgetune.merging.ties import count_of, magnitude_cuts, top_magnitude_mask

__all__ = ["BreadcrumbsConfig", "BreadcrumbsMerger", "band_counts", "breadcrumbs_mask"]


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


def band_counts(n: int, density: float, beta: float) -> tuple[int, int] | None:
    """``(n_out, n_keep)``: the top entries masked and the ones kept below them, of ``n``; None when all are kept."""
    n_out = count_of(beta, n)
    n_keep = min(max(1, count_of(density, n)), n - n_out)
    return None if n_out == 0 and n_keep == n else (n_out, n_keep)


def breadcrumbs_mask(tau: Tensor, density: float, beta: float) -> Tensor | None:
    """Boolean mask (shape of ``tau``) of the kept band, or None when it keeps every entry."""
    counts = band_counts(tau.numel(), density, beta)
    if counts is None:
        return None
    n_out, n_keep = counts
    return top_magnitude_mask(tau, n_out + n_keep) & ~top_magnitude_mask(tau, n_out)


class BreadcrumbsMerger(Merger):
    """Mask both magnitude tails of each task vector, then task arithmetic."""

    density_option = "density"
    cfg: BreadcrumbsConfig

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        w = self.weights(len(xs))
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        counts = band_counts(base.numel(), self.cfg.density, self.cfg.beta)
        cuts = None
        if counts is not None:  # each task vector's two cuts over the whole tensor, with the output as scratch
            n_out, n_keep = counts
            cuts = [magnitude_cuts(torch.sub(x, base, out=out).abs_(), [n_out + n_keep, n_out]) for x in xs]
        rows, b_rows, x_rows = rows_of(out), rows_of(base), [rows_of(x) for x in xs]
        seen = [[0, 0] for _ in xs]
        for sl in row_chunks(rows.shape):
            taus = task_vectors([x[sl] for x in x_rows], b_rows[sl])
            if cuts is not None:
                for i, tau in enumerate(taus):
                    a = tau.abs()
                    (band, t_band), (top, t_top) = (c.mask(a, s) for c, s in zip(cuts[i], seen[i], strict=True))
                    seen[i][0] += t_band
                    seen[i][1] += t_top
                    tau.masked_fill_(~(band & ~top), 0)
            rows[sl] = add_task_vectors(b_rows[sl], taus, w, self.cfg.scaling)
        return out


MERGERS.add("breadcrumbs", BreadcrumbsMerger, config=BreadcrumbsConfig, keep_all={"density": 1.0, "beta": 0.0},
            as_task_arithmetic={"density": 1.0, "beta": 0.0},
            summary="Model Breadcrumbs (Davari & Belilovsky 2024): mask both magnitude tails of task vectors, then sum")
