"""User-facing error types.

Every error a user can cause derives from :class:`EdgetuneError`. The CLI prints its message (one
paragraph, no traceback) and exits with :attr:`EdgetuneError.exit_code`: 2 for usage/config errors,
1 for runtime failures (missing data, corrupt checkpoint, ...).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["CheckpointError", "ConfigError", "DataError", "EdgetuneError", "ShapeError", "did_you_mean"]


class EdgetuneError(Exception):
    """Base class of errors caused by user input or environment; the message says what to do."""

    exit_code = 1


class ConfigError(EdgetuneError, ValueError):
    """A recipe, config value or CLI argument is invalid."""

    exit_code = 2


class DataError(EdgetuneError):
    """A dataset is missing, truncated or malformed."""


class CheckpointError(EdgetuneError):
    """A checkpoint is corrupt, incomplete or belongs to another model/topology."""


class ShapeError(EdgetuneError, ValueError):
    """Tensor or mask shapes do not match what a layer expects."""

    exit_code = 2


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""
