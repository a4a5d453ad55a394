"""Patch-feature extractors for training-free object search: images ``(B, 3, H, W) -> (B, D, h, w)`` grids.

Two kinds, both frozen (eval mode, no gradients):

- :class:`ConvPatches` cuts a convolutional trunk at a chosen stage. :func:`mobilenet_v2_patches` builds it on
  ImageNet MobileNetV2 (``edgetune.models.pretrained.load_pretrained("mobilenet-v2")``): stride 16 is the output
  of ``features[:14]`` (96 channels, after the last stride-16 block), stride 32 the output of ``features[:19]``
  (1280 channels, the last 1x1 conv), so a 448 x 448 input gives a 28 x 28 or a 14 x 14 grid.
- :class:`TokenPatches` reshapes the patch tokens of any ViT: edgetune's own :class:`~edgetune.models.vit.ViT`
  (:func:`vit_patches`) or a Hugging Face ViT/DINOv2 (:func:`hf_vit_patches`, ``last_hidden_state`` without its
  prefix tokens).

Every extractor has ``image_size`` (the square side inputs are resized to), ``stride`` and ``grid``
(``image_size // stride``); inputs are uint8 (0..255) or float in [0, 1], resized (bilinear, antialiased) and
normalized with ImageNet's mean and std unless ``mean``/``std`` are None. The grids are not normalized; callers
L2-normalize along ``D``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.core.errors import ConfigError, ShapeError

__all__ = ["MOBILENET_STAGES", "ConvPatches", "PatchExtractor", "TokenPatches", "hf_vit_patches",
           "mobilenet_v2_patches", "prepare_images", "vit_patches"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: stride -> number of leading ``features`` modules of MobileNetV2 giving that output stride
MOBILENET_STAGES = {8: 7, 16: 14, 32: 19}


def prepare_images(images: Tensor, size: int, mean: Sequence[float] | None = IMAGENET_MEAN,
                   std: Sequence[float] | None = IMAGENET_STD) -> Tensor:
    """uint8 or [0, 1] float ``(B, 3, H, W)`` (or one ``(3, H, W)``) -> float32 ``(B, 3, size, size)``, normalized."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ShapeError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}; convert an (H, W, 3) "
                         "array with torch.as_tensor(a).permute(2, 0, 1)")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - m) / s
    return x


class PatchExtractor(nn.Module):
    """Base of the extractors: resizing/normalization, eval mode and no-grad around :meth:`grid_features`."""

    def __init__(self, image_size: int, stride: int, mean: Sequence[float] | None = IMAGENET_MEAN,
                 std: Sequence[float] | None = IMAGENET_STD) -> None:
        super().__init__()
        if image_size % stride:
            raise ConfigError(f"image_size {image_size} is not a multiple of the stride {stride}; use a multiple "
                              f"such as {max(stride, image_size // stride * stride)}")
        self.image_size, self.stride = int(image_size), int(stride)
        self.mean, self.std = mean, std

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the output grid."""
        return self.image_size // self.stride, self.image_size // self.stride

    def grid_features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Preprocessed ``(B, 3, S, S) -> (B, D, h, w)``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> PatchExtractor:
        """Always eval mode: the extractor is frozen (batch-norm statistics and dropout never change)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """uint8 / [0, 1] ``(B, 3, H, W) -> (B, D, h, w)``."""
        device = next(self.parameters()).device
        x = prepare_images(images.to(device), self.image_size, self.mean, self.std)
        out = self.grid_features(x)
        if out.shape[-2:] != self.grid:
            raise ShapeError(f"{type(self).__name__} gave a {tuple(out.shape[-2:])} grid for {self.image_size} px "
                             f"inputs, expected {self.grid}; check the stride ({self.stride})")
        return out.float()


class ConvPatches(PatchExtractor):
    """A convolutional trunk's feature map as the patch grid: ``trunk((B, 3, S, S)) -> (B, D, S/stride, S/stride)``."""

    def __init__(self, trunk: nn.Module, stride: int, image_size: int = 448, **norm: Any) -> None:
        super().__init__(image_size, stride, **norm)
        self.trunk = trunk.requires_grad_(False)
        self.train(False)

    def grid_features(self, x: Tensor) -> Tensor:
        return self.trunk(x)


