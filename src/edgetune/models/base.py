"""Model registry.

A builder is ``fn(cfg: XConfig, spec: ModelSpec, device, dtype) -> nn.Module`` registered with its own
config class; ``build_model`` validates ``model`` options from a recipe against that class.
Forward contract by task: classification ``model(x) -> (B, C)`` logits; causal LM ``model(x: (B, T) long)
-> (B, T, V)``; seq2seq ``model(src: (B, S), tgt_in: (B, T)) -> (B, T, V)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgetune.core.config import Config, validate
from edgetune.core.registry import Registry

__all__ = ["MODELS", "ModelSpec", "build_model", "register_model"]


@dataclass(frozen=True)
class ModelSpec:
    """What a builder needs to know about the data: shape of one input, classes or vocabulary size."""

    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"


Builder = Callable[[Any, ModelSpec, "torch.device | str | None", "torch.dtype | None"], nn.Module]
MODELS: Registry[Builder] = Registry("model")


def register_model(name: str, *, config: type[Config], summary: str = "") -> Callable[[Builder], Builder]:
    return MODELS.register(name, config=config, summary=summary)


def build_model(
    name: str,
    options: Mapping[str, Any] | None,
    spec: ModelSpec,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build registered model ``name`` with ``options`` (validated; errors name ``model.<key>``)."""
    from edgetune.models import _builders  # noqa: F401  (registers the built-in models)

    entry = MODELS.entry(name)
    assert entry.config is not None
    cfg = validate(entry.config, options or {}, where="model")
    return entry.obj(cfg, spec, device, dtype)
