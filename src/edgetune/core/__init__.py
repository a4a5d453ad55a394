"""Core machinery shared by every family: configs, registries, module selection, surgery, state files."""

from edgetune.core.config import Config, apply_overrides, validate
from edgetune.core.errors import CheckpointError, ConfigError, DataError, EdgetuneError, ShapeError
from edgetune.core.registry import Registry
from edgetune.core.select import make_filter, select_modules

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "EdgetuneError",
    "Registry",
    "ShapeError",
    "apply_overrides",
    "make_filter",
    "select_modules",
    "validate",
]
