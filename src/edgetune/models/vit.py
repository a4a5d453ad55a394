"""Small Vision Transformer for small images.

Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021): non-overlapping patches embedded by a
strided convolution, learned position embeddings, pre-LN Transformer blocks (shared with
:mod:`edgetune.models.transformer`, so attention is ``q_proj``/``k_proj``/``v_proj``/``out_proj`` and the
feed-forward is ``fc1``/``fc2``), then a class token or the mean of the patch tokens into a linear head.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.models.base import ModelSpec, register_model
from edgetune.models.resnet import image_spec
from edgetune.models.transformer import TransformerBlock, init_transformer_weights

__all__ = ["ViT", "ViTConfig"]

Device = torch.device | str | None


class ViT(nn.Module):
    """``(B, C, H, W) -> (B, K)``; ``features(x) -> (B, dim)``. H and W must be multiples of ``patch_size``."""

    def __init__(
        self,
        image_size: tuple[int, int],
        in_channels: int,
        num_classes: int,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
        dropout: float = 0.0,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        h, w = image_size
        if h % patch_size or w % patch_size:
            raise ConfigError(
                f"image size {h}x{w} is not divisible by patch_size {patch_size}; pick a patch size dividing both"
            )
        n_patches = (h // patch_size) * (w // patch_size)
        self.pool = pool
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size, **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **kw)) if pool == "cls" else None
        self.pos_emb = nn.Parameter(torch.zeros(1, n_patches + (pool == "cls"), dim, **kw))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, dropout, **kw) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, **kw)
        self.feature_dim = dim
        self.head = nn.Linear(dim, num_classes, **kw)
        init_transformer_weights(self, depth)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, dim)`` pooled, normalized token features."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        h = self.drop(tokens + self.pos_emb)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return h[:, 0] if self.cls_token is not None else h.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, K)`` logits."""
        return self.head(self.features(x))


class ViTConfig(Config):
    """patch_size: side of the square patches (must divide H and W); dim/depth/heads: width, blocks and
    attention heads (must divide dim); mlp_ratio: feed-forward hidden size / dim; pool: "cls" token or
    "mean" of patch tokens; dropout: on embeddings, attention and residual branches."""

    patch_size: int = Field(default=4, gt=0)
    dim: int = Field(default=128, gt=0)
    depth: int = Field(default=4, gt=0)
    heads: int = Field(default=4, gt=0)
    mlp_ratio: float = Field(default=2.0, gt=0.0)
    pool: Literal["cls", "mean"] = "cls"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> ViTConfig:
        if self.dim % self.heads:
            raise ValueError(
                f"dim {self.dim} is not divisible by heads {self.heads}; pick heads dividing dim"
            )
        return self


@register_model(
    "vit", config=ViTConfig, summary="small Vision Transformer (patch embedding, cls/mean pooling)"
)
def build_vit(cfg: ViTConfig, spec: ModelSpec, device: Device, dtype: torch.dtype | None) -> ViT:
    """ViT for ``(C, H, W)`` images with H, W multiples of ``patch_size``."""
    c, h, w = image_spec("vit", spec)
    if h % cfg.patch_size or w % cfg.patch_size:
        raise ConfigError(
            f"image size {h}x{w} is not divisible by model.patch_size {cfg.patch_size}; "
            "pick a patch size dividing both sides"
        )
    return ViT(
        (h, w), c, spec.num_classes, patch_size=cfg.patch_size, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio, pool=cfg.pool, dropout=cfg.dropout, device=device, dtype=dtype,
    )  # fmt: skip
