"""Read weight files (safetensors or torch state dicts) and load them into a model with clear errors.

:func:`load_weight_file` reads a file into a flat ``{name: tensor}`` dict; torch files are read with
``weights_only=True`` so a pickle that carries arbitrary objects is refused rather than executed.
:func:`load_weights_into` checks names *and* shapes before touching the model, so a mismatch is reported
as one message listing the first few missing, unexpected and mis-shaped tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgetune.core.errors import CheckpointError

__all__ = ["StateDict", "load_weight_file", "load_weights_into", "strip_prefix"]

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_SHOW = 5  # names listed per kind of mismatch


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> StateDict:
    """``state`` with ``prefix`` removed from every name, when *every* name has it (DataParallel/DDP saves)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _unwrap(obj: Any, path: Path) -> StateDict:
    """The tensor dict inside a loaded torch object: the object itself or one ``{"state_dict": ...}`` level."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__}, not a state dict of tensors (nor one wrapped as "
        f"{{'state_dict': ...}}). Save the weights with torch.save(model.state_dict(), path) or "
        "safetensors.torch.save_file(model.state_dict(), path), and point at that file."
    )


def load_weight_file(path: str | os.PathLike[str]) -> StateDict:
    """Read a weight file into ``{name: tensor}`` on CPU.

    ``.safetensors`` files are read with safetensors; anything else as a torch file with
    ``weights_only=True`` (tolerating a ``{"state_dict": ...}`` wrapper). A ``module.`` prefix on every name
    (a DataParallel/DDP save) is removed. Raises :class:`CheckpointError` for a missing, unreadable or
    corrupt file, or a pickle that needs arbitrary code to load.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"weight file {p} does not exist (or is not a file). Check the path in the recipe "
            "(model.weights) or on the command line; relative paths are resolved from the working directory."
        )
    if p.suffix == ".safetensors" or _looks_like_safetensors(p):
        state = _read_safetensors(p)
    else:
        state = _unwrap(_read_torch(p), p)
    log.debug("read %d tensors from %s", len(state), p)
    return strip_prefix(state)


def _looks_like_safetensors(p: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length and then ``{``."""
    with p.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < p.stat().st_size


def _read_safetensors(p: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise CheckpointError(
            f"could not read {p} as safetensors ({type(exc).__name__}: {exc}). The file is truncated or "
            "corrupt: copy or download it again, or re-export it with safetensors.torch.save_file."
        ) from exc


def _read_torch(p: Path) -> Any:
    import pickle

    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {p}: it is a pickle that holds more than tensors (weights_only=True rejected "
            f"it: {str(exc).splitlines()[0]}). edgetune never runs code from a weight file. Re-save it as a "
            "plain state dict (torch.save(model.state_dict(), path)) or as safetensors, from a Python session "
            "you trust."
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"could not read {p} as a torch or safetensors weight file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). The file is truncated, corrupt or "
            "of another format: copy it again, or save the weights with torch.save(model.state_dict(), path)."
        ) from exc


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def load_weights_into(
    model: nn.Module,
    path_or_state: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    strict: bool = True,
) -> nn.Module:
    """Copy weights into ``model`` after checking names and shapes; return ``model``.

    strict=True: every model tensor must be in the file and nothing else; strict=False: missing and
    unexpected names are logged and skipped. Shapes must match in both modes. Raises
    :class:`CheckpointError` naming the first few offending tensors (with shapes) and how to fix it.
    """
    if isinstance(path_or_state, Mapping):
        state, where = strip_prefix(path_or_state), "the given state dict"
    else:
        state, where = load_weight_file(path_or_state), str(path_or_state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems: list[str] = []
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} tensors differ in shape: {_names(mis_shaped)}")
    if strict and missing:
        problems.append(f"{len(missing)} model tensors are missing from the file: {_names(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} tensors in the file are not in the model: {_names(unexpected)}")
    if problems:
        raise CheckpointError(
            f"the weights in {where} do not fit {type(model).__name__}: "
            + "; ".join(problems)
            + ". Check that "
            "the model options (architecture, widths, number of classes) are those the weights were trained "
            "with; to load a backbone into a model with a new head, load with strict=False (missing/unexpected "
            "names are then skipped, but shapes must still match)."
        )
    if missing or unexpected:
        log.info(
            "loading %s non-strictly: %d missing, %d unexpected tensors", where, len(missing), len(unexpected)
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model
