"""Recipe sections contributed by method families.

A family registers a top-level recipe key (``sparse:``, ``adapter:``, ...) with its config class and an
``apply(model, cfg, ctx) -> list[Callback]`` function. The recipe schema grows a typed, optional field for
every registered section, and the runner calls ``apply`` after building the model and before building the
optimizer. The foundation never changes when a family is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from edgetune.core.config import Config
from edgetune.core.hooks import Callback
from edgetune.core.registry import Registry

__all__ = ["SECTIONS", "SectionContext", "register_section"]


@dataclass
class SectionContext:
    """What a section's ``apply`` may use: the training length, device, run folder, seed, a data sampler."""

    total_steps: int
    steps_per_epoch: int
    epochs: int
    device: Any
    seed: int
    run_dir: Path | None = None
    #: ``fn(n=None) -> Tensor``: the first positional input of the first n training examples (all when None),
    #: preprocessed as the model sees it; for data-driven initialisations. None when there is no data.
    sample_inputs: Callable[[int | None], Any] | None = None
    #: qualified name of the model's classification head (None for other tasks)
    head: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Apply = Callable[[nn.Module, Any, SectionContext], list[Callback]]
SECTIONS: Registry[Apply] = Registry("recipe section")


def register_section(name: str, *, config: type[Config], summary: str = "") -> Callable[[Apply], Apply]:
    return SECTIONS.register(name, config=config, summary=summary)
