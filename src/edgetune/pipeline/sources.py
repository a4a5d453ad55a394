"""Model sources: turn a recipe's ``model:`` section into a :class:`LoadedModel`.

Sources: a registered architecture (optionally with a weight file), a pretrained network installed from a
package registry, a Hugging Face folder or cache entry, an edgetune run folder, or an earlier stage. After
loading, the head is fitted to the data (``model.head``) and the model is handed to the recipe's sections.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from edgetune.core.errors import ConfigError
from edgetune.core.freeze import find_head, replace_head_
from edgetune.models.base import MODELS, ModelSpec, build_model
from edgetune.models.source import LoadedModel

__all__ = ["StageModels", "load_model_source", "loop_task", "pretrained_names"]

log = logging.getLogger(__name__)

#: stage name -> a function giving that finished stage's model (in memory, or reloaded from its folder)
StageModels = Mapping[str, Callable[[], LoadedModel]]


def loop_task(model_task: str | None, data_task: str) -> str:
    """The loop's task for a model section's ``task`` and the data's task (``features`` trains a classifier)."""
    if model_task in (None, "features"):
        return data_task
    return model_task


def pretrained_names() -> list[str]:
    """Short names of the pretrained networks (``model.name``), installed or not."""
    from edgetune.models.pretrained import PRETRAINED

    return list(PRETRAINED.names())


def _source_task(section, spec: ModelSpec) -> str:
    """What to load a pretrained or Hugging Face network as: ``features`` means a classifier whose backbone
    stays frozen (the pipeline freezes it), so it loads as ``classification`` with a new head."""
    if section.task in (None, "features"):
        return "lm" if spec.task == "lm" else "classification"
    return section.task


def _from_name(section, spec: ModelSpec, device: torch.device) -> LoadedModel:
    from edgetune.models import _builders  # noqa: F401  (registers the built-in architectures)

    if section.name in pretrained_names():
        from edgetune.models.pretrained import load_pretrained

        task = _source_task(section, spec)
        want = spec.num_classes if section.head != "keep" and task == "classification" else None
        loaded = load_pretrained(section.name, task=task, num_classes=want, image_size=section.image_size,
                                 **section.options())
        loaded.model.to(device)
        return loaded
    if section.name not in MODELS:
        from edgetune.core.errors import did_you_mean

        names = sorted([*MODELS.names(), *pretrained_names()])
        raise ConfigError(f"model.name={section.name!r} is neither a registered architecture nor a pretrained "
                          f"network.{did_you_mean(section.name, names)} Known: {', '.join(names)} "
                          "(see `edgetune ls models`).")
    model = build_model(section.name, section.options(), spec, device=device)
    loaded = LoadedModel(model=model, task=spec.task, head=find_head(model) if spec.task == "classification" else None,
                         source=f"architecture {section.name}")
    if section.weights:
        from edgetune.models.pretrained import load_weights_into

        load_weights_into(model, section.weights, strict=True)
        loaded.source += f" with weights {section.weights}"
    return loaded


def _from_hf(section, spec: ModelSpec, device: torch.device) -> LoadedModel:
    from edgetune.models.pretrained import load_hf

    task = _source_task(section, spec)
    loaded = load_hf(section.hf, task=task, num_classes=spec.num_classes if task == "classification" else None)
    loaded.model.to(device)
    return loaded


def _from_run(path: str, device: torch.device) -> LoadedModel:
    from edgetune.runner import load_run_model

    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"model.from={path!r} does not exist; give the folder an `edgetune run` wrote (see its "
                          "report.md), or stage:NAME for an earlier stage of this recipe")
    return load_run_model(folder, device=str(device)).loaded


def load_model_source(section, spec: ModelSpec, device: torch.device, *, stages: StageModels | None = None,
                      generator: torch.Generator | None = None) -> LoadedModel:
    """Load the model a ``model:`` section names, with its head fitted to ``spec.num_classes`` (classification)."""
    kind = section.source_kind
    if kind == "stage":
        name = section.from_.removeprefix("stage:")
        if not stages or name not in stages:
            raise ConfigError(f"model.from=stage:{name} names no earlier stage; a stage can start from the stages "
                              f"listed before it: {', '.join(stages or []) or '(none)'}")
        loaded = copy.deepcopy(stages[name]())
        loaded.source = f"stage {name}"
    elif kind == "run":
        loaded = _from_run(section.from_, device)
    elif kind == "hf":
        loaded = _from_hf(section, spec, device)
    else:
        loaded = _from_name(section, spec, device)
    if kind in ("stage", "run") and section.task and section.task != "features" and section.task != loaded.task:
        raise ConfigError(f"model.task={section.task} but the model from {section.from_} was trained for "
                          f"{loaded.task}; drop model.task or start from another model")
    _fit_head(loaded, section, spec, generator)
    return loaded


def _fit_head(loaded: LoadedModel, section, spec: ModelSpec, generator: torch.Generator | None) -> None:
    if spec.task != "classification" or loaded.task != "classification" or section.head == "keep":
        return
    head = section.head_module or loaded.head or find_head(loaded.model)
    if head is None:
        raise ConfigError("the model has no Linear layer to use as a classification head; set model.head=keep or "
                          "model.head_module")
    out = getattr(loaded.model.get_submodule(head), "out_features", None)
    if section.head == "replace" or out != spec.num_classes:
        replace_head_(loaded.model, head, spec.num_classes, generator=generator)
        loaded.notes.append(f"head {head} replaced: {out} -> {spec.num_classes} classes")
    loaded.head = head
