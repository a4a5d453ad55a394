"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models").

On the task vectors ``tau_i = theta_i - theta_0`` of one tensor, three steps:

1. trim: keep the ``density`` fraction of each ``tau_i``'s entries of largest magnitude (the paper's top-k%,
   k = 20%), zero the rest (exactly ``round(density * n)`` entries, at least 1; ties broken by lower index);
2. elect: per entry, the sign ``gamma = sign(sum_i w_i trim(tau_i))`` (the sign of the larger total mass);
3. disjoint mean: per entry, the weighted mean over the models whose weighted trimmed entry has sign ``gamma``:
   ``sum_i w_i t_i / sum_i |w_i|`` over those models (0 where none agrees).

``theta = theta_0 + scaling * merged``. ``elect_sign: false`` skips step 2 (every nonzero entry counts) and
``disjoint_mean: false`` sums instead of averaging; with both off and density 1 this is task arithmetic exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.task_arithmetic import add_task_vectors, task_vectors

__all__ = ["TiesConfig", "TiesMerger", "count_of", "elect_and_mean", "top_magnitude_mask", "trim"]


class TiesConfig(MergeConfig):
    """TIES (Yadav et al. 2023). density: fraction of each task vector kept by magnitude; scaling: lambda;
    elect_sign: keep only entries agreeing with the elected sign; disjoint_mean: average them (else sum)."""

    method: Literal["ties"] = "ties"
    density: float = Field(default=0.2, gt=0, le=1)
    scaling: float = 1.0
    elect_sign: bool = True
    disjoint_mean: bool = True


def count_of(fraction: float, n: int) -> int:
    """``round(fraction * n)`` (halves up), within ``[0, n]``: how many of ``n`` entries a fraction names."""
    return min(n, max(0, int(fraction * n + 0.5)))


def top_magnitude_mask(x: Tensor, k: int) -> Tensor:
    """A boolean mask (shape of ``x``) of exactly ``k`` entries of largest ``|x|``; ties go to the lower flat index."""
    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    a = x.abs().flatten()
    threshold = a.kthvalue(n - k + 1).values  # the k-th largest magnitude
    above = a > threshold
    tie = a == threshold
    take = tie & (tie.cumsum(0) <= k - above.sum())  # the first ties, by index, up to k in all
    return (above | take).view_as(x)


def trim(tau: Tensor, density: float) -> Tensor:
    """``tau`` with all but its ``density`` fraction of largest-magnitude entries zeroed (``tau`` itself at 1)."""
    if density >= 1:
        return tau
    keep = top_magnitude_mask(tau, max(1, count_of(density, tau.numel())))
    return torch.where(keep, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def elect_and_mean(base: Tensor, taus: Sequence[Tensor], weights: Sequence[float], scaling: float,
                   elect_sign: bool = True, disjoint_mean: bool = True) -> Tensor:
    """Steps 2 and 3 on (trimmed) task vectors ``N x S``: ``base + scaling * merged``, shape ``S``."""
    if not elect_sign and not disjoint_mean:
        return add_task_vectors(base, taus, weights, scaling)
    w = torch.tensor(list(weights), dtype=base.dtype, device=base.device).view(-1, *([1] * base.dim()))  # (N, 1..)
    weighted = torch.stack(list(taus)) * w  # (N, *S)
    if elect_sign:
        elected = torch.sign(weighted.sum(0))  # (*S), 0 where the masses cancel
        agree = (torch.sign(weighted) == elected) & (elected != 0)
    else:
        agree = weighted != 0
    merged = (weighted * agree).sum(0)
    if disjoint_mean:
        divisor = (w.abs() * agree).sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + scaling * merged


class TiesMerger(Merger):
    """Trim, elect sign, disjoint mean."""

    density_option = "density"
    cfg: TiesConfig

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        taus = [trim(t, self.cfg.density) for t in task_vectors(xs, base)]
        return elect_and_mean(base, taus, self.weights(len(xs)), self.cfg.scaling, self.cfg.elect_sign,
                              self.cfg.disjoint_mean)


MERGERS.add("ties", TiesMerger, config=TiesConfig, keep_all={"density": 1.0},
            as_task_arithmetic={"density": 1.0, "elect_sign": False, "disjoint_mean": False},
            summary="TIES (Yadav et al. 2023): trim task vectors to top-density magnitudes, elect signs, "
                    "disjoint mean")
