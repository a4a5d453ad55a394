"""A small plain CNN for small images: ``[conv3x3 -> BN -> ReLU (-> max-pool)] x len(widths)``, global average
pooling, a linear head. With widths 32/64/128 and pooling after the first two blocks it is the backbone of the
research notes' SynGlyph-100 few-shot class-incremental protocol (about 10 s per 5 epochs on 2 CPU cores).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from edgetune.core.config import Config
from edgetune.models.base import ModelSpec, register_model
from edgetune.models.resnet import image_spec

__all__ = ["ConvNet", "ConvNetConfig"]


class ConvNetConfig(Config):
    """widths: output channels of each conv block; pool_blocks: how many of the first blocks end in a 2x2
    max-pool."""

    widths: tuple[Annotated[int, Field(gt=0)], ...] = Field(default=(32, 64, 128), min_length=1)
    pool_blocks: int = Field(default=2, ge=0)


class ConvNet(nn.Module):
    """``(B, C, H, W) -> (B, K)``; ``features(x) -> (B, widths[-1])``."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128),
                 pool_blocks: int = 2, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        blocks: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            blocks += [nn.Conv2d(c, w, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(w, **kw), nn.ReLU()]
            if i < pool_blocks:
                blocks.append(nn.MaxPool2d(2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = c
        self.head = nn.Linear(c, num_classes, **kw)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, D)`` globally average-pooled features."""
        return self.blocks(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("convnet", config=ConvNetConfig, summary="small plain CNN (conv-BN-ReLU blocks, GAP, linear head)")
def build_convnet(cfg: ConvNetConfig, spec: ModelSpec, device: torch.device | str | None,
                  dtype: torch.dtype | None) -> ConvNet:
    c, h, w = image_spec("convnet", spec)
    if cfg.pool_blocks > len(cfg.widths):
        from edgetune.core.errors import ConfigError

        raise ConfigError(f"model.pool_blocks={cfg.pool_blocks} but there are only {len(cfg.widths)} blocks")
    if min(h, w) < 2 ** cfg.pool_blocks:
        from edgetune.core.errors import ConfigError

        raise ConfigError(f"images of {h}x{w} are too small for {cfg.pool_blocks} 2x2 max-pools; lower "
                          "model.pool_blocks")
    return ConvNet(c, spec.num_classes, cfg.widths, cfg.pool_blocks, device=device, dtype=dtype)
