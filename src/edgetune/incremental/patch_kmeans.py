"""Seeded, deterministic k-means on a few hundred patch features, and the box -> foreground split built on it.

:func:`kmeans` is Lloyd's algorithm from a k-means++ start drawn with a seeded generator (same inputs and seed,
same clusters). :func:`box_foreground` is the box-support rule of Swiss DINO (Paramonov et al., IROS 2024,
arXiv 2407.07541): cluster the patches inside the box, let the one-patch ring just outside the box vote, and
keep as foreground the clusters no ring patch falls into.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetune.core.errors import ConfigError, ShapeError

__all__ = ["box_foreground", "box_ring", "kmeans", "kmeans_pp_init"]

log = logging.getLogger(__name__)


def kmeans_pp_init(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: ``x (N, D)`` -> ``k`` distinct rows of ``x`` as centroids ``(k, D)``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    idx = [first]
    d2 = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # every point already sits on a centroid: take the first unused rows
            nxt = next(i for i in range(n) if i not in idx)
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=generator))
        idx.append(nxt)
        d2 = torch.minimum(d2, (x - x[nxt]).square().sum(1))
    return x[idx].clone()


def kmeans(x: Tensor, k: int, *, seed: int = 0, iters: int = 50, init: Tensor | None = None
           ) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means (squared Euclidean). ``x (N, D)`` -> ``(labels (N,) long, centroids (k, D))``.

    ``k`` is clipped to ``N``. ``init (k, D)`` replaces the k-means++ start. Stops when no label changes; an empty
    cluster keeps its previous centroid. Ties go to the lowest cluster index."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ShapeError(f"kmeans needs (N, D) points with N >= 1, got shape {tuple(x.shape)}")
    if k < 1:
        raise ConfigError(f"kmeans k={k}; use k >= 1")
    x = x.double()
    k = min(k, x.shape[0])
    if init is not None:
        centroids = init.double().clone()
        if centroids.shape != (k, x.shape[1]):
            raise ShapeError(f"kmeans init has shape {tuple(init.shape)}, expected ({k}, {x.shape[1]})")
    else:
        centroids = kmeans_pp_init(x, k, torch.Generator().manual_seed(seed))
    labels = torch.full((x.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centroids).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = labels == c
            if members.any():
                centroids[c] = x[members].mean(0)
    return labels, centroids


def box_ring(box: tuple[int, int, int, int], grid: tuple[int, int]) -> Tensor:
    """The one-patch ring just outside a grid box ``(r0, r1, c0, c1)`` (end-exclusive), clipped to the grid:
    a ``(h, w)`` bool mask."""
    r0, r1, c0, c1 = box
    h, w = grid
    ring = torch.zeros(h, w, dtype=torch.bool)
    ring[max(r0 - 1, 0):min(r1 + 1, h), max(c0 - 1, 0):min(c1 + 1, w)] = True
    ring[r0:r1, c0:c1] = False
    return ring


def box_foreground(feats: Tensor, box: tuple[int, int, int, int], k: int = 5, *, seed: int = 0,
                   iters: int = 50) -> Tensor:
    """Foreground patches of a box support. ``feats (D, h, w)``, grid box ``(r0, r1, c0, c1)`` -> ``(h, w)`` bool.

    k-means (``k`` clusters) on the L2-normalized features inside the box; each ring patch (:func:`box_ring`) is
    assigned to its nearest centroid; the clusters so hit are background, the others foreground. When the ring
    is empty (the box covers the grid) or hits every cluster, the whole box is kept (logged)."""
    h, w = feats.shape[1:]
    r0, r1, c0, c1 = box
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
        raise ShapeError(f"grid box {box} is empty or outside the {h}x{w} grid; give (r0, r1, c0, c1) with "
                         f"0 <= r0 < r1 <= {h} and 0 <= c0 < c1 <= {w}")
    z = F.normalize(feats.double(), dim=0)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[r0:r1, c0:c1] = True
    ring = box_ring(box, (h, w))
    pts = z[:, inside].T  # (N_in, D)
    labels, centroids = kmeans(pts, k, seed=seed, iters=iters)
    fg = torch.zeros(h, w, dtype=torch.bool)
    if not ring.any():
        log.info("box covers the whole %dx%d grid: no ring patch, the whole box is the foreground", h, w)
        return inside
    hit = torch.cdist(z[:, ring].T, centroids).argmin(1).unique()
    keep = ~torch.isin(labels, hit)
    if not keep.any():
        log.info("the ring outside the box hit all %d clusters: the whole box is the foreground", centroids.shape[0])
        return inside
    fg[inside] = keep
    return fg
