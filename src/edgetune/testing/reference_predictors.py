"""Brute-force references for the Cannistraci-Hebb link predictors (tests only, written for clarity).

A mask ``(out, in)`` is a bipartite graph: output node ``a`` and input node ``k`` are linked iff
``mask[a, k]``. For a candidate (non-link) ``(a, k)`` every path of length 3 is ``a - i - b - k`` with
``i`` an input node linked to ``a``, ``b`` an output node linked to ``k`` and ``mask[b, i]``
(spec ``research/cht-spec.md`` §1.0-1.3). Everything is explicit Python loops in float64: no matrix
algebra, so these functions check the fast predictors instead of repeating their derivation.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reference_node_scores", "reference_path_scores"]


def _neighbours(mask: torch.Tensor) -> tuple[list[set[int]], list[set[int]]]:
    """Neighbour sets: ``out_nbrs[a]`` = input nodes of output ``a``; ``in_nbrs[k]`` = outputs of ``k``."""
    m = mask.detach().to("cpu", torch.bool).tolist()
    n_out, n_in = len(m), len(m[0]) if m else 0
    out_nbrs = [{k for k in range(n_in) if m[a][k]} for a in range(n_out)]
    in_nbrs = [{a for a in range(n_out) if m[a][k]} for k in range(n_in)]
    return out_nbrs, in_nbrs


def reference_path_scores(mask: torch.Tensor, model: str) -> torch.Tensor:
    """Path-based CH scores by enumerating every length-3 path (``model`` = "ch3" or "ch2").

    For path ``a - i - b - k`` the local-community (LC) degrees of the two intermediates are
    ``di(i) = |N(i) ∩ N(k)|``, ``de(i) = deg(i) - 1 - di(i)`` and ``di(b) = |N(b) ∩ N(a)|``,
    ``de(b) = deg(b) - 1 - di(b)``. Per-path term: CH3 ``1 / sqrt((1+de(i))(1+de(b)))``;
    CH2 ``sqrt((1+di(i))(1+di(b))) / sqrt((1+de(i))(1+de(b)))``. Existing links score 0.

    Returns float64 scores of shape ``(out, in)`` on the CPU.
    """
    out_nbrs, in_nbrs = _neighbours(mask)
    n_out, n_in = mask.shape
    scores = torch.zeros(n_out, n_in, dtype=torch.float64)
    for a in range(n_out):
        for k in range(n_in):
            if k in out_nbrs[a]:
                continue  # existing link: not a candidate
            total = 0.0
            for i in out_nbrs[a]:  # a - i
                for b in in_nbrs[i]:  # i - b
                    if b == a or k not in out_nbrs[b]:  # b - k must be a link; path must be simple
                        continue
                    di_i = len(in_nbrs[i] & in_nbrs[k])
                    de_i = len(in_nbrs[i]) - 1 - di_i
                    di_b = len(out_nbrs[b] & out_nbrs[a])
                    de_b = len(out_nbrs[b]) - 1 - di_b
                    if model == "ch3":
                        total += 1.0 / math.sqrt((1 + de_i) * (1 + de_b))
                    elif model == "ch2":
                        total += math.sqrt((1 + di_i) * (1 + di_b)) / math.sqrt((1 + de_i) * (1 + de_b))
                    else:
                        raise ValueError(f"unknown model {model!r}")
            scores[a, k] = total
    return scores


def reference_node_scores(mask: torch.Tensor, model: str) -> torch.Tensor:
    """Node-based CH-L3n scores (CHTs approximation) by summing over intermediate nodes.

    ``score(a, k) = Σ_{b ∈ N(k), cn(a,b) > 0} f(cn(a,b), e(a,b))``
    ``+ Σ_{i ∈ N(a), cn'(k,i) > 0} f(cn'(k,i), e'(k,i))``
    with ``cn(a, b) = |N(a) ∩ N(b)|``, ``e(a, b) = max(deg(b) - cn(a, b) - 1, 0)`` (and the same on the
    input side); CH3-L3n ``f = 1 / (1 + e)``, CH2-L3n ``f = (1 + cn) / (1 + e)``. Existing links score 0.

    Returns float64 scores of shape ``(out, in)`` on the CPU.
    """
    out_nbrs, in_nbrs = _neighbours(mask)
    n_out, n_in = mask.shape

    def f(cn: int, e: int) -> float:
        if model == "ch3":
            return 1.0 / (1 + e)
        if model == "ch2":
            return (1.0 + cn) / (1 + e)
        raise ValueError(f"unknown model {model!r}")

    scores = torch.zeros(n_out, n_in, dtype=torch.float64)
    for a in range(n_out):
        for k in range(n_in):
            if k in out_nbrs[a]:
                continue
            total = 0.0
            for b in in_nbrs[k]:  # output nodes linked to k
                cn = len(out_nbrs[a] & out_nbrs[b])
                if cn > 0:
                    total += f(cn, max(len(out_nbrs[b]) - cn - 1, 0))
            for i in out_nbrs[a]:  # input nodes linked to a
                cn = len(in_nbrs[k] & in_nbrs[i])
                if cn > 0:
                    total += f(cn, max(len(in_nbrs[i]) - cn - 1, 0))
            scores[a, k] = total
    return scores
