"""Recipes: the typed schema of a run, loading from YAML with overrides, and the shipped recipe catalogue.

A recipe has the core sections ``data``, ``model``, ``train`` plus one optional section per registered
family section (``sparse``, ...; see edgetune.core.sections). The schema class is built from the section
registry, so adding a family adds a validated key without touching this file.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field, create_model, field_validator

from edgetune.core.config import Config, apply_overrides, load_yaml, validate
from edgetune.core.errors import ConfigError
from edgetune.core.sections import SECTIONS
from edgetune.data.base import DATASETS, DataConfig
from edgetune.models.base import MODELS
from edgetune.train.config import TrainConfig

__all__ = [
    "DEFAULT_RECIPE",
    "ModelSection",
    "RunConfig",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "recipe_schema",
]

DEFAULT_RECIPE = "foundation/default"


class ModelSection(Config):
    """``name`` of a registered model plus its options (validated by that model's config class)."""

    model_config = Config.model_config | {"extra": "allow"}
    name: str = "mlp"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(Config):
    """A whole run. ``output_dir``: parent folder of run folders; ``name``: run folder prefix."""

    version: int = Field(default=1, ge=1, le=1)
    name: str = "run"
    description: str = ""
    seed: int = Field(default=0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs"
    expect: dict[str, float] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("name must be a plain folder-name prefix (no slashes, not starting with a dot)")
        return v

    def section(self, name: str) -> Any:
        return getattr(self, name, None)


def _import_families() -> None:
    """Families register their recipe sections on import; import the ones that exist."""
    import importlib

    for fam in ("sparse", "adapters", "merging", "incremental"):
        try:
            importlib.import_module(f"edgetune.{fam}")
        except ModuleNotFoundError as err:
            if err.name != f"edgetune.{fam}":
                raise


@cache
def _schema_for(names: tuple[str, ...]) -> type[RunConfig]:
    fields: dict[str, Any] = {n: (SECTIONS.entry(n).config | None, None) for n in names}
    return create_model("Recipe", __base__=RunConfig, **fields)


def recipe_schema() -> type[RunConfig]:
    """RunConfig extended with every registered family section."""
    _import_families()
    return _schema_for(tuple(SECTIONS.names()))


def find_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or a shipped recipe name like ``foundation/default`` (``.yaml`` optional)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = {r: path for r, path in list_recipes()}
    key = name_or_path.removesuffix(".yaml").removesuffix(".yml")
    if key in shipped:
        return shipped[key]
    if p.exists():
        return p
    from edgetune.core.errors import did_you_mean

    if p.suffix in (".yaml", ".yml"):
        raise ConfigError(f"recipe file {str(p)!r} does not exist; check the path or run `edgetune ls recipes`")
    raise ConfigError(
        f"no recipe file or shipped recipe named {name_or_path!r}.{did_you_mean(key, shipped)} "
        f"Shipped recipes: {', '.join(sorted(shipped))} (see `edgetune ls recipes`)."
    )


def list_recipes() -> list[tuple[str, Path]]:
    """(name, path) of every recipe shipped inside the package, e.g. ``("foundation/default", ...)``."""
    root = Path(str(importlib.resources.files("edgetune") / "recipes"))
    return sorted((str(p.relative_to(root).with_suffix("")), p) for p in root.rglob("*.yaml"))


def load_recipe(source: str | Path | dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load and fully validate a recipe (file, shipped name or dict) with dotted ``key=value`` overrides.

    Model options are checked against the named model's config, dataset options against the dataset's,
    so a recipe that validates here will not fail on a config error later.
    """
    if source is None:
        source = DEFAULT_RECIPE
    data = dict(source) if isinstance(source, dict) else load_yaml(find_recipe(str(source)))
    data = apply_overrides(data, overrides)
    cfg = validate(recipe_schema(), data)
    from edgetune.data import _loaders  # noqa: F401
    from edgetune.models import _builders  # noqa: F401

    ds = DATASETS.entry(cfg.data.name)
    if ds.config is not None:
        validate(ds.config, cfg.data.options, where="data.options")
    if cfg.data.fallback:
        DATASETS.entry(cfg.data.fallback)
    entry = MODELS.entry(cfg.model.name)
    if entry.config is not None:
        validate(entry.config, cfg.model.options(), where="model")
    return cfg
