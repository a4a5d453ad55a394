"""``AdapterConfig``: the fields every low-rank adapter shares, and the registry of adapter methods.

Each method file (``lora.py``, ``rac_lora.py``, ...) subclasses :class:`AdapterConfig` once with its own
``method`` literal and options, and registers its adapter module and that config in :data:`ADAPTERS`.
Validating a plain mapping against ``AdapterConfig`` (as the recipe's ``adapter:`` section does) dispatches on
``method`` to the method's own config class, so ``adapter: {method: rac_lora, links: 8}`` is checked against
RAC-LoRA's options and an option of another method is rejected with its name.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from edgetune.core.config import Config, method_config
from edgetune.core.registry import Registry

__all__ = ["ADAPTERS", "KINDS", "AdapterConfig"]

#: method name -> adapter module class (``cls(info, cfg, generator)``); each entry carries its config class
ADAPTERS: Registry[type] = Registry("adapter method")

#: layer kinds an adapter can sit on; ``linear`` covers ``nn.Linear`` and any layer with ``in_features`` /
#: ``out_features`` that maps ``(..., in)`` to ``(..., out)`` (edgetune's ``SparseLinear``, for example)
KINDS = ("linear", "conv2d", "embedding")


class AdapterConfig(Config):
    """A low-rank adapter on the layers of a model (the ``adapter:`` recipe section).

    method: a registered adapter method (``edgetune ls``): lora, rac_lora, chain, asymmetric, dylora, sora,
        lora_fa, dora.
    name: the adapter's name on the model (several named adapters may sit on one model).
    rank / alpha: r and the scale numerator: the update is (alpha / r) * B @ A, or alpha / sqrt(r) with
        ``rslora`` (rank-stabilized LoRA, Kalajdzievski 2023).
    targets: name patterns of the layers to adapt (globs on the full or last name, ``re:`` regexes);
        exclude: patterns to leave alone. kinds: layer kinds to consider (linear, conv2d, embedding) or
        module class names (``Conv1d``...).
    dropout: dropout on the adapter's input (training only).
    trainable: extra parameters kept trainable beside the adapter's (patterns, or ``head`` for the model's
        classification head). None: the head of a classification model, nothing otherwise.
    seed: seed of the adapter's random initialisation (default: the run's seed).
    rank_pattern / alpha_pattern: rank / alpha of single layers, by exact layer path, where they differ from
        ``rank`` / ``alpha`` (what :func:`edgetune.adapters.io.load_adapter_` sets for a file whose layers differ,
        like PEFT's fields of the same names).
    """

    method: str = "lora"
    name: str = "default"
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    rslora: bool = False
    targets: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    kinds: list[str] = Field(default_factory=lambda: ["linear"])
    dropout: float = Field(default=0.0, ge=0, lt=1)
    trainable: list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch(cls, data: Any, handler: Any) -> Any:
        """A mapping validated against the base class becomes the config class of its ``method``."""
        if cls is AdapterConfig:
            out = method_config(AdapterConfig, data, ADAPTERS, "adapter", default="lora")
            if out is not None:
                return out
        return handler(data)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return v.lower()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not v.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"adapter name {v!r} must be letters, digits, '_' or '-' (it becomes part of "
                             "parameter names)")
        return v

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"kinds is empty; name at least one of {', '.join(KINDS)} (or a module class name)")
        return [k.lower() if k.lower() in KINDS else k for k in v]

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"per-layer ranks and alphas must be positive, got {bad}")
        return v

    def for_layer(self, path: str) -> AdapterConfig:
        """The config the adapter of the layer at ``path`` is built with (its rank / alpha from the patterns)."""
        changes = {k: v for k, v in (("rank", self.rank_pattern.get(path)), ("alpha", self.alpha_pattern.get(path)))
                   if v is not None}
        return self.model_copy(update=changes) if changes else self

    @property
    def scale(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rslora."""
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)
