"""``data.normalize``: per-channel standardisation of image inputs, ``(x - mean[c]) / std[c]``.

Given as statistics, ``{mean: [0.2860], std: [0.3530]}`` (Fashion-MNIST's, as torchvision recipes write
them), or as ``train``: the mean and standard deviation of every pixel of each channel of the training split
(after ``data.classes`` / ``limit_train`` / the validation hold-out), measured when the data load. The
bundle's ``transform`` then ends with a :class:`~edgetune.data.transforms.Normalize`, so training, evaluation
and every tool that reads ``bundle.transform`` see the same inputs; ``bundle.normalization`` keeps it so that
train-only augmentation can pad with normalised black.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from pydantic import Field, model_validator

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.data.batches import compose
from edgetune.data.transforms import Normalize

if TYPE_CHECKING:
    from edgetune.data.base import DataBundle

__all__ = ["NormalizeConfig", "normalize_bundle", "train_statistics"]

log = logging.getLogger(__name__)


class NormalizeConfig(Config):
    """``data.normalize`` as statistics: one mean and one std per channel (or one of each for all channels)."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> NormalizeConfig:
        Normalize(self.mean, self.std)  # its rules: as many stds as means, each std positive
        return self


def train_statistics(bundle: DataBundle, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (over all pixels, ddof 0) of ``bundle.train``'s images, as the
    model sees them (after ``bundle.transform``)."""
    x = bundle.train.tensors[0]
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        if bundle.transform is not None:
            part = bundle.transform([part])[0]
        part = part.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)  # (C, n * H * W)
        total += part.sum(dim=1)
        squares += part.square().sum(dim=1)
    n = len(x) * x[0, 0].numel()
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    if bool((std == 0).any()):
        raise ConfigError(f"data.normalize=train: a channel of {bundle.name}'s training images is constant "
                          f"(std {std.tolist()}); give data.normalize={{mean: [...], std: [...]}} instead.")
    return mean.tolist(), std.tolist()


def normalize_bundle(bundle: DataBundle, spec: NormalizeConfig | str | None) -> DataBundle:
    """Append the ``data.normalize`` step to ``bundle.transform`` (in place; returns the bundle).

    Raises ConfigError for a dataset whose examples are not images ``(C, H, W)`` held as tensors, or
    statistics whose count is neither 1 nor the channel count.
    """
    if spec is None:
        return bundle
    shape = tuple(bundle.input_shape)
    if len(shape) != 3 or not hasattr(bundle.train, "tensors"):
        raise ConfigError(f"data.normalize works on image datasets (examples of shape (C, H, W)); {bundle.name}'s "
                          f"examples have shape {shape}. Remove data.normalize for this dataset.")
    if spec == "train":
        mean, std = train_statistics(bundle)
        how = "the training split's statistics"
    elif isinstance(spec, NormalizeConfig):
        mean, std = spec.mean, spec.std
        how = "data.normalize"
    else:
        raise ConfigError(f"data.normalize={spec!r}: give 'train' or {{mean: [...], std: [...]}}")
    channels = shape[0]
    if len(mean) not in (1, channels):
        raise ConfigError(f"data.normalize has {len(mean)} means and stds for {bundle.name}'s {channels}-channel "
                          f"images; give one value or {channels} (one per channel).")
    norm = Normalize(mean, std)
    bundle.transform = compose(bundle.transform, norm)
    bundle.normalization = norm
    note = (f"inputs normalized per channel by {how}: mean "
            f"{[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}")
    bundle.notes.append(note)
    log.info("data: %s", note)
    return bundle
