"""DARE, drop and rescale (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch").

Each entry of each task vector ``tau_i = theta_i - theta_0`` is dropped with probability ``p = 1 - density`` and the
kept ones are rescaled by ``1 / density``, so each entry keeps its expected value; the results are then combined by
task arithmetic (``combine: sum``: ``theta_0 + scaling * sum_i w_i tau_i'``) or by TIES's sign election and
disjoint mean (``combine: ties``, DARE-TIES). The paper drops up to 90% (density 0.1) of large language models'
deltas; smaller models tolerate less. Density 1 is task arithmetic exactly.

The drops of model ``i`` on the tensor ``name`` come from a CPU ``torch.Generator`` seeded by ``(seed,
crc32(name), i)``: the same for every run, device and tensor order, so a streaming merge gives the same result.
Large tensors are merged slice by slice (:func:`~edgetune.merging.task_arithmetic.row_chunks`), each model's
generator drawing the slices' drops in order: the same numbers as one draw for the whole tensor, so the same result
with a working set of a few slices per input.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.task_arithmetic import add_task_vectors, row_chunks, rows_of, task_vectors
from edgetune.merging.ties import elect_and_mean

__all__ = ["DareConfig", "DareMerger", "dare_drop", "dare_generator"]

_MASK64 = (1 << 63) - 1


class DareConfig(MergeConfig):
    """DARE (Yu et al. 2024). density: the probability of keeping an entry; scaling: lambda; combine: sum (task
    arithmetic) or ties (sign election, then the disjoint mean of the agreeing entries, or their sum with
    ``disjoint_mean: false``, as mergekit's dare_ties does by default)."""

    method: Literal["dare"] = "dare"
    density: float = Field(default=0.5, gt=0, le=1)
    scaling: float = 1.0
    combine: Literal["sum", "ties"] = "sum"
    disjoint_mean: bool = True


def dare_generator(seed: int, name: str, index: int) -> torch.Generator:
    """The CPU generator of model ``index``'s drops on tensor ``name`` (a mix of the three, SplitMix64 constants)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode()) * 0xBF58476D1CE4E5B9
             + (index + 1) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator().manual_seed(mixed)


def dare_drop(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """``tau`` (shape ``S``) with each entry kept with probability ``density`` and divided by it, else zeroed."""
    if density >= 1:
        return tau
    keep = torch.rand(tau.shape, generator=generator) < density  # drawn on the CPU: the same on every device
    return torch.where(keep.to(tau.device), tau / density, torch.zeros((), dtype=tau.dtype, device=tau.device))


class DareMerger(Merger):
    """Random drop and rescale of each task vector, then task arithmetic or TIES."""

    density_option = "density"
    commutative = False  # model i's drops are seeded by its position i
    cfg: DareConfig

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        cfg, w = self.cfg, self.weights(len(xs))
        gens = [dare_generator(cfg.seed, name, i) for i in range(len(xs))]
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        rows, b_rows, x_rows = rows_of(out), rows_of(base), [rows_of(x) for x in xs]
        for sl in row_chunks(rows.shape):  # each generator draws its slices in order: one whole draw's numbers
            b = b_rows[sl]
            taus = [dare_drop(t, cfg.density, g) for t, g in zip(task_vectors([x[sl] for x in x_rows], b), gens,
                                                                 strict=True)]
            if cfg.combine == "ties":
                rows[sl] = elect_and_mean(b, taus, w, cfg.scaling, disjoint_mean=cfg.disjoint_mean)
            else:
                rows[sl] = add_task_vectors(b, taus, w, cfg.scaling)
        return out


MERGERS.add("dare", DareMerger, config=DareConfig, keep_all={"density": 1.0}, as_task_arithmetic={"density": 1.0},
            summary="DARE (Yu et al. 2024): drop task-vector entries at random, rescale by 1/density, then sum or TIES")
