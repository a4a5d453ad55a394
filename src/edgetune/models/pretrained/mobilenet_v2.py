"""MobileNetV2 in plain torch, with torchvision's module names so its ImageNet state dict loads strictly.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018. Layout (names as in
torchvision): ``features.0`` stem conv-BN-ReLU6, ``features.1..17`` inverted residual blocks (``.conv``),
``features.18`` 1x1 conv to 1280 channels, ``classifier = [Dropout, Linear(1280, num_classes)]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from edgetune.models.pretrained.image_transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from edgetune.models.pretrained.weights import load_weights_into
from edgetune.models.source import LoadedModel

__all__ = ["HEAD", "MobileNetV2", "load_mobilenet_v2"]

log = logging.getLogger(__name__)

HEAD = "classifier.1"
FEATURES = 1280
# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2
_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without going below 90% of ``v`` (the reference rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6; names ``0``, ``1``, ``2``. (B, Cin, H, W) -> (B, Cout, H/s, W/s)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection, plus identity when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(cin * expand)
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier: images (B, 3, H, W) -> logits (B, num_classes). Any H, W >= 32 works."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(FEATURES * max(1.0, width))
        layers: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in _SETTING:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNReLU6(cin, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self.num_features = last
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> pooled features (B, 1280)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


def load_mobilenet_v2(
    path: Path,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    channels: int | None = 3,
    init: str = "imagenet",
) -> LoadedModel:
    """ImageNet MobileNetV2 from a torchvision-layout state dict at ``path`` (loaded strictly).

    ``init="random"`` skips the weights: the same network and preprocessing trained from scratch (a baseline).

    num_classes None or 1000 keeps ImageNet's head; any other value replaces ``classifier.1`` by a fresh
    ``Linear(1280, num_classes)`` drawn from the global torch RNG (seed it first). The transform scales
    uint8/float images to [0, 1], repeats grey to RGB, resizes to ``image_size`` when given and applies
    ImageNet's mean/std.
    """
    model = MobileNetV2()
    notes: list[str] = []
    if init == "imagenet":
        load_weights_into(model, path, strict=True)
    elif init == "random":
        notes.append("random initialisation: ImageNet weights not loaded (from-scratch baseline)")
    else:
        from edgetune.core.errors import ConfigError

        raise ConfigError(f"model.init={init!r} for mobilenet-v2; use imagenet (pretrained) or random (from scratch)")
    if num_classes is not None and num_classes != 1000:
        model.classifier[1] = nn.Linear(model.num_features, num_classes)
        nn.init.normal_(model.classifier[1].weight, 0.0, 0.01)
        nn.init.zeros_(model.classifier[1].bias)
        notes.append(f"ImageNet head replaced by a new Linear({model.num_features}, {num_classes})")
    n_out = model.classifier[1].out_features
    log.info("MobileNetV2 loaded from %s (%d classes)", path, n_out)
    return LoadedModel(
        model=model,
        task="classification",
        transform=ImageTransform(size=image_size, channels=channels, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        head=HEAD,
        notes=notes,
        info={"num_classes": n_out, "num_features": model.num_features, "image_size": image_size},
    )
