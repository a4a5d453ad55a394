"""HOP's settings and the checks on what a user hands it (problems' classes, texts and labels).

:class:`HopConfig` documents every option of :class:`~edgetune.incremental.hop.HopModel` (the paper and the choices
of this implementation are in :mod:`edgetune.incremental.hop`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, DataError
from edgetune.incremental.pooling import check_orders

__all__ = ["HopConfig", "check_data", "class_names"]


class HopConfig(Config):
    """HOP on a frozen encoder.

    rank / alpha / targets: the LoRA adapter of each problem (targets: layer name patterns, e.g. query, value).
    adapters: ``per_problem`` (HOP), ``shared`` (one adapter trained in sequence) or ``full`` (the encoder itself
        trained in sequence; set ``lr`` near 5e-5 then).
    heads: ``per_problem`` (HOP) or ``shared`` (one head; every problem must have the same classes).
    pool: ``moments`` (HOP: ``orders`` of the tokens without [CLS] and padding; ``[1]`` is mean pooling) or
        ``cls`` (the [CLS] token's vector). standardize: orders >= 3 divided by sigma^k (moment_pool's option).
    head_hidden: hidden width of each head's MLP (0: a linear head).
    steps / batch_size / lr / head_lr: Adam steps per problem, examples per step, learning rates of the adapter
        (or encoder) and of the head. max_length: tokens kept per text ([CLS] and [SEP] included).
    select: how the problem is picked when it is not given at test (see the module docstring).
    seed: seeds the adapter and head of problem ``t`` (with ``seed + t``) and the order of its batches.
    """

    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["query", "value"])
    adapters: Literal["per_problem", "shared", "full"] = "per_problem"
    heads: Literal["per_problem", "shared"] = "per_problem"
    pool: Literal["moments", "cls"] = "moments"
    orders: list[int] = Field(default_factory=lambda: [1, 2])
    standardize: bool = True
    head_hidden: int = Field(default=256, ge=0)
    steps: int = Field(default=30, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    head_lr: float = Field(default=1e-3, gt=0)
    max_length: int = Field(default=128, ge=2)
    select: Literal["confidence", "entropy", "average"] = "confidence"
    seed: int = Field(default=0, ge=0)

    @field_validator("orders")
    @classmethod
    def _orders(cls, v: list[int]) -> list[int]:
        return list(check_orders(v))


def class_names(classes: Sequence[str] | int) -> tuple[str, ...]:
    names = tuple(str(i) for i in range(classes)) if isinstance(classes, int) else tuple(str(c) for c in classes)
    if len(names) < 2:
        raise ConfigError(f"a problem needs at least 2 classes, got {list(names)}; give classes=['a', 'b', ...] "
                          "or the number of classes")
    if len(set(names)) != len(names):
        raise ConfigError(f"class names repeat: {list(names)}; give each class once")
    return names


def check_data(name: str, texts: Sequence[str], labels: Tensor | Sequence[int], classes: tuple[str, ...]
                ) -> tuple[list[str], Tensor]:
    """The texts and int64 labels ``(N,)`` of problem ``name``, or a :class:`DataError` naming what is wrong."""
    if isinstance(texts, str):
        raise DataError(f"problem {name!r}: give a list of texts, not one string")
    texts = list(texts)
    if not texts:
        raise DataError(f"problem {name!r} has no training texts; give at least one example per class")
    if not all(isinstance(t, str) for t in texts):
        bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise DataError(f"problem {name!r}: text {bad} is a {type(texts[bad]).__name__}, not a string")
    y = torch.as_tensor(labels)
    if y.ndim != 1 or len(y) != len(texts) or y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"problem {name!r}: labels must be {len(texts)} integer class indices (one per text), got "
                        f"a {y.dtype} tensor of shape {tuple(y.shape)}")
    bad_pos = torch.nonzero((y < 0) | (y >= len(classes))).flatten().tolist()
    if bad_pos:
        raise DataError(f"problem {name!r}: labels {sorted({int(y[i]) for i in bad_pos})[:5]} (at positions "
                        f"{bad_pos[:5]}) are outside its {len(classes)} classes {list(classes)}; labels are indices "
                        f"0..{len(classes) - 1}")
    return texts, y.long()
