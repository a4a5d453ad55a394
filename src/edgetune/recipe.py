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
from typing import Any, Literal

from pydantic import Field, PrivateAttr, create_model, field_validator, model_serializer, model_validator

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


ModelTask = Literal["classification", "lm", "seq2seq", "features"]


class ModelSection(Config):
    """Where the model comes from, plus the options of a registered architecture.

    One source:
    - ``name``: a registered architecture (``edgetune ls models``) built from its options, optionally with
      ``weights`` (a safetensors file or torch state dict, keys and shapes checked strictly); or the short name
      of a pretrained network installed from a package registry (``minilm``, ``smollm2-135m``, ``mobilenet-v2``);
    - ``from``: an edgetune run folder (its architecture, method sections and trained weights), or
      ``stage:NAME`` for the model an earlier stage of this recipe produced;
    - ``hf``: a Hugging Face model in a local folder or the local cache (never downloaded).
    task: classification (default for class data), lm, seq2seq, or features (a frozen feature extractor plus a
        new head: only the head trains unless ``train.trainable`` says otherwise).
    head: auto (a new head when the data's classes differ from the model's), keep, or replace.
    head_module: qualified name of the head when it is not the last Linear layer.
    image_size: resize images to this size per batch (pretrained vision backbones).
    max_length: truncate tokenized text to this many tokens.
    """

    model_config = Config.model_config | {"extra": "allow", "populate_by_name": True}
    name: str = "mlp"
    from_: str | None = Field(default=None, alias="from")
    weights: str | None = None
    hf: str | None = None
    task: ModelTask | None = None
    head: Literal["auto", "keep", "replace"] = "auto"
    head_module: str | None = None
    image_size: int | None = Field(default=None, ge=8, le=1024)
    max_length: int = Field(default=128, ge=4, le=32768)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        given = [k for k, v in (("from", self.from_), ("hf", self.hf)) if v]
        if "name" in self.model_fields_set and given:
            given.insert(0, "name")
        if len(given) > 1:
            raise ValueError(f"give one model source, not {' and '.join(given)} (name: an architecture or "
                             "pretrained network; from: a run folder or stage:NAME; hf: a Hugging Face folder); "
                             "write a recipe whose model section holds only that source, e.g. model: {hf: FOLDER}")
        if self.weights and given:
            raise ValueError("weights go with a registered architecture (model.name); model.from and model.hf "
                             "bring their own weights")
        return self

    @property
    def source_kind(self) -> str:
        if self.from_:
            return "stage" if self.from_.startswith("stage:") else "run"
        return "hf" if self.hf else "name"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        data = handler(self)  # unset optional keys and the unused name stay out of config.yaml
        for key in ("from", "from_", "hf", "weights", "head_module", "task", "image_size"):
            if data.get(key) is None:
                data.pop(key, None)
        if self.source_kind != "name":
            data.pop("name", None)
        return data


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
    step: str = "train"
    stages: list[dict[str, Any]] | None = None
    _section_order: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: Any) -> Any:
        obj = handler(data)
        if isinstance(data, dict):
            obj._section_order = [k for k in data if k in SECTIONS]
        return obj

    @field_validator("step")
    @classmethod
    def _step(cls, v: str) -> str:
        from edgetune.pipeline.steps import STEPS

        STEPS.entry(v)  # unknown step: ConfigError with the known ones
        return v

    def section_names(self) -> list[str]:
        """The family sections this recipe uses, in the order it writes them (the order they apply in)."""
        present = [n for n in SECTIONS.names() if getattr(self, n, None) is not None]
        order = [n for n in self._section_order if n in present]
        return order + [n for n in present if n not in order]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        order = self.section_names()
        # unset family sections stay out: a saved config must load where only its own families are registered
        rest = {k: v for k, v in data.items() if k not in order and (k in RunConfig.model_fields or v is not None)}
        return {**rest, **{k: data[k] for k in order}}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("name must be a plain folder-name prefix (no slashes, not starting with a dot)")
        return v

    def section(self, name: str) -> Any:
        return getattr(self, name, None)


def _import_families() -> None:
    """Families register their recipe sections and steps on import (see edgetune.core.plugins)."""
    from edgetune.core.plugins import load_families

    load_families()


@cache
def _schema_for(names: tuple[str, ...], steps: tuple[str, ...]) -> type[RunConfig]:
    from edgetune.pipeline.steps import STEPS

    fields: dict[str, Any] = {n: (SECTIONS.entry(n).config | None, None) for n in names}
    for n in steps:  # a family step's options sit under its own name
        fields.setdefault(n, (STEPS.entry(n).config | None, None))
    return create_model("Recipe", __base__=RunConfig, **fields)


def recipe_schema() -> type[RunConfig]:
    """RunConfig extended with every registered family section and step."""
    from edgetune.pipeline.steps import STEPS

    _import_families()
    steps = tuple(e.name for e in STEPS.entries() if e.config is not None)
    return _schema_for(tuple(SECTIONS.names()), steps)


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
    from edgetune.pipeline.stages import resolve_stages

    for name, stage in resolve_stages(cfg):
        check_stage(stage, where="" if name == "main" else f"stage {name!r}: ")
    return cfg


def check_stage(cfg: RunConfig, where: str = "") -> None:
    """Validate what the schema cannot: dataset and architecture options, known model names."""
    from edgetune.data import _loaders  # noqa: F401
    from edgetune.models import _builders  # noqa: F401
    from edgetune.pipeline.sources import pretrained_names

    try:
        ds = DATASETS.entry(cfg.data.name)
        if ds.config is not None:
            validate(ds.config, cfg.data.options, where="data.options")
        if cfg.data.fallback:
            DATASETS.entry(cfg.data.fallback)
        m = cfg.model
        if m.source_kind == "run" and not Path(m.from_).is_dir():
            raise ConfigError(f"model.from={m.from_!r} does not exist or is not a folder; give the run folder `edgetune run` wrote "
                              "(see its report.md), or stage:NAME for an earlier stage of this recipe")
        if m.source_kind == "name" and m.name not in pretrained_names():
            entry = MODELS.entry(m.name)
            if entry.config is not None:
                validate(entry.config, m.options(), where="model")
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
