"""Training-time callbacks of adapter methods that have state (chains of links, sampled ranks, gate steps).

A method registers ``callbacks=fn(model, cfg, total_steps, steps_per_epoch) -> list[Callback]`` as metadata of
its :data:`ADAPTERS` entry; :func:`adapter_callbacks` collects them for one adapter of a model. Plain LoRA has
none. Outside edgetune's loop, hand them to :class:`edgetune.integrations.MethodStepper`.
"""

from __future__ import annotations

from torch import nn

from edgetune.adapters.config import ADAPTERS
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback

__all__ = ["AdapterReport", "adapter_callbacks"]


def adapter_callbacks(model: nn.Module, name: str = "default", *, total_steps: int,
                      steps_per_epoch: int | None = None) -> list[Callback]:
    """The callbacks adapter ``name`` needs during ``total_steps`` optimizer steps (empty for plain LoRA)."""
    from edgetune.adapters.model import adapter_configs

    cfg = adapter_configs(model).get(name)
    if cfg is None:
        raise ConfigError(f"the model has no adapter named {name!r}; its adapters: {list(adapter_configs(model))}")
    make = ADAPTERS.entry(cfg.method).meta.get("callbacks")
    if make is None:
        return []
    return list(make(model, cfg, int(total_steps), int(steps_per_epoch or total_steps)))


class AdapterReport(Callback):
    """Reports an adapter's size beside the run's metrics: parameters, trainable ones, bytes, optimizer state."""

    name = "adapter-report"

    def __init__(self, model: nn.Module, adapter: str) -> None:
        self.model, self.adapter = model, adapter

    def metrics(self) -> dict[str, float]:
        from edgetune.adapters.model import adapter_report

        rep = adapter_report(self.model)
        row = rep["adapters"].get(self.adapter, {})
        return {"adapter_parameters": float(row.get("parameters", 0)),
                "adapter_trainable": float(row.get("trainable", 0)),
                "adapter_bytes": float(row.get("bytes", 0)),
                "adapter_trainable_fraction": float(rep["trainable_fraction"]),
                "optimizer_state_bytes": float(rep["optimizer_state_bytes"])}
