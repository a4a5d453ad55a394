"""The adapters family's plug-in: the ``adapter:`` recipe section and its save format (the adapter alone)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

import edgetune.adapters
import edgetune.adapters.bench  # noqa: F401  (registers the adapters bench suites)
from edgetune.adapters.config import AdapterConfig
from edgetune.core.hooks import Callback
from edgetune.core.plugins import EXPORTS, SAVERS, ExportFormat
from edgetune.core.sections import SectionContext, register_section


@register_section("adapter", config=AdapterConfig,
                  summary="low-rank adapters (LoRA, RAC-LoRA, chain, asymmetric, DyLoRA, SoRA, LoRA-FA, DoRA)")
def apply_adapter(model: nn.Module, cfg: AdapterConfig, ctx: SectionContext) -> list[Callback]:
    from edgetune.adapters.callbacks import AdapterReport, adapter_callbacks
    from edgetune.adapters.model import add_adapter_

    add_adapter_(model, cfg, seed=cfg.seed if cfg.seed is not None else ctx.seed, head=ctx.head)
    return [*adapter_callbacks(model, cfg.name, total_steps=ctx.total_steps, steps_per_epoch=ctx.steps_per_epoch),
            AdapterReport(model, cfg.name)]


def _save(model: nn.Module, cfg: AdapterConfig, folder: Path) -> list[Path]:
    from edgetune.adapters.io import save_adapter

    return save_adapter(model, folder / "adapter", name=cfg.name)


SAVERS.add("adapter", _save, summary="the adapter alone: adapter/adapter_config.json + adapter_model.safetensors "
                                     "(PEFT's layout)")


def _has_adapter(cfg: object) -> bool:
    return getattr(cfg, "adapter", None) is not None


def _merged(run: object, run_dir: Path, out_dir: Path | None) -> dict:
    from edgetune.adapters.export import export_merged

    return export_merged(run, run_dir, out_dir)


def _peft(run: object, run_dir: Path, out_dir: Path | None) -> dict:
    from edgetune.adapters.export import export_peft

    return export_peft(run, run_dir, out_dir)


EXPORTS.add("adapter-merged", ExportFormat(export=_merged, applies=_has_adapter),
            summary="adapters merged into the weights and taken off: the base architecture at the base's speed "
                    "(model.safetensors, and hf/ for a Hugging Face network)")
EXPORTS.add("adapter-peft", ExportFormat(export=_peft, applies=lambda cfg: False),
            summary="the adapter alone in PEFT's layout (adapter_config.json + adapter_model.safetensors)")
