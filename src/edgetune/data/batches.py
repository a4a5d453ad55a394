"""Batches, the splits they come from, and per-batch transforms.

A batch is either a list of tensors whose last one is the target (``[x, y]``, ``[src, tgt_in, tgt_out]``;
the model is called as ``model(*batch[:-1])``) or a dict of tensors in the Hugging Face style
(``{"input_ids", "attention_mask", "labels"}``; the model is called as ``model(**inputs)`` and
``"labels"`` is the target). A split is anything with ``len()`` that :func:`take` can index with a
``LongTensor`` of example positions: a ``TensorDataset`` (list batches) or a :class:`DictDataset`
(dict batches).

A transform maps a batch to a batch after it is moved to the device (uint8 images to normalized float,
resizing, grey to RGB, trimming padding), so data stay compact in memory and the work is done per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = [
    "Batch",
    "BatchTransform",
    "DictDataset",
    "Split",
    "batch_inputs",
    "batch_size_of",
    "batch_target",
    "compose",
    "map_images",
    "split_len",
    "take",
    "to_device",
]

Batch = list[Tensor] | dict[str, Tensor]
BatchTransform = Callable[[Batch], Batch]
TARGET_KEY = "labels"


class DictDataset:
    """Named columns of equal length; ``labels`` is the target. Indexing yields dict batches.

    columns: e.g. ``{"input_ids": (N, T) long, "attention_mask": (N, T) long, "labels": (N,) long}``.
    """

    def __init__(self, columns: Mapping[str, Tensor]) -> None:
        if not columns:
            raise ValueError("DictDataset needs at least one column")
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"DictDataset columns differ in length: {lengths}")
        self.columns: dict[str, Tensor] = dict(columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def take(self, idx: Tensor) -> dict[str, Tensor]:
        return {k: v[idx] for k, v in self.columns.items()}

    def subset(self, idx: Tensor) -> DictDataset:
        return DictDataset(self.take(idx))

    @property
    def targets(self) -> Tensor | None:
        return self.columns.get(TARGET_KEY)


Split = TensorDataset | DictDataset


def split_len(split: Any) -> int:
    return len(split)


def take(split: Any, idx: Tensor) -> Batch:
    """The examples at positions ``idx`` ``(B,)`` of ``split`` as one batch (on the split's device)."""
    if isinstance(split, TensorDataset):
        return [t[idx] for t in split.tensors]
    return split.take(idx)


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return [t.to(device, non_blocking=True) for t in batch]


def batch_target(batch: Batch) -> Tensor:
    return batch[TARGET_KEY] if isinstance(batch, dict) else batch[-1]


def batch_inputs(batch: Batch) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """``(args, kwargs)`` to call the model with: list batches positionally, dict batches by keyword."""
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != TARGET_KEY}
    return tuple(batch[:-1]), {}


def batch_size_of(batch: Batch) -> int:
    return len(batch_target(batch))


def map_images(batch: Batch, key: str, fn: Callable[[Tensor], Tensor]) -> Batch:
    """``fn`` applied to a list batch's first tensor or to a dict batch's ``key`` column (absent: unchanged)."""
    if isinstance(batch, dict):
        if key not in batch:
            return batch
        return {**batch, key: fn(batch[key])}
    return [fn(batch[0]), *batch[1:]]


def compose(*transforms: BatchTransform | None) -> BatchTransform | None:
    """Apply the given transforms in order (``None`` entries skipped); ``None`` when there are none."""
    fns = [t for t in transforms if t is not None]
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]

    def run(batch: Batch) -> Batch:
        for fn in fns:
            batch = fn(batch)
        return batch

    return run
