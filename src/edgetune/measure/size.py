"""How big a model is: parameters, non-zero weights, bytes in memory and bytes on disk.

Non-zero protocol
-----------------
A module may report its own count of non-zero weights through an optional method ``count_nonzeros() -> int``.
:func:`count_nonzeros` calls it instead of looking at that module's tensors (and those of its
children), so a sparse layer that stores a dense weight plus a mask, or packed values plus indices,
can say exactly how many weights it *really* has. A layer implementing ``count_nonzeros()`` must count every
weight of its whole subtree. Everything else is counted from its tensors:

- dense floating tensors: entries that are not zero (``torch.count_nonzero``);
- torch sparse tensors (COO, CSR, CSC, BSR, BSC): stored values, explicit zeros included, because
  those are what the device stores and multiplies;
- integer and boolean tensors (step counters, masks, indices) are not weights and are skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from edgetune.core.errors import EdgetuneError

__all__ = [
    "bytes_on_disk",
    "count_nonzeros",
    "count_parameters",
    "state_dict_bytes",
    "tensor_bytes",
    "tensor_nonzeros",
]

log = logging.getLogger(__name__)

_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (shared parameters counted once).

    Sparse parameters count their full dense shape; use :func:`count_nonzeros` for stored weights.
    With ``trainable_only`` only parameters with ``requires_grad`` are counted.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def tensor_nonzeros(t: torch.Tensor) -> int:
    """Non-zero weights of one tensor; 0 for integer/bool tensors (see the module docstring)."""
    if t.layout == torch.sparse_coo:
        return int(t._values().numel())  # stored values, coalesced or not: (nnz, *dense_dims)
    if t.layout in _COMPRESSED:
        return int(t.values().numel())
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    if t.device.type == "meta":
        raise EdgetuneError(
            f"cannot count non-zeros of a meta tensor of shape {tuple(t.shape)}: it holds no values; "
            "materialize the model (e.g. model.to_empty(device='cpu') and load weights) first"
        )
    return int(torch.count_nonzero(t.detach()).item())


def _module_nonzeros(module: nn.Module, seen: set[int], include_buffers: bool) -> int:
    nnz_fn = getattr(module, "count_nonzeros", None)
    if callable(nnz_fn):
        return int(nnz_fn())
    total = 0
    own = list(module.parameters(recurse=False))
    if include_buffers:
        own += list(module.buffers(recurse=False))
    for t in own:
        if id(t) not in seen:  # tied weights are stored once
            seen.add(id(t))
            total += tensor_nonzeros(t)
    for child in module.children():
        if id(child) not in seen:
            seen.add(id(child))
            total += _module_nonzeros(child, seen, include_buffers)
    return total


def count_nonzeros(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], *, include_buffers: bool = False
) -> int:
    """Non-zero weights of a module or a state dict.

    For a module, parameters are counted (floating buffers too with ``include_buffers``) and any
    submodule with a ``count_nonzeros()`` method reports its own subtree. For a state dict every floating or
    sparse tensor is counted (a state dict does not say which entries are buffers).
    """
    if isinstance(model_or_state_dict, nn.Module):
        return _module_nonzeros(model_or_state_dict, set(), include_buffers)
    if isinstance(model_or_state_dict, Mapping):
        return sum(tensor_nonzeros(t) for t in model_or_state_dict.values() if isinstance(t, torch.Tensor))
    raise EdgetuneError(
        f"count_nonzeros expects an nn.Module or a state dict, got {type(model_or_state_dict).__name__}; "
        "pass the model itself or model.state_dict()"
    )


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's values occupy in memory; a sparse tensor counts its indices plus its values."""
    if t.layout == torch.sparse_coo:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return tensor_bytes(t.crow_indices()) + tensor_bytes(t.col_indices()) + tensor_bytes(t.values())
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return tensor_bytes(t.ccol_indices()) + tensor_bytes(t.row_indices()) + tensor_bytes(t.values())
    return t.numel() * t.element_size()


def state_dict_bytes(state_dict: Mapping[str, torch.Tensor] | nn.Module) -> int:
    """Bytes of the tensors of a state dict (or of ``module.state_dict()``) as held in memory.

    Identical views (tied weights appear under two keys) are counted once; distinct views of one
    storage are each counted by their own size. Sparse tensors count index + value storage.
    """
    sd = state_dict.state_dict() if isinstance(state_dict, nn.Module) else state_dict
    seen: set[tuple[object, ...]] = set()
    total = 0
    for t in sd.values():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout == torch.strided and t.device.type != "meta" and t.numel() > 0:
            key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
        total += tensor_bytes(t)
    return total


def bytes_on_disk(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a file, or the total of the files under a folder (symlinks not followed)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        total = 0
        for root, _dirs, files in os.walk(p):
            for name in files:
                f = Path(root) / name
                if not f.is_symlink():
                    total += f.stat().st_size
        return total
    raise EdgetuneError(f"cannot measure bytes on disk of {str(p)!r}: no such file or folder; check the path")
