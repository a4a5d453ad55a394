"""The adapters family's plug-in: the ``adapter:`` recipe section and its save format (the adapter alone)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

import edgetune.adapters  # noqa: F401  (registers the adapter methods)
from edgetune.adapters.config import AdapterConfig
from edgetune.core.hooks import Callback
from edgetune.core.plugins import SAVERS
from edgetune.core.sections import SectionContext, register_section


@register_section("adapter", config=AdapterConfig,
                  summary="low-rank adapters (LoRA, RAC-LoRA, chain, asymmetric, DyLoRA, SoRA, LoRA-FA, DoRA)")
def apply_adapter(model: nn.Module, cfg: AdapterConfig, ctx: SectionContext) -> list[Callback]:
    from edgetune.adapters.callbacks import adapter_callbacks
    from edgetune.adapters.model import add_adapter_

    add_adapter_(model, cfg, seed=cfg.seed if cfg.seed is not None else ctx.seed, head=ctx.head)
    return adapter_callbacks(model, cfg.name, total_steps=ctx.total_steps, steps_per_epoch=ctx.steps_per_epoch)


def _save(model: nn.Module, cfg: AdapterConfig, folder: Path) -> list[Path]:
    from edgetune.adapters.io import save_adapter

    return save_adapter(model, folder / "adapter", name=cfg.name)


SAVERS.add("adapter", _save, summary="the adapter alone: adapter/adapter_config.json + adapter_model.safetensors "
                                     "(PEFT's layout)")
