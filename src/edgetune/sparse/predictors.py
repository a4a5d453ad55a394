"""Cannistraci-Hebb link predictors for sparse training: one entry point and weighted sampling.

``link_scores(mask, method)`` scores every candidate link of a layer mask ``(out, in)``:

- ``"ch3_l3"`` / ``"ch2_l3"``: exact path-based CH3-L3 / CH2-L3 (CHT, ICLR 2024), computed with
  batched matmuls (:mod:`edgetune.sparse.predictors_exact`) or, at low density on the CPU, sparse
  products whose cost follows the length-3 paths (:mod:`edgetune.sparse.predictors_paths`);
- ``"ch3_l3n"`` / ``"ch2_l3n"``: node-based approximations (CHTs, NeurIPS 2025), four chunked dense
  matmuls, independent of density (:mod:`edgetune.sparse.predictors_approx`).

Existing links get ``fill_existing`` (0 by default, as in the official code; pass ``float("-inf")``
so that a top-k can never pick them). All functions are pure and run on the mask's device.

``sample_without_replacement`` draws ``k`` entries with probability proportional to non-negative
weights (CHTs soft removal/regrowth) for any number of entries, unlike ``torch.multinomial``, which
refuses more than 2^24 categories.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch

from edgetune.core.errors import ConfigError, did_you_mean
from edgetune.sparse.predictors_approx import ch2_l3n, ch3_l3n
from edgetune.sparse.predictors_exact import ch2_l3, ch3_l3

__all__ = [
    "METHODS",
    "Method",
    "ch2_l3",
    "ch2_l3n",
    "ch3_l3",
    "ch3_l3n",
    "link_scores",
    "sample_without_replacement",
]

log = logging.getLogger(__name__)

Method = Literal["ch3_l3", "ch2_l3", "ch3_l3n", "ch2_l3n"]
_PREDICTORS: dict[str, Callable[..., torch.Tensor]] = {
    "ch3_l3": ch3_l3,
    "ch2_l3": ch2_l3,
    "ch3_l3n": ch3_l3n,
    "ch2_l3n": ch2_l3n,
}
METHODS: tuple[str, ...] = tuple(_PREDICTORS)


def link_scores(
    mask: torch.Tensor,
    method: Method = "ch3_l3",
    *,
    dtype: torch.dtype = torch.float32,
    fill_existing: float = 0.0,
) -> torch.Tensor:
    """Score every candidate link of a layer mask with a Cannistraci-Hebb predictor.

    Args:
        mask: ``(O, I)`` mask in ``nn.Linear`` layout (bool; non-zero = link), any device.
        method: one of :data:`METHODS`.
        dtype: result dtype; float64 matches the definitions to ~1e-15, float32 is ~2x faster.
        fill_existing: score written on existing links.

    Returns:
        ``(O, I)`` scores on the mask's device; candidates without a length-3 path score 0.
    """
    if method not in _PREDICTORS:
        raise ConfigError(
            f"unknown link predictor {method!r}; choose one of {', '.join(METHODS)}."
            + did_you_mean(method, METHODS)
        )
    return _PREDICTORS[method](mask, dtype=dtype, fill_existing=fill_existing)


def sample_without_replacement(
    scores: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int = 2**22,
) -> torch.Tensor:
    """Draw ``k`` distinct entries of ``scores`` with probability proportional to their values.

    Same law as ``k`` successive draws without replacement, each proportional to the remaining
    weights (exponential race / Gumbel-top-k: keys ``log w + Gumbel``, keep the ``k`` largest;
    Efraimidis & Spirakis 2006). Zero-weight entries are never drawn. The entries are processed in
    chunks of ``chunk_size`` with a running top-k, so any number of entries works and the extra memory
    is ``O(chunk_size + k)``.

    Args:
        scores: non-negative weights of any shape (e.g. ``(O, I)`` CH scores with 0 on existing links).
        k: number of entries to draw, ``0 <= k <=`` number of positive entries.
        generator: random generator on ``scores.device`` (None: the global one).
        chunk_size: entries per chunk.

    Returns:
        ``(k,)`` int64 flat indices into ``scores.reshape(-1)``, in draw order (the first ``j`` are
        themselves a draw of size ``j``).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"k must be a non-negative integer (number of entries to draw), got {k!r}.")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size!r}.")
    flat = scores.detach().reshape(-1)
    if not flat.dtype.is_floating_point:
        flat = flat.float()
    bad = ~torch.isfinite(flat) | (flat < 0)
    if bool(bad.any()):
        raise ValueError(
            f"sampling weights must be finite and >= 0; found {int(bad.sum())} invalid entries "
            f"(e.g. {flat[bad][0].item()!r}). Use fill_existing=0 (not -inf) for scores you sample from."
        )
    positive = int((flat > 0).sum())
    if k > positive:
        raise ValueError(
            f"cannot draw k={k} distinct entries: only {positive} of {flat.numel()} have positive weight. "
            "Draw at most that many and fill the rest with another rule (e.g. uniform among candidates)."
        )
    key_dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(key_dtype).tiny
    best_keys = torch.empty(0, dtype=key_dtype, device=flat.device)
    best_idx = torch.empty(0, dtype=torch.long, device=flat.device)
    if k == 0:
        return best_idx
    for start in range(0, flat.numel(), chunk_size):
        w = flat[start : start + chunk_size].to(key_dtype)
        u = torch.rand(w.numel(), generator=generator, dtype=key_dtype, device=w.device).clamp_min_(tiny)
        keys = w.log() - u.log().neg_().log_()  # log w + Gumbel(0, 1); -inf where w == 0
        top = torch.topk(keys, min(k, keys.numel()))
        keys = torch.cat([best_keys, top.values])
        idx = torch.cat([best_idx, top.indices + start])
        top = torch.topk(keys, min(k, keys.numel()))  # running top-k across chunks, sorted by key
        best_keys, best_idx = top.values, idx[top.indices]
    return best_idx
