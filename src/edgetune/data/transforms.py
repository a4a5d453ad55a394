"""Per-batch transforms that datasets attach to their bundle (``DataBundle.transform``).

The training loop moves each batch to the device and then calls the bundle's transform on it, so data
stay compact in memory (uint8 pixels, padded token ids) and the conversion runs on the device per batch.

- :class:`ToFloat`: uint8 (or other integer) images ``(B, C, H, W)`` -> float32 divided by ``divisor``
  (``255`` gives [0, 1]); float input passes through unchanged, so applying it twice is harmless.
- :class:`TrimPadding`: cuts the padded token columns of a dict batch ``(B, T) -> (B, T')`` to the span
  its attention mask actually uses, so a batch of short texts runs as short sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from edgetune.data.batches import Batch

__all__ = ["ToFloat", "TrimPadding"]


class ToFloat:
    """Integer images to float32 ``x / divisor``: a list batch's first tensor, or a dict batch's ``key``.

    divisor: 255 for 8-bit images (values in [0, 1], exactly as dividing a float32 copy by 255.0);
        16 for scikit-learn's digits (0..16). Division, not multiplication by ``1/divisor``, so the
        values are bit-identical to the float data loaders produced before.
    key: the dict-batch column holding the images (Hugging Face vision models read ``pixel_values``).
    """

    def __init__(self, divisor: float = 255.0, key: str = "pixel_values") -> None:
        if divisor <= 0:
            raise ValueError(f"ToFloat divisor must be positive, got {divisor}")
        self.divisor = float(divisor)
        self.key = key

    def _convert(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x
        return x.to(torch.float32).div_(self.divisor)

    def __call__(self, batch: Batch) -> Batch:
        if isinstance(batch, dict):
            if self.key not in batch:
                return batch
            return {**batch, self.key: self._convert(batch[self.key])}
        return [self._convert(batch[0]), *batch[1:]]

    def __repr__(self) -> str:
        return f"ToFloat(divisor={self.divisor:g}, key={self.key!r})"


class TrimPadding:
    """Cut a dict batch's sequence columns to the columns where ``mask_key`` has any real token.

    Works for right or left padding: keeps columns ``first..last`` where any row's mask is set.
    keys: columns ``(B, T)`` to cut alongside the mask (others, e.g. ``labels (B,)``, pass through).
    List batches pass through unchanged.
    """

    def __init__(
        self,
        mask_key: str = "attention_mask",
        keys: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids", "position_ids"),
    ) -> None:
        self.mask_key = mask_key
        self.keys = tuple(keys)

    def __call__(self, batch: Batch) -> Batch:
        if not isinstance(batch, dict) or self.mask_key not in batch:
            return batch
        mask = batch[self.mask_key]  # (B, T)
        used = torch.nonzero(mask.ne(0).any(dim=0)).flatten()  # columns any row uses
        if used.numel() == 0:
            return batch
        lo, hi = int(used[0]), int(used[-1]) + 1
        if lo == 0 and hi == mask.shape[1]:
            return batch
        out = dict(batch)
        for k in self.keys:
            v = batch.get(k)
            if v is not None and v.ndim >= 2 and v.shape[1] == mask.shape[1]:
                out[k] = v[:, lo:hi]
        return out

    def __repr__(self) -> str:
        return f"TrimPadding(mask_key={self.mask_key!r})"
