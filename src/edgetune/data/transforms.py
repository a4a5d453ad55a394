"""Per-batch transforms that datasets attach to their bundle (``DataBundle.transform``).

The training loop moves each batch to the device and then calls the bundle's transform on it, so data
stay compact in memory (uint8 pixels, padded token ids) and the conversion runs on the device per batch.

- :class:`ToFloat`: uint8 (or other integer) images ``(B, C, H, W)`` -> float32 divided by ``divisor``
  (``255`` gives [0, 1]); float input passes through unchanged, so applying it twice is harmless.
- :class:`Normalize`: float images ``(B, C, H, W)`` -> ``(x - mean[c]) / std[c]`` per channel (``data.normalize``,
  after :class:`ToFloat`, as torchvision's ``Normalize`` after ``ToTensor``).
- :class:`TrimPadding`: cuts the padded token columns of a dict batch ``(B, T) -> (B, T')`` to the span
  its attention mask actually uses, so a batch of short texts runs as short sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from edgetune.data.batches import Batch, map_images

__all__ = ["Normalize", "ToFloat", "TrimPadding"]


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
        return map_images(batch, self.key, self._convert)

    def __repr__(self) -> str:
        return f"ToFloat(divisor={self.divisor:g}, key={self.key!r})"


class Normalize:
    """Float images ``(B, C, H, W)`` to ``(x - mean[c]) / std[c]``: a list batch's first tensor, or a dict
    batch's ``key``. ``mean`` and ``std`` hold one value per channel, or one value for every channel.

    ``black`` is what a zero pixel becomes, ``-mean / std`` per channel ``(C,)``: augmentation that runs after
    this transform pads with it, so padding stays black as when it runs before.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], key: str = "pixel_values") -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values and std {len(std)}; give one of each per channel (or "
                             "one of each for every channel)")
        if len(mean) == 0:
            raise ValueError("Normalize needs at least one mean and one std")
        if any(not s > 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32)
        self.key = key

    @property
    def black(self) -> Tensor:
        return -self.mean / self.std

    def _apply(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"Normalize works on float image batches (B, C, H, W); got {x.dtype} {tuple(x.shape)}")
        c = x.shape[1]
        if len(self.mean) not in (1, c):
            raise ValueError(f"Normalize has {len(self.mean)} values per statistic for {c}-channel images")
        shape = (1, -1, 1, 1)
        mean = self.mean.to(x.device, x.dtype).view(shape)
        std = self.std.to(x.device, x.dtype).view(shape)
        return (x - mean) / std

    def __call__(self, batch: Batch) -> Batch:
        return map_images(batch, self.key, self._apply)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


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
