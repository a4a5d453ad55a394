"""Small-image residual networks: CIFAR ResNet-20 and the few-shot class-incremental ResNet-12.

ResNet-20: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: a 3x3 stem,
three stages of basic blocks at widths 16/32/64 (stride 2 between stages), global average pooling, linear
head. Shortcut "A" subsamples and zero-pads channels (no parameters), "B" uses a 1x1 conv + BN.

ResNet-12: the backbone of TADAM (Oreshkin et al., NeurIPS 2018) used in FSCIL work (e.g. C-FSCIL,
Hersche et al., CVPR 2022): four residual blocks, each three conv3x3-BN-LeakyReLU(0.1) with a 1x1 conv
shortcut, then 2x2 max-pooling; widths 64-160-320-640.

Both expose ``features(x) -> (B, D)`` (after global average pooling), ``feature_dim`` and ``head``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.models.base import ModelSpec, register_model

__all__ = ["CifarResNet", "ResNet12", "ResNet12Config", "ResNet20Config", "image_spec"]

Device = torch.device | str | None


def image_spec(model: str, spec: ModelSpec) -> tuple[int, int, int]:
    """Check that ``spec`` describes image classification and return its ``(C, H, W)``."""
    if spec.task != "classification":
        raise ConfigError(
            f"model {model!r} is an image classifier but the data task is {spec.task!r}; "
            "use model.name=transformer for token tasks"
        )
    if len(spec.input_shape) != 3 or any(d <= 0 for d in spec.input_shape):
        raise ConfigError(
            f"model {model!r} needs image inputs of shape (C, H, W), got input shape {spec.input_shape}; "
            "use model.name=mlp for flat features"
        )
    if spec.num_classes < 1:
        raise ConfigError(f"model {model!r} needs num_classes >= 1, got {spec.num_classes}")
    c, h, w = spec.input_shape
    return c, h, w


def _scaled(base: int, width: float) -> int:
    return max(1, round(base * width))


def _init_conv_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """``(B, C_in, H, W) -> (B, C_out, H/s, W/s)``: two conv3x3-BN with a residual shortcut."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        shortcut: str,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False, **kw)
        self.bn1 = nn.BatchNorm2d(c_out, **kw)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(c_out, **kw)
        self.stride, self.pad = stride, c_out - c_in
        self.proj: nn.Module | None = None
        if shortcut == "B" and (stride != 1 or c_in != c_out):
            self.proj = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False, **kw), nn.BatchNorm2d(c_out, **kw)
            )

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return self.proj(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))  # zero channels both sides
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (6n+2 layers; ``blocks_per_stage=3`` is ResNet-20). ``(B, C, H, W) -> (B, K)``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 3,
        shortcut: str = "A",
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False, **kw)
        self.bn1 = nn.BatchNorm2d(widths[0], **kw)
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c_in, c_out, stride, shortcut, **kw))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = c_in
        self.head = nn.Linear(c_in, num_classes, **kw)
        _init_conv_bn(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, D)`` globally average-pooled features."""
        h = F.relu(self.bn1(self.conv1(x)))
        return self.stages(h).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, K)`` logits."""
        return self.head(self.features(x))


class Res12Block(nn.Module):
    """``(B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))``: 3x conv3x3-BN-LeakyReLU, 1x1 shortcut, max-pool."""

    def __init__(
        self, c_in: int, c_out: int, slope: float, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False, **kw)
        self.bn1 = nn.BatchNorm2d(c_out, **kw)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(c_out, **kw)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False, **kw)
        self.bn3 = nn.BatchNorm2d(c_out, **kw)
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, bias=False, **kw), nn.BatchNorm2d(c_out, **kw)
        )
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        out = F.leaky_relu(self.bn2(self.conv2(out)), self.slope)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), self.slope)
        return F.max_pool2d(out, 2, ceil_mode=True)  # ceil: 1x1 maps stay 1x1 on tiny inputs


class ResNet12(nn.Module):
    """FSCIL ResNet-12: four :class:`Res12Block` then global average pooling. ``(B, C, H, W) -> (B, K)``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (64, 160, 320, 640),
        slope: float = 0.1,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        chans = [in_channels, *widths]
        self.blocks = nn.Sequential(*(Res12Block(a, b, slope, **kw) for a, b in itertools.pairwise(chans)))
        self.feature_dim = chans[-1]
        self.head = nn.Linear(chans[-1], num_classes, **kw)
        _init_conv_bn(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, D)`` globally average-pooled features."""
        return self.blocks(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, K)`` logits."""
        return self.head(self.features(x))


class ResNet20Config(Config):
    """width: multiplier of the stage widths 16/32/64; shortcut: "A" (subsample + zero-pad) or "B" (1x1 conv)."""

    width: float = Field(default=1.0, gt=0.0, le=64.0)
    shortcut: Literal["A", "B"] = "A"


class ResNet12Config(Config):
    """width: multiplier of the block widths 64/160/320/640; leaky_slope: negative slope of LeakyReLU."""

    width: float = Field(default=1.0, gt=0.0, le=64.0)
    leaky_slope: float = Field(default=0.1, ge=0.0, lt=1.0)


@register_model(
    "resnet20", config=ResNet20Config, summary="CIFAR ResNet-20 (16/32/64 x width), any input size"
)
def build_resnet20(
    cfg: ResNet20Config, spec: ModelSpec, device: Device, dtype: torch.dtype | None
) -> CifarResNet:
    """ResNet-20 for ``(C, H, W)`` images."""
    c, _, _ = image_spec("resnet20", spec)
    widths = [_scaled(b, cfg.width) for b in (16, 32, 64)]
    return CifarResNet(c, spec.num_classes, widths, 3, cfg.shortcut, device=device, dtype=dtype)


@register_model("resnet12", config=ResNet12Config, summary="FSCIL ResNet-12 (64/160/320/640 x width)")
def build_resnet12(
    cfg: ResNet12Config, spec: ModelSpec, device: Device, dtype: torch.dtype | None
) -> ResNet12:
    """ResNet-12 for ``(C, H, W)`` images."""
    c, _, _ = image_spec("resnet12", spec)
    widths = [_scaled(b, cfg.width) for b in (64, 160, 320, 640)]
    return ResNet12(c, spec.num_classes, widths, cfg.leaky_slope, device=device, dtype=dtype)
