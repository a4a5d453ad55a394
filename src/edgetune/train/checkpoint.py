"""Checkpoints: one safetensors file of every tensor + one JSON file of everything else.

Writing is atomic (temp file, fsync, rename) and the JSON, written last, is the commit marker: it holds the
SHA-256 of the tensor file, checked before anything is loaded. A checkpoint whose hash does not match, whose
JSON is not an edgetune checkpoint, or whose tensors do not fit the model is refused with a
:class:`CheckpointError` before any state is touched. Only the newest ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from edgetune.core.errors import CheckpointError
from edgetune.core.state import atomic_write_json, load_tensors, save_tensors, sha256_file
from edgetune.core.tree import join_tensors, split_tensors

__all__ = ["Checkpoint", "CheckpointManager", "check_fingerprint", "model_fingerprint"]

log = logging.getLogger(__name__)
FORMAT = "edgetune-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d{9})\.json$")


def model_fingerprint(model: nn.Module) -> dict[str, list[Any]]:
    """Name -> [shape, dtype] of every parameter and buffer; two models with equal fingerprints can swap state.

    A module may list tensors whose length changes during training (a sparse layer's links under a density
    schedule) in ``variable_shape_tensors``; their shape is recorded as ``"dynamic:<ndim>"``.
    """
    dynamic = {f"{name}.{t}" if name else t for name, mod in model.named_modules()
               for t in getattr(mod, "variable_shape_tensors", ())}
    return {k: [f"dynamic:{v.dim()}" if k in dynamic else list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in model.state_dict().items()}


def check_fingerprint(saved: dict[str, list[Any]], model: nn.Module, where: Path) -> None:
    """Raise CheckpointError naming the first differences when ``saved`` does not fit ``model``."""
    current = model_fingerprint(model)
    if saved == current:
        return
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    parts = []
    if missing:
        parts.append(f"the model has tensors the checkpoint lacks ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
    if extra:
        parts.append(f"the checkpoint has tensors the model lacks ({', '.join(extra[:3])}{'...' if len(extra) > 3 else ''})")
    for k in changed[:3]:
        parts.append(f"{k} is {saved[k][0]} {saved[k][1]} in the checkpoint but {current[k][0]} {current[k][1]} in the model")
    raise CheckpointError(
        f"checkpoint {where} was written for another model or topology: {'; '.join(parts)}. "
        "Resume with the recipe that wrote it, or start a new run."
    )


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    fingerprint: dict[str, list[Any]]


class CheckpointManager:
    """Saves, lists, verifies and prunes checkpoints in ``directory``."""

    def __init__(self, directory: str | Path, keep_last: int = 2) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, step: int, state: dict[str, Any], fingerprint: dict[str, list[Any]]) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        tree = split_tensors(state, "state", tensors)
        stem = f"step-{step:09d}"
        tensor_file = self.directory / f"{stem}.safetensors"
        sha = save_tensors(tensors, tensor_file, metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "tensors": tensor_file.name,
            "sha256": sha,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprint": fingerprint,
            "state": tree,
        }
        json_file = self.directory / f"{stem}.json"
        atomic_write_json(json_file, meta)
        log.debug("checkpoint written: %s", json_file)
        self._prune()
        return json_file

    def list(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def _prune(self) -> None:
        for old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
        """Read and verify a checkpoint JSON (and its tensor file); raise CheckpointError if anything is off."""
        path = Path(path)
        fix = "Delete it to resume from the previous checkpoint, or start a new run."
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({err}). {fix}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an edgetune checkpoint (no '{FORMAT}' marker).")
        if meta.get("version") != VERSION:
            raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')}, expected {VERSION}.")
        tensor_file = path.parent / str(meta.get("tensors", ""))
        if not tensor_file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: its tensor file {tensor_file.name} is missing. {fix}")
        if sha256_file(tensor_file) != meta.get("sha256"):
            raise CheckpointError(
                f"checkpoint {tensor_file} is corrupt: its SHA-256 does not match the one recorded in {path.name}. {fix}"
            )
        try:
            tensors = load_tensors(tensor_file, device=device)
            state = join_tensors(meta["state"], tensors)
        except (SafetensorError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} cannot be decoded ({err}). {fix}") from None
        return Checkpoint(path=path, step=int(meta["step"]), state=state, fingerprint=meta["fingerprint"])
