"""The one place where a loader's raw arrays become a :class:`DataBundle`.

:func:`make_bundle` applies, for every loader alike and in this order:

1. ``limit_train`` / ``limit_test``: a seeded random subset of N examples (a shuffle, then the first N),
   kept in the original order;
2. ``val_fraction``: held out of the (limited) training split, stratified by class for classification
   (per class ``round(fraction * count)``, at least 1 and at most ``count - 1`` when the class has two
   or more examples), a seeded random subset of the windows for lm / seq2seq;
3. ``classes``: only those classes are kept, in every split, relabelled by their position in the list.

Each step has its own random stream derived from ``cfg.seed``, so the test subset does not change when
``limit_train`` does. A split is given as tensors (last = target) or as a split object with ``targets``
and ``subset(idx)`` (:class:`~edgetune.data.text_classification.TextDataset`,
:class:`~edgetune.data.batches.DictDataset`); the steps act the same on both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from edgetune.data.base import DataBundle, DataConfig, DataSplit, Task
from edgetune.data.batches import TARGET_KEY, BatchTransform, DictDataset

__all__ = ["images_to_tensor", "images_to_uint8", "make_bundle", "random_subset", "stratified_holdout"]

log = logging.getLogger(__name__)

# stream ids mixed into cfg.seed so each step draws independently
_LIMIT_TRAIN, _LIMIT_TEST, _VAL = 1, 2, 3


def random_subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``limit`` examples out of ``n`` drawn by ``rng`` (all of them when limit >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.permutation(n)[:limit])


def stratified_holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``labels`` ``(N,)`` into ``(kept, held)``, both sorted, held ~ fraction per class."""
    labels = np.asarray(labels)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = round(fraction * len(idx))
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.append(rng.permutation(idx)[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def images_to_tensor(images: np.ndarray, scale: float = 255.0) -> Tensor:
    """uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` -> float32 tensor ``(N, C, H, W)`` in [0, 1]."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x.div_(scale) if scale != 1.0 else x


def images_to_uint8(images: np.ndarray) -> Tensor:
    """uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` -> uint8 tensor ``(N, C, H, W)`` (shares memory)."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"images_to_uint8 expects uint8 images, got {arr.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(arr))
    return x.unsqueeze(1) if x.ndim == 3 else x


# A split while it is being built: a tuple of tensors (last = target) or an object with subset/targets.
_Raw = Any


def _len(split: _Raw) -> int:
    return len(split[0]) if isinstance(split, tuple) else len(split)


def _labels(split: _Raw) -> Tensor:
    return split[-1] if isinstance(split, tuple) else split.targets


def _take(split: _Raw, idx: np.ndarray) -> _Raw:
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == _len(split) and np.array_equal(idx, np.arange(len(idx))):
        return split  # everything, in order: no copy
    index = torch.from_numpy(idx)
    if isinstance(split, tuple):
        return tuple(t.index_select(0, index) for t in split)
    return split.subset(index)


def _wrap(split: _Raw) -> DataSplit:
    return TensorDataset(*split) if isinstance(split, tuple) else split


def _relabel(split: _Raw, keep: list[int]) -> _Raw:
    """The examples of ``keep``'s classes, labels replaced by their position in ``keep``."""
    y = _labels(split)
    lut = torch.full((max(int(y.max()) + 1 if len(y) else 0, max(keep) + 1),), -1, dtype=torch.int64)
    lut[torch.tensor(keep)] = torch.arange(len(keep))
    idx = torch.nonzero(lut[y] >= 0).flatten().numpy() if len(y) else np.zeros(0, np.int64)
    part = _take(split, idx)
    new = lut[_labels(part)]
    if isinstance(part, tuple):
        return (*part[:-1], new)
    if isinstance(part, DictDataset):
        return DictDataset({**part.columns, TARGET_KEY: new})
    return type(part)(part.texts, new)  # TextDataset


def _keep_classes(cfg: DataConfig, name: str, task: Task, train: _Raw, test: _Raw, val: DataSplit | None,
                  num_classes: int, class_names: Sequence[str]) -> tuple[Any, ...]:
    from edgetune.core.errors import ConfigError

    keep = list(cfg.classes or [])
    if task != "classification":
        raise ConfigError(f"data.classes keeps classes of a classification dataset, but {name!r} is {task}; "
                          "remove data.classes")
    unknown = [c for c in keep if c >= num_classes]
    if unknown:
        raise ConfigError(f"data.classes names {unknown}, but {name!r} has classes 0-{num_classes - 1}; "
                          "fix data.classes")
    train, test = _relabel(train, keep), _relabel(test, keep)
    if val is not None:
        raw = val.tensors if isinstance(val, TensorDataset) else val
        val = _wrap(_relabel(raw, keep))
    names = [class_names[c] for c in keep] if len(class_names) == num_classes else []
    return train, test, val, len(keep), names


def make_bundle(
    cfg: DataConfig,
    *,
    name: str,
    task: Task,
    train: Sequence[Tensor] | DataSplit,
    test: Sequence[Tensor] | DataSplit,
    num_classes: int,
    class_names: Sequence[str] = (),
    source: str = "",
    notes: Sequence[str] = (),
    input_shape: tuple[int, ...] | None = None,
    transform: BatchTransform | None = None,
) -> DataBundle:
    """Apply ``cfg.limit_*`` and ``cfg.val_fraction`` to raw splits and wrap them in a DataBundle.

    train / test: tensors with a common first dim N whose last one is the target, e.g. ``x (N, C, H, W)``
    uint8 and ``y (N,)`` int64 for classification, ``(src, tgt_in, tgt_out)`` each ``(N, T)`` for seq2seq;
    or split objects with ``targets (N,)`` and ``subset(idx)`` (TextDataset, DictDataset).
    input_shape: shape of one input; default ``train[0].shape[1:]`` for tensors, ``()`` for raw text.
    transform: the per-batch transform the loop applies (e.g. ``ToFloat()`` for uint8 images).
    """
    train = tuple(train) if isinstance(train, (list, tuple)) else train
    test = tuple(test) if isinstance(test, (list, tuple)) else test
    seeds = {k: np.random.default_rng([cfg.seed, k]) for k in (_LIMIT_TRAIN, _LIMIT_TEST, _VAL)}
    train = _take(train, random_subset(_len(train), cfg.limit_train, seeds[_LIMIT_TRAIN]))
    test = _take(test, random_subset(_len(test), cfg.limit_test, seeds[_LIMIT_TEST]))
    val = None
    if cfg.val_fraction > 0:
        n = _len(train)
        if task == "classification":
            kept, held = stratified_holdout(_labels(train).numpy(), cfg.val_fraction, seeds[_VAL])
        else:
            perm = seeds[_VAL].permutation(n)
            k = round(cfg.val_fraction * n)
            kept, held = np.sort(perm[k:]), np.sort(perm[:k])
        val = _wrap(_take(train, held))
        train = _take(train, kept)
    if cfg.classes is not None:
        train, test, val, num_classes, class_names = _keep_classes(cfg, name, task, train, test, val, num_classes,
                                                                   class_names)
    if input_shape is None:
        input_shape = tuple(train[0].shape[1:]) if isinstance(train, tuple) else ()
    bundle = DataBundle(
        name=name,
        task=task,
        train=_wrap(train),
        test=_wrap(test),
        val=val,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        class_names=list(class_names),
        source=source,
        notes=list(notes),
        transform=transform,
    )
    log.info(
        "dataset %s: %d train, %d val, %d test examples, %d classes, from %s",
        name,
        len(bundle.train),
        len(val) if val is not None else 0,
        len(bundle.test),
        num_classes,
        source,
    )
    return bundle
