"""Moment pooling: mean, standard deviation and higher standardized moments over tokens or positions.

One operator serves two methods: HOP (Michieli & Ozay, AAAI 2024, arXiv 2402.18449) pools the token
features of a frozen text encoder into ``[m_1; m_2; ...]`` instead of the [CLS] vector, and the
object-conditioned bag of instances (OBoI, Michieli et al., ICASSP 2024, arXiv 2404.01397) pools a feature
map's spatial positions the same way ("multi-order statistics").

For features ``h_1..h_L`` (positions where ``mask`` is true), per channel:

- order 1: the mean ``mu = mean_i h_i``;
- order 2: the standard deviation ``sigma = sqrt(mean_i (h_i - mu)^2)`` (population, no Bessel correction);
- order k >= 3: the standardized moment ``mean_i ((h_i - mu) / sigma)^k`` (skewness for 3, kurtosis for 4).

The papers' exact normalisation of the higher orders could not be confirmed (research notes, §1.2 and §1.5),
so two choices are options: ``standardize=False`` gives raw central moments ``mean_i (h_i - mu)^k`` (order 2
then stays the standard deviation), and ``block_norm=True`` L2-normalizes each order's block before the
blocks are concatenated (so one order cannot dominate a cosine similarity by scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from edgetune.core.errors import ConfigError, ShapeError

__all__ = ["check_orders", "moment_pool"]


def check_orders(orders: Sequence[int]) -> tuple[int, ...]:
    """Validate moment orders: distinct integers >= 1, kept in the given order."""
    out = tuple(orders)
    if not out:
        raise ConfigError("moment pooling needs at least one order, e.g. orders=[1, 2] (mean and std)")
    bad = [o for o in out if isinstance(o, bool) or not isinstance(o, int) or o < 1]
    if bad:
        raise ConfigError(f"moment orders must be integers >= 1 (1 mean, 2 std, 3 skewness, ...), got {bad}")
    if len(set(out)) != len(out):
        raise ConfigError(f"moment orders repeat: {list(out)}; list each order once")
    return out


def _dims(h: Tensor, dim: int | Sequence[int]) -> tuple[int, ...]:
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims:
        raise ShapeError("moment pooling needs at least one dimension to pool over")
    out = tuple(sorted(d % h.ndim for d in dims))
    if 0 in out:
        raise ShapeError(f"dim {dim} pools over the batch dimension 0 of a {tuple(h.shape)} tensor; pool over "
                         "tokens (dim=1 of (B, L, D)) or positions (dim=(2, 3) of (B, C, H, W))")
    if len(set(out)) != len(out):
        raise ShapeError(f"dim {dim} names a dimension twice")
    return out


def moment_pool(
    h: Tensor,
    dim: int | Sequence[int] = 1,
    orders: Sequence[int] = (1, 2),
    mask: Tensor | None = None,
    *,
    standardize: bool = True,
    block_norm: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Pool ``h`` over ``dim`` into ``(B, len(orders) * D)``: one block of D per order, in ``orders``' order.

    h: ``(B, L, D)`` token features with ``dim=1``, or ``(B, C, H, W)`` feature maps with ``dim=(2, 3)``
        (then D = C); any layout works as long as the dimensions left after pooling are ``(B, D)``.
    mask: which positions count, broadcastable to h without its channel dimension, e.g. ``(B, L)`` for
        tokens (an attention mask with [CLS] and padding zeroed) or ``(B, H, W)`` for a region; None: all.
    eps: floor of sigma (a constant channel gives ~0 and finite gradients, not NaN).
    Computed in float32 at least (bf16 inputs lose the higher moments otherwise), returned in h's dtype.
    """
    orders = check_orders(orders)
    dims = _dims(h, dim)
    x = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    if mask is None:
        w = torch.ones((), dtype=x.dtype, device=x.device)
        count = torch.tensor(float(torch.Size([h.shape[d] for d in dims]).numel()), dtype=x.dtype,
                             device=x.device)
    else:
        # the mask lacks the channel dimension: it is the one dimension of h that is neither pooled nor batch
        kept = [d for d in range(h.ndim) if d not in dims and d != 0]
        if len(kept) != 1:
            raise ShapeError(f"a mask needs h to keep exactly one channel dimension after pooling, got "
                             f"{tuple(h.shape)} pooled over {dims}")
        m = mask.to(device=x.device, dtype=x.dtype).unsqueeze(kept[0])
        try:
            w = torch.broadcast_to(m, x.shape)
        except RuntimeError as err:
            raise ShapeError(f"mask of shape {tuple(mask.shape)} does not fit features {tuple(h.shape)}: give "
                             "(B, L) for (B, L, D) tokens or (B, H, W) for (B, C, H, W) maps") from err
        count = w.sum(dim=dims)
        if bool((count == 0).any()):
            empty = torch.nonzero(count.reshape(count.shape[0], -1)[:, 0] == 0).flatten().tolist()
            raise ShapeError(f"mask selects no position for example(s) {empty[:5]}: every example needs at least "
                             "one token or position to pool")
    mean = (x * w).sum(dim=dims, keepdim=True) / _keep(count, dims, mask is None)
    blocks: list[Tensor] = []
    centred = x - mean
    sigma = None
    for k in orders:
        if k == 1:
            block = mean
        else:
            if sigma is None:
                var = (centred.square() * w).sum(dim=dims, keepdim=True) / _keep(count, dims, mask is None)
                # floored: sqrt'(0) is infinite, so a constant channel (real encoders have some) would send NaN
                # gradients back through the mean; the floor moves sigma by at most eps
                sigma = var.clamp_min(eps * eps).sqrt()
            if k == 2:
                block = sigma
            else:
                z = centred / sigma.clamp_min(eps) if standardize else centred
                block = (z.pow(k) * w).sum(dim=dims, keepdim=True) / _keep(count, dims, mask is None)
        block = block.flatten(1)  # (B, D): the pooled dims have size 1, the channel dim remains
        blocks.append(torch.nn.functional.normalize(block, dim=1) if block_norm else block)
    return torch.cat(blocks, dim=1).to(h.dtype)


def _keep(count: Tensor, dims: tuple[int, ...], scalar: bool) -> Tensor:
    if scalar:
        return count
    for d in dims:
        count = count.unsqueeze(d)
    return count
