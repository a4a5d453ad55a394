"""Multi-layer perceptron over flattened inputs.

Hidden layers are plain :class:`torch.nn.Linear` modules named ``layers.0``, ``layers.1``, ... and the
classifier is ``head``, so the sparse family finds them by name. ``widths=[1568, 1568, 1568]`` on
``(1, 28, 28)`` inputs gives the 784-1568-1568-1568-10 MLP of the sparse-training papers.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.models.base import ModelSpec, register_model

__all__ = ["MLP", "MLPConfig"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


class MLPConfig(Config):
    """widths: hidden layer sizes (at least one); activation between layers;
    batch_norm: BatchNorm1d after each hidden Linear; dropout: probability after each hidden activation."""

    widths: tuple[Annotated[int, Field(gt=0)], ...] = Field(default=(512, 256), min_length=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    batch_norm: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @field_validator("widths", mode="before")
    @classmethod
    def _not_empty(cls, v: object) -> object:
        if isinstance(v, (list, tuple)) and not v:
            raise ValueError("give at least one hidden layer size, e.g. widths=[256]; without hidden layers "
                             "there is nothing for methods (sparse, ...) to adapt")
        return v


class MLP(nn.Module):
    """``(B, *input_shape) -> (B, num_classes)``: flatten, ``[Linear -> (BN) -> act -> (dropout)] * L``, head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        widths: tuple[int, ...] | list[int] = (512, 256),
        activation: str = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        sizes = [in_features, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b, **kw) for a, b in itertools.pairwise(sizes))
        self.norms = nn.ModuleList(nn.BatchNorm1d(w, **kw) for w in widths) if batch_norm else None
        self.act = _ACTIVATIONS[activation]
        self.drop = nn.Dropout(dropout)
        self.feature_dim = sizes[-1]
        self.head = nn.Linear(sizes[-1], num_classes, **kw)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *input_shape) -> (B, D)`` with ``D = widths[-1]`` (or the flattened input size)."""
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.norms is not None:
                h = self.norms[i](h)
            h = self.drop(self.act(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *input_shape) -> (B, C)`` logits."""
        return self.head(self.features(x))


@register_model("mlp", config=MLPConfig, summary="MLP over flattened inputs (hidden `widths`, Linear layers)")
def build_mlp(
    cfg: MLPConfig, spec: ModelSpec, device: torch.device | str | None, dtype: torch.dtype | None
) -> MLP:
    """MLP for classification of any fixed-shape input."""
    if spec.task != "classification":
        raise ConfigError(
            f"model 'mlp' is a classifier but the data task is {spec.task!r}; "
            "use model.name=transformer for token tasks"
        )
    if not spec.input_shape or any(d <= 0 for d in spec.input_shape):
        raise ConfigError(
            f"model 'mlp' needs a non-empty input shape of positive sizes, got {spec.input_shape}"
        )
    if spec.num_classes < 1:
        raise ConfigError(f"model 'mlp' needs num_classes >= 1, got {spec.num_classes}")
    return MLP(
        math.prod(spec.input_shape),
        spec.num_classes,
        widths=cfg.widths,
        activation=cfg.activation,
        batch_norm=cfg.batch_norm,
        dropout=cfg.dropout,
        device=device,
        dtype=dtype,
    )
