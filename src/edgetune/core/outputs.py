"""What a model's forward returned: the logits in a tensor, a Hugging Face ``ModelOutput``, a dict or a tuple."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from edgetune.core.errors import ConfigError

__all__ = ["logits_of"]


def logits_of(out: Any, need: str = "a classification or language model must return a logits tensor or an object "
                                    "with a .logits tensor") -> Tensor:
    """The logits in ``out``: a tensor, ``.logits`` (``ModelOutput``), ``out["logits"]``, or the first tensor of a
    tuple; else :class:`ConfigError` ending with ``need`` (what the caller requires and how to get it)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise ConfigError(f"the model returned {type(out).__name__}, which holds no logits; {need}")
    return logits
