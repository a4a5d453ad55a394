"""Split nested state (dicts/lists of tensors and plain values) into flat tensors + JSON, and back.

Used by checkpoints: tensors go to one safetensors file under slash-joined keys, everything else to JSON,
with a placeholder ``{"__tensor__": key}`` where a tensor was.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["join_tensors", "split_tensors"]


def split_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Return a JSON-able copy of ``obj`` with tensors moved into ``out`` under ``prefix/...`` keys."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        out[prefix] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state keys must be str or int at {prefix!r}")
        return {
            "__dict__": [[k, split_tensors(v, f"{prefix}/{k}", out)] for k, v in obj.items()],
        }
    if isinstance(obj, (list, tuple)):
        items = [split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: join_tensors(v, tensors) for k, v in obj["__dict__"]}
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj
