"""Checkpoints: one safetensors file of every tensor + one JSON file of everything else.

Writing is atomic (temp file, fsync, rename) and the JSON, written last, is the commit marker: it holds the
SHA-256 of the tensor file and a ``checksum`` over its own content (the training state, the tensor file's
SHA-256, the fingerprint), so an edit to either file, even one that still parses (a learning rate, an epoch
position), is refused with a :class:`CheckpointError` naming the file before any state is touched; so is a
JSON that is not an edgetune checkpoint, or tensors that do not fit the model. Only the newest ``keep_last``
checkpoints are kept.

Format versions: 2 (this one) carries the JSON ``checksum``. Version 1 checkpoints, written before it,
are still resumed (their tensor file is verified, their JSON cannot be) with a warning in the log.

Opening a folder (:class:`CheckpointManager`) removes what a kill during a write left behind: the atomic
writer's temp files and a tensor file whose JSON was never written.
"""

from __future__ import annotations

import hashlib
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
from edgetune.core.state import atomic_write_json, load_tensors, remove_temp_files, save_tensors, sha256_file
from edgetune.core.tree import join_tensors, split_tensors

__all__ = ["Checkpoint", "CheckpointManager", "check_fingerprint", "model_fingerprint"]

log = logging.getLogger(__name__)
FORMAT = "edgetune-checkpoint"
VERSION = 2
LEGACY_VERSIONS = (1,)  # written before the JSON checksum: resumed with a warning
_NAME = re.compile(r"^step-(\d{9})\.json$")
_FILES = r"step-\d{9}\.(?:json|safetensors)"


def json_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint JSON's content, all keys but ``checksum``, in a canonical form.

    The form is that of the parsed file (``json.loads`` of what was written: int keys become strings, tuples
    lists), so the writer and the reader hash the same text whatever the key types were.
    """
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "checksum"}))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
        self._remove_interrupted_writes()

    def _remove_interrupted_writes(self) -> None:
        """Delete the temp files and JSON-less tensor files a kill during :meth:`save` left behind.

        Run when a run (re)starts in the folder, before anything writes to it: the JSON is the commit
        marker, so a tensor file without one belongs to no checkpoint.
        """
        remove_temp_files(self.directory, _FILES)
        if not self.directory.is_dir():
            return
        for blob in sorted(self.directory.glob("step-*.safetensors")):
            if re.fullmatch(_FILES, blob.name) and not blob.with_suffix(".json").exists():
                log.info("removing %s: a checkpoint write was interrupted before its JSON was written", blob)
                blob.unlink(missing_ok=True)

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
        meta["checksum"] = json_checksum(meta)
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
        version = meta.get("version")
        if version in LEGACY_VERSIONS:
            log.warning(
                "checkpoint %s has format version %s, written before checkpoints carried a checksum of their "
                "JSON: its tensors are verified, its training state (step, learning rate...) cannot be.",
                path,
                version,
            )
        elif version != VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {version!r}; this edgetune reads versions "
                f"{', '.join(map(str, (*LEGACY_VERSIONS, VERSION)))}. Resume it with the edgetune that wrote it, "
                "or start a new run."
            )
        elif meta.get("checksum") != json_checksum(meta):
            what = "has no checksum" if "checksum" not in meta else "does not match the checksum recorded in it"
            raise CheckpointError(
                f"checkpoint {path} was changed after it was written: its content {what}. An edited checkpoint "
                f"(learning rate, step, epoch, any value) is not resumed, since the run would not continue the "
                f"one that wrote it. {fix}"
            )
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
            return Checkpoint(path=path, step=int(meta["step"]), state=state, fingerprint=dict(meta["fingerprint"]))
        except (SafetensorError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} cannot be decoded ({type(err).__name__}: {err}). {fix}") from None