def mobilenet_v2_patches(stride: int = 16, image_size: int = 448, model: nn.Module | None = None) -> ConvPatches:
    """MobileNetV2's feature map at output ``stride`` (8: 32 channels, 16: 96, 32: 1280) as a patch extractor.

    ``model``: a :class:`~edgetune.models.pretrained.MobileNetV2` (or anything with the same ``.features``); None
    loads the ImageNet network (``load_pretrained("mobilenet-v2")``; DataError with the install command when its
    package is missing)."""
    if stride not in MOBILENET_STAGES:
        raise ConfigError(f"stride={stride} for MobileNetV2 patches; use one of {sorted(MOBILENET_STAGES)}")
    if model is None:
        from edgetune.models.pretrained import load_pretrained

        model = load_pretrained("mobilenet-v2").model
    features = model.features
    trunk = nn.Sequential(*list(features.children())[:MOBILENET_STAGES[stride]])
    return ConvPatches(trunk, stride, image_size)


class TokenPatches(PatchExtractor):
    """Patch tokens of a ViT as a grid. ``tokens((B, 3, S, S)) -> (B, prefix + h * w, D)``; the first ``prefix``
    tokens (class / register tokens) are dropped and the rest reshaped row-major to ``(B, D, h, w)``."""

    def __init__(self, tokens: Callable[[Tensor], Tensor], module: nn.Module, patch_size: int, image_size: int,
                 prefix: int = 1, **norm: Any) -> None:
        super().__init__(image_size, patch_size, **norm)
        self.module = module.requires_grad_(False)
        self._tokens = tokens
        self.prefix = int(prefix)
        self.train(False)

    def grid_features(self, x: Tensor) -> Tensor:
        t = self._tokens(x)
        h, w = self.grid
        if t.dim() != 3 or t.shape[1] != self.prefix + h * w:
            raise ShapeError(f"the ViT gave tokens of shape {tuple(t.shape)}, expected (B, {self.prefix} + {h}*{w}, D)"
                             "; check patch_size, image_size and prefix (class/register tokens)")
        return t[:, self.prefix:].transpose(1, 2).reshape(t.shape[0], -1, h, w)  # (B, N, D) -> (B, D, h, w)


def _edgetune_vit_tokens(vit: nn.Module) -> Callable[[Tensor], Tensor]:
    def tokens(x: Tensor) -> Tensor:
        t = vit.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        if vit.cls_token is not None:
            t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        h = t + vit.pos_emb
        for block in vit.blocks:
            h = block(h)
        return vit.norm(h)
    return tokens


def vit_patches(vit: nn.Module, image_size: int, mean: Sequence[float] | None = IMAGENET_MEAN,
                std: Sequence[float] | None = IMAGENET_STD) -> TokenPatches:
    """Patch tokens of edgetune's :class:`~edgetune.models.vit.ViT` (built for ``image_size`` x ``image_size``
    inputs; its position embeddings fix the grid)."""
    patch = int(vit.patch_embed.stride[0])
    n = vit.pos_emb.shape[1] - (vit.cls_token is not None)
    if (image_size // patch) ** 2 != n:
        raise ConfigError(f"image_size {image_size} gives {(image_size // patch) ** 2} patches but the ViT has position "
                          f"embeddings for {n}; use the image size the ViT was built for")
    return TokenPatches(_edgetune_vit_tokens(vit), vit, patch, image_size, prefix=int(vit.cls_token is not None),
                        mean=mean, std=std)


def hf_vit_patches(model: nn.Module, image_size: int = 448, patch_size: int | None = None,
                   prefix: int | None = None) -> TokenPatches:
    """A Hugging Face ViT / DINOv2 model (``model(pixel_values=...).last_hidden_state``) as a patch extractor.

    ``patch_size`` and ``prefix`` (class + register tokens) default to the model config's ``patch_size`` and
    ``1 + num_register_tokens``. DINOv2 interpolates its position embeddings, so any multiple of the patch works."""
    cfg = getattr(model, "config", None)
    patch = patch_size or getattr(cfg, "patch_size", None)
    if patch is None:
        raise ConfigError("the model has no config.patch_size; pass patch_size=")
    n_prefix = prefix if prefix is not None else 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)

    def tokens(x: Tensor) -> Tensor:
        return model(pixel_values=x).last_hidden_state

    return TokenPatches(tokens, model, int(patch), image_size, prefix=n_prefix)
