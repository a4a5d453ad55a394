"""``MergeConfig``: the fields every merge method shares, and the registry of merge methods.

Each method file (``linear.py``, ``ties.py``, ...) subclasses :class:`MergeConfig` once with its own ``method``
literal and options, and registers its :class:`~edgetune.merging.base.Merger` class and that config in
:data:`MERGERS`. Validating a plain mapping against ``MergeConfig`` (as a ``merge:`` recipe section would)
dispatches on ``method`` to the method's own config class, so ``{method: ties, density: 0.3}`` is checked against
TIES's options and an option of another method (``combine`` of DARE, say) is rejected with its name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from edgetune.core.config import Config, method_config
from edgetune.core.errors import did_you_mean
from edgetune.core.registry import Registry

__all__ = ["DTYPES", "MERGERS", "MergeConfig"]

#: method name -> Merger class (``cls(cfg)``); each entry carries its config class. Test hints in the entry's
#: meta: ``keep_all`` (the options under which the method drops no entry of a task vector) and
#: ``as_task_arithmetic`` (the options under which it equals task arithmetic exactly).
MERGERS: Registry[type] = Registry("merge method")

#: output dtype names (and short aliases) -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64,
}


class MergeConfig(Config):
    """How to merge several models of one architecture into one (the ``merge:`` section).

    method: a registered merge method (``edgetune ls``): linear, task_arithmetic, ties, dare, breadcrumbs,
        model_stock.
    weights: one weight per model, in the order the models are given; None: equal weights (what "equal" means is
        the method's: 1/N for ``linear``, 1 per task vector for the task-vector methods).
    seed: seed of any random choice a method makes (DARE's drops).
    dtype: dtype of the merged floating tensors (float32, bfloat16, float16, float64); None: the first model's.
        Every method computes in float32 (float64 inputs in float64) whatever the input and output dtypes.
    """

    method: str
    weights: list[float] | None = None
    seed: int = Field(default=0, ge=0)
    dtype: str | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch(cls, data: Any, handler: Any) -> Any:
        """A mapping validated against the base class becomes the config class of its ``method``."""
        if cls is MergeConfig:
            out = method_config(MergeConfig, data, MERGERS, "merge")
            if out is not None:
                return out
        return handler(data)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return v.lower()

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            bad = [w for w in v if not math.isfinite(w)]
            if bad:
                raise ValueError(f"weights must be finite numbers, got {bad[0]!r}; give one finite weight per model")
            if not v:
                raise ValueError("weights is empty; give one weight per model, or leave it out for equal weights")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        key = v.lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"dtype {v!r} is not a floating dtype.{did_you_mean(key, DTYPES)} "
                             "Use float32, bfloat16, float16 or float64, or leave it out to keep the inputs' dtype")
        return str(DTYPES[key]).removeprefix("torch.")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The output dtype as a ``torch.dtype`` (None: the inputs')."""
        return None if self.dtype is None else DTYPES[self.dtype]
