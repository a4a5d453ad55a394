"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models").

On the task vectors ``tau_i = theta_i - theta_0`` of one tensor, three steps:

1. trim: keep the ``density`` fraction of each ``tau_i``'s entries of largest magnitude (the paper's top-k%,
   k = 20%), zero the rest (exactly ``round(density * n)`` entries, at least 1; ties broken by lower index);
2. elect: per entry, the sign ``gamma = sign(sum_i w_i trim(tau_i))`` (the sign of the larger total mass);
3. disjoint mean: per entry, the weighted mean over the models whose weighted trimmed entry has sign ``gamma``:
   ``sum_i w_i t_i / sum_i |w_i|`` over those models (0 where none agrees).

``theta = theta_0 + scaling * merged``. ``elect_sign: false`` skips step 2 (every nonzero entry counts) and
``disjoint_mean: false`` sums instead of averaging; with both off and density 1 this is task arithmetic exactly.

Memory: step 1 needs each task vector's k-th largest magnitude over the whole tensor (:func:`magnitude_cuts`,
computed in the merge's output buffer before it is filled); steps 1-3 then run on slices of rows
(:func:`~edgetune.merging.task_arithmetic.row_chunks`), a :class:`MagnitudeCut` deciding each slice's kept entries
exactly as :func:`top_magnitude_mask` does on the whole tensor. A large tensor's working set is thus the output plus
a few slices per input, not several whole copies per input; the result is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from edgetune.merging.base import Merger
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.task_arithmetic import add_task_vectors, row_chunks, rows_of, task_vectors

__all__ = ["MagnitudeCut", "TiesConfig", "TiesMerger", "count_of", "elect_and_mean", "magnitude_cuts",
           "top_magnitude_mask", "trim"]


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


@dataclass(frozen=True)
class MagnitudeCut:
    """The ``k`` entries of largest magnitude of a tensor of ``n`` entries, decided one slice at a time: those above
    ``threshold`` (the k-th largest magnitude; ``above`` of them in the whole tensor), then the first
    ``k - above`` entries equal to it in flat order (what :func:`top_magnitude_mask` keeps)."""

    k: int
    n: int
    threshold: Tensor | None = None  # 0-d, None when k is 0 or n (nothing to compare)
    above: int = 0

    def mask(self, a: Tensor, ties_before: int) -> tuple[Tensor, int]:
        """The kept entries of a slice whose magnitudes are ``a`` (``ties_before``: entries equal to the threshold in
        the slices before it), and how many entries equal to the threshold it holds."""
        if self.k >= self.n or self.k <= 0:
            return torch.full_like(a, self.k > 0, dtype=torch.bool), 0
        assert self.threshold is not None
        keep = a > self.threshold
        need = self.k - self.above - ties_before
        if need <= 0:
            return keep, 0
        tie = (a == self.threshold).flatten()
        take = tie & (tie.cumsum(0) <= need)  # the first ties, by flat index, up to k in all
        return keep | take.view_as(a), int(tie.sum())


def magnitude_cuts(scratch: Tensor, ks: Sequence[int]) -> list[MagnitudeCut]:
    """One :class:`MagnitudeCut` per count in ``ks``, from ``scratch``: the magnitudes ``|x|`` of the whole tensor,
    contiguous, which this reorders in place (a CPU float32/float64 tensor is partitioned by numpy without a copy;
    others go through ``torch.kthvalue``)."""
    flat = scratch.view(-1)
    n = flat.numel()
    inner = sorted({n - k for k in ks if 0 < k < n})
    thresholds: dict[int, Tensor] = {}
    if inner and flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        flat.numpy().partition(inner)  # in place: position j now holds the (j+1)-th smallest
        thresholds = {j: flat[j].clone() for j in inner}
    else:
        thresholds = {j: flat.kthvalue(j + 1).values for j in inner}
    out = []
    for k in ks:
        t = thresholds.get(n - k)
        if t is None:
            out.append(MagnitudeCut(k, n))
            continue
        above = sum(int((flat[sl] > t).sum()) for sl in row_chunks(flat.shape))
        out.append(MagnitudeCut(k, n, t, above))
    return out


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
        cfg, w = self.cfg, self.weights(len(xs))
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        cuts = None
        if cfg.density < 1:  # each task vector's cut over the whole tensor, with the output as scratch
            k = max(1, count_of(cfg.density, base.numel()))
            cuts = [magnitude_cuts(torch.sub(x, base, out=out).abs_(), [k])[0] for x in xs]
        rows, b_rows, x_rows = rows_of(out), rows_of(base), [rows_of(x) for x in xs]
        seen = [0] * len(xs)
        for sl in row_chunks(rows.shape):
            taus = task_vectors([x[sl] for x in x_rows], b_rows[sl])
            if cuts is not None:
                for i, tau in enumerate(taus):
                    keep, ties = cuts[i].mask(tau.abs(), seen[i])
                    seen[i] += ties
                    tau.masked_fill_(~keep, 0)
            rows[sl] = elect_and_mean(b_rows[sl], taus, w, cfg.scaling, cfg.elect_sign, cfg.disjoint_mean)
        return out


MERGERS.add("ties", TiesMerger, config=TiesConfig, keep_all={"density": 1.0},
            as_task_arithmetic={"density": 1.0, "elect_sign": False, "disjoint_mean": False},
            summary="TIES (Yadav et al. 2023): trim task vectors to top-density magnitudes, elect signs, "
                    "disjoint mean")
