"""Network percolation ("chain removal"): cut dead hidden neurons along a chain of sparse layers.

CHT/CHTs (Zhang et al. ICLR 2024; arXiv 2501.19107; spec §1.5): after link removal and before regrowth, a
hidden neuron with no incoming links or no outgoing links cannot carry signal; all its remaining links
are cut. Cutting them can starve other neurons, so the rule is applied until nothing changes. The links
cut this way go back to the regrowth budget (density is preserved), and because CH scores vanish on
isolated nodes, dead neurons are almost never reconnected: this is how CHT compresses nodes.

A chain is a list of masks ``M_0 … M_{L-1}``, ``M_i`` of shape ``(out_i, in_i)`` with
``in_{i+1} == out_i``. The hidden neurons are the outputs of ``M_0 … M_{L-2}`` (= inputs of the next
mask); the chain's inputs (columns of ``M_0``) and outputs (rows of ``M_{L-1}``) are never cut. Pass a
full ``True`` mask for a dense layer (e.g. a dense classifier) so that the chain sees its links.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from edgetune.core.errors import ShapeError

__all__ = ["PercolationResult", "active_neuron_fraction", "percolate"]


class PercolationResult(NamedTuple):
    """Output of :func:`percolate`.

    masks: new masks, same shapes as the input chain.
    removed: links cut per layer (``nnz_before − nnz_after``), to add to that layer's regrowth budget.
    active_fraction: per hidden layer (``len(masks) − 1`` values), fraction of its neurons that still have
        both incoming and outgoing links (the active-neuron percentage, ANP, as a fraction).
    """

    masks: list[torch.Tensor]
    removed: list[int]
    active_fraction: list[float]


def _check_chain(masks: Sequence[torch.Tensor]) -> None:
    if len(masks) == 0:
        raise ShapeError("percolate needs at least one mask, got an empty chain.")
    for i, m in enumerate(masks):
        if m.dim() != 2 or m.dtype != torch.bool:
            raise ShapeError(f"mask {i} must be a 2-D bool tensor (out, in), got {m.dtype} {tuple(m.shape)}.")
    for i in range(len(masks) - 1):
        if masks[i + 1].shape[1] != masks[i].shape[0]:
            raise ShapeError(
                f"masks do not form a chain: mask {i} has {masks[i].shape[0]} outputs but mask {i + 1} has "
                f"{masks[i + 1].shape[1]} inputs (shapes {tuple(masks[i].shape)} -> {tuple(masks[i + 1].shape)}). "
                "Pass the masks in forward order, each of shape (out, in)."
            )


def percolate(masks: Sequence[torch.Tensor]) -> PercolationResult:
    """Cut every hidden neuron with no incoming or no outgoing link, iterated to a fixed point.

    Each sweep computes, for every hidden layer ``h`` (between mask ``h`` and ``h + 1``),
    ``alive = rows_any(M_h) & cols_any(M_{h+1})`` and clears row ``h`` of dead neurons in ``M_h`` and
    their column in ``M_{h+1}``; sweeps repeat until no link changes. At the fixed point every hidden
    neuron has either both kinds of links or none. The input masks are not modified.

    Args:
        masks: chain of bool masks, ``masks[i]`` of shape ``(out_i, in_i)``, ``in_{i+1} == out_i``.
    """
    _check_chain(masks)
    new = [m.clone() for m in masks]
    before = [int(m.sum().item()) for m in masks]
    changed = True
    while changed:
        changed = False
        for h in range(len(new) - 1):
            alive = new[h].any(dim=1) & new[h + 1].any(dim=0)  # (out_h,)
            if bool(alive.all()):
                continue
            # Only act if a dead neuron still holds a link; otherwise the sweep is already stable.
            dead = ~alive
            if bool(new[h][dead].any()) or bool(new[h + 1][:, dead].any()):
                new[h] &= alive[:, None]
                new[h + 1] &= alive[None, :]
                changed = True
    removed = [b - int(m.sum().item()) for b, m in zip(before, new)]
    active = [
        float((new[h].any(dim=1) & new[h + 1].any(dim=0)).float().mean().item()) for h in range(len(new) - 1)
    ]
    return PercolationResult(masks=new, removed=removed, active_fraction=active)


def active_neuron_fraction(
    masks: list[torch.Tensor], chains: list[list[int]], tails: list[int] = ()
) -> float:
    """Fraction of hidden neurons that carry signal.

    Counted: the neurons between consecutive layers of a chain (active with at least one input and one
    output link), and the outputs of the ``tails`` layers, hidden neurons that feed a dense layer such as
    an MLP's classifier head (active with at least one input link).
    """
    alive = total = 0
    for chain in chains:
        for a, b in itertools.pairwise(chain):
            ok = masks[a].any(dim=1) & masks[b].any(dim=0)
            alive += int(ok.sum())
            total += ok.numel()
    for t in tails:
        alive += int(masks[t].any(dim=1).sum())
        total += masks[t].shape[0]
    return alive / total if total else 1.0
