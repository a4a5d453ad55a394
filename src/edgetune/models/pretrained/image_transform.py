"""Per-batch image preprocessing a pretrained vision network expects: scale, channels, size, normalization.

Applied on the device after the batch is moved there, so datasets stay compact (uint8) in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetune.core.errors import ShapeError
from edgetune.data.batches import Batch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, RGB -> grey
PIXEL_KEY = "pixel_values"


class ImageTransform:
    """Turn raw image batches into what a network was trained on.

    Steps, in order: uint8 -> float in [0, 1] (``x / 255``; float input is assumed already in [0, 1]);
    channels to ``channels`` (grey repeated to RGB, RGB to grey by luminance); bilinear antialiased resize
    to ``size x size``; ``(x - mean) / std`` per channel. Any step whose argument is None is skipped.

    Called on a list batch ``[x, y, ...]`` it transforms ``x`` (the first tensor) and returns the others
    unchanged; on a dict batch it transforms ``"pixel_values"``. ``x`` is ``(B, C, H, W)`` with C = 1 or 3,
    or ``(B, H, W)`` (grey); the result is float32 ``(B, channels, size, size)``.
    """

    def __init__(
        self,
        size: int | None = None,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if size is not None and size < 1:
            raise ShapeError(f"image size must be a positive number of pixels, got {size}")
        if channels not in (None, 1, 3):
            raise ShapeError(f"channels must be 1 or 3, got {channels}")
        if (mean is None) != (std is None):
            raise ShapeError("give both mean and std (one value per channel), or neither")
        if mean is not None and std is not None:
            if len(mean) != len(std):
                raise ShapeError(f"mean has {len(mean)} values but std has {len(std)}; give one per channel")
            if any(s <= 0 for s in std):
                raise ShapeError(f"std values must be positive, got {tuple(std)}")
        self.size = size
        self.channels = channels
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, channels={self.channels}, mean={self.mean}, std={self.std})"

    def images(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` or ``(B, H, W)`` uint8/float -> float32 ``(B, channels, size, size)``."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ShapeError(
                f"image batch has shape {tuple(x.shape)}; expected (B, C, H, W) with C = 1 or 3, or (B, H, W). "
                "Channels-last images (B, H, W, C) must be permuted with x.permute(0, 3, 1, 2) first."
            )
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = self._channels(x)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        if self.mean is not None and self.std is not None:
            if len(self.mean) != x.shape[1]:
                raise ShapeError(
                    f"normalization has {len(self.mean)} channels but the images have {x.shape[1]}; set channels="
                    f"{len(self.mean)} so images are converted first"
                )
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def _channels(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if self.channels is None or c == self.channels:
            return x
        if c == 1:
            return x.expand(-1, 3, -1, -1).contiguous()  # (B, 1, H, W) -> (B, 3, H, W)
        luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * luma).sum(dim=1, keepdim=True)  # (B, 3, H, W) -> (B, 1, H, W)

    def __call__(self, batch: Batch) -> Batch:
        if isinstance(batch, dict):
            if PIXEL_KEY not in batch:
                raise ShapeError(f"dict batch has no {PIXEL_KEY!r} key (keys: {sorted(batch)})")
            out = dict(batch)
            out[PIXEL_KEY] = self.images(batch[PIXEL_KEY])
            return out
        return [self.images(batch[0]), *batch[1:]]
