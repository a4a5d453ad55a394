"""Train-only image augmentation applied per batch on the device: random crop with zero padding, horizontal flip.

The standard CIFAR recipe (He et al. 2016, "Deep residual learning", section 4.2; used by the few-shot
class-incremental CIFAR-100 protocol): pad 4 pixels on each side, take a random 32x32 crop, flip left-right with
probability 0.5. :class:`CropFlip` does both in one gather over a ``(B, C, H, W)`` batch, after the pixels are
converted to float and before a model's own normalization (so padding is black, as torchvision pads a PIL image);
after ``data.normalize`` it pads with normalised black, ``-mean / std`` per channel, to the same effect.

The offsets and flips are drawn from torch's global CPU generator, whose state the training checkpoints keep: a
resumed run draws the very same crops. Validation and test batches are never augmented.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.data.batches import Batch, map_images

__all__ = ["AugmentConfig", "CropFlip", "build_augment"]


class AugmentConfig(Config):
    """``data.augment``: train-only augmentation of image batches ``(B, C, H, W)``.

    crop_padding: pad this many zero pixels on each side, then crop back to ``H x W`` at a random offset
        (0: no crop). CIFAR's standard is 4.
    hflip: flip each image left-right with probability 0.5.
    """

    crop_padding: int = Field(default=0, ge=0)
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip


class CropFlip:
    """Random crop (zero padding ``padding``) and optional horizontal flip of a list batch's images ``(B, C, H, W)``
    or a dict batch's ``key`` column; other columns pass through."""

    def __init__(self, padding: int = 4, hflip: bool = True, key: str = "pixel_values",
                 fill: Tensor | None = None) -> None:
        if padding < 0:
            raise ConfigError(f"crop padding must be >= 0, got {padding}")
        self.padding = int(padding)
        self.hflip = bool(hflip)
        self.key = key
        self.fill = fill

    def _apply(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ConfigError(f"data.augment works on image batches (B, C, H, W); got a batch of shape "
                              f"{tuple(x.shape)}. Remove data.augment for this dataset.")
        b, _, h, w = x.shape
        p = self.padding
        # offsets and flips on the CPU generator (checkpointed), then moved to the batch's device
        dy = torch.randint(0, 2 * p + 1, (b,))
        dx = torch.randint(0, 2 * p + 1, (b,))
        flip = torch.rand(b) < 0.5 if self.hflip else torch.zeros(b, dtype=torch.bool)
        cols = torch.arange(w)
        cols = torch.where(flip[:, None], cols.flip(0)[None, :], cols[None, :]) + dx[:, None]  # (B, W)
        rows = torch.arange(h)[None, :] + dy[:, None]  # (B, H)
        if p and self.fill is not None:  # per-channel padding value (normalised black)
            fill = self.fill.to(x.device, x.dtype).view(1, -1, 1, 1)
            padded = fill.expand(b, x.shape[1], h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
        else:
            padded = torch.nn.functional.pad(x, (p, p, p, p)) if p else x  # (B, C, H+2p, W+2p)
        dev = x.device
        bi = torch.arange(b, device=dev)[:, None, None]
        out = padded[bi, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()

    def __call__(self, batch: Batch) -> Batch:
        return map_images(batch, self.key, self._apply)

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, hflip={self.hflip})"


def build_augment(cfg: AugmentConfig | None, input_shape: tuple[int, ...], fill: Tensor | None = None) -> CropFlip | None:
    """The train-only transform for ``data.augment`` on a dataset whose examples have ``input_shape``;
    ``fill`` ``(C,)``: the padding value per channel (the bundle's normalised black), zeros when None."""
    if cfg is None or not cfg.active:
        return None
    if len(input_shape) != 3:
        raise ConfigError(f"data.augment needs image inputs (C, H, W); this dataset's examples have shape "
                          f"{tuple(input_shape)}. Remove data.augment, or use an image dataset.")
    h, w = input_shape[1:]
    if cfg.crop_padding >= min(h, w):
        raise ConfigError(f"data.augment.crop_padding={cfg.crop_padding} is not smaller than the images "
                          f"({h}x{w}); CIFAR's standard is 4.")
    return CropFlip(cfg.crop_padding, cfg.hflip, fill=fill)
