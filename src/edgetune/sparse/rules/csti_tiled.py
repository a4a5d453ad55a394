"""CSTI on every layer, as the official CHT/CHTs MLP code builds it (``--self_correlated_sparse --dim 2``).

The official scheduler computes the Pearson correlation ``C`` ``(F, F)`` of the ``F`` input features once,
zeroes its diagonal, tiles it into a ``(dim·F, dim·F)`` block matrix and gives *every* sparse layer the
top-``n`` entries of ``|tile[:out, :in]|`` as its links: the first layer (``out = dim·F``, ``in = F``) and
the hidden ones (``out = in = dim·F``) alike. Hidden neuron ``a`` thus stands for input feature ``a mod F``
and links to the neurons of the layer below whose features correlate with its own: a topographic,
receptive-field-like network at every depth. The built-in ``csti`` rule applies CSTI only where the
layer's inputs are the data and, by default, falls back to Erdos-Renyi on hidden layers; its option
``hidden=tiled`` is the official construction, implemented here.

Score of link ``(a, b)`` of an ``(out, in)`` layer: ``|C[a mod F, b mod F]|`` (``C`` with zero diagonal);
the ``round(density·out·in)`` largest scores are the links, ties broken at random (the official code keeps
every tie of the threshold, which can overshoot the count). A constant feature scores 0 everywhere.
Recipe: ``sparse.topology=csti sparse.topology_options.hidden=tiled``; the correlation uses at most
``samples`` training inputs (``sparse.topology_options.samples``, default 10,000).
"""

from __future__ import annotations

import torch

from edgetune.core.errors import ShapeError
from edgetune.sparse.topology import input_correlation, link_count

__all__ = ["data_correlation", "tiled_correlated_topology", "tiled_scores"]


def tiled_scores(corr: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """``|corr|`` (diagonal zeroed) tiled to ``(out, in)``: entry ``(a, b)`` = ``|corr[a mod F, b mod F]|``."""
    if corr.dim() != 2 or corr.shape[0] != corr.shape[1]:
        raise ShapeError(f"corr must be a square (F, F) correlation matrix, got shape {tuple(corr.shape)}.")
    f = int(corr.shape[0])
    c = corr.abs().clone()
    c.fill_diagonal_(0.0)
    rows = torch.arange(out_features, device=c.device) % f
    cols = torch.arange(in_features, device=c.device) % f
    return c[rows][:, cols]


def tiled_correlated_topology(
    corr: torch.Tensor, out_features: int, in_features: int, density: float, generator: torch.Generator
) -> torch.Tensor:
    """Bool mask ``(out, in)``: the ``link_count`` largest :func:`tiled_scores`, ties broken at random."""
    n = link_count(out_features, in_features, density)
    score = tiled_scores(corr.to(generator.device), out_features, in_features).reshape(-1)
    perm = torch.randperm(score.numel(), generator=generator, device=generator.device)
    order = torch.argsort(score[perm], descending=True, stable=True)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=generator.device)
    mask[perm[order[:n]]] = True
    return mask.view(out_features, in_features)


def data_correlation(x: torch.Tensor, samples: int) -> torch.Tensor:
    """:func:`~edgetune.sparse.topology.input_correlation` (float64, CPU) of the first ``samples`` rows of
    ``x`` ``(N, ...)`` flattened to ``(N, F)``."""
    flat = x.reshape(x.shape[0], -1)[:samples]
    return input_correlation(flat.double().cpu())
