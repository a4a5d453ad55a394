"""Adapter files: the adapter alone, in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from edgetune.adapters.model import adapter_configs, adapter_state_dict
from edgetune.core.state import atomic_write_bytes, save_tensors

__all__ = ["save_adapter"]


def save_adapter(model: nn.Module, folder: str | Path, name: str = "default") -> list[Path]:
    """Write adapter ``name`` of ``model`` into ``folder``; return the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = adapter_configs(model)[name]
    tensors = {f"base_model.model.{k}": v.contiguous() for k, v in adapter_state_dict(model, name).items()}
    weights = folder / "adapter_model.safetensors"
    save_tensors(tensors, weights, metadata={"format": "pt"})
    conf = folder / "adapter_config.json"
    atomic_write_bytes(conf, json.dumps({"edgetune": cfg.to_dict()}, indent=2).encode())
    return [conf, weights]
