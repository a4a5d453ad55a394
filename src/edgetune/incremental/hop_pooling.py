"""HOP's pure functions (:mod:`edgetune.incremental.hop`): which tokens count, how they are pooled (moments without
[CLS], or the [CLS] vector for the ablation), and how a problem is picked when none is named at test."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.pooling import moment_pool

__all__ = ["content_mask", "hop_features", "select_problem"]


def content_mask(input_ids: Tensor, attention_mask: Tensor, cls_token_id: int | None) -> Tensor:
    """``(B, L)`` bool: the real tokens (``attention_mask`` set) that are not the [CLS] token.

    Found by id, not position, so left and right padding both work; ``cls_token_id=None`` drops nothing.
    """
    keep = attention_mask.ne(0)
    if cls_token_id is not None:
        keep = keep & input_ids.ne(cls_token_id)
    return keep


def hop_features(hidden: Tensor, mask: Tensor, pool: str, orders: Sequence[int] = (1, 2), *,
                 cls_index: Tensor | None = None, standardize: bool = True) -> Tensor:
    """Pool token features ``hidden (B, L, D)`` into ``(B, len(orders) * D)`` (``moments``) or ``(B, D)`` (``cls``).

    mask: ``(B, L)`` the tokens that count for the moments (:func:`content_mask`). cls_index: ``(B,)`` position of
    each example's [CLS] token for ``pool="cls"`` (None: position 0).
    """
    if hidden.ndim != 3:
        raise ShapeError(f"token features must be (B, L, D), got {tuple(hidden.shape)}")
    if pool == "cls":
        idx = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device) if cls_index is None else cls_index
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if pool != "moments":
        raise ConfigError(f"unknown pool {pool!r}; choose moments or cls")
    return moment_pool(hidden, 1, orders, mask, standardize=standardize)


def select_problem(probs: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """Task-agnostic prediction from every problem's class probabilities ``probs (K, B, C)``.

    Returns ``(labels (B,), chosen problem (B,))``; ``average`` chooses no problem (``-1``).
    """
    if probs.ndim != 3:
        raise ShapeError(f"probabilities must be (problems K, examples B, classes C), got {tuple(probs.shape)}")
    if rule == "average":
        return probs.mean(0).argmax(1), torch.full(probs.shape[1:2], -1, dtype=torch.long, device=probs.device)
    if rule == "confidence":
        chosen = probs.amax(2).argmax(0)  # (B,)
    elif rule == "entropy":
        chosen = (probs * probs.clamp_min(1e-12).log()).sum(2).argmax(0)  # lowest entropy = highest sum p log p
    else:
        raise ConfigError(f"unknown select rule {rule!r}; choose confidence, entropy or average")
    labels = probs[chosen, torch.arange(probs.shape[1], device=probs.device)].argmax(1)
    return labels, chosen
