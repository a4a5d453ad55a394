"""A fake CIFAR-100 folder in the python format and fake FSCIL index lists, for tests of the reader and recipes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

__all__ = ["fake_cifar100", "write_index_lists"]


def _dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def fake_cifar100(root: Path, per_class_train: int = 6, per_class_test: int = 2, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Write ``root/cifar-100-python`` (train, test, meta) with 100 classes in a shuffled order and random pixels;
    returns the fine train and test labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.repeat(np.arange(100), per_class_train))
    y_test = rng.permutation(np.repeat(np.arange(100), per_class_test))
    for name, y in (("train", y_train), ("test", y_test)):
        _dump(folder / name, {
            b"data": rng.integers(0, 256, (len(y), 3072), dtype=np.uint8),
            b"fine_labels": y.tolist(),
            b"coarse_labels": (y % 20).tolist(),  # superclasses cut across the sessions, as in CIFAR-100
        })
    _dump(folder / "meta", {
        b"fine_label_names": [b"f%d" % i for i in range(100)],
        b"coarse_label_names": [b"k%d" % i for i in range(20)],
    })
    return y_train, y_test


def write_index_lists(folder: Path, y_train: np.ndarray, shots: int = 5) -> list[list[int]]:
    """session_1: every train image of classes 0-59 (shuffled); session_s: ``shots`` shots of classes
    55+5s..59+5s, written shot by shot across the 5 classes, one bare integer per line, as in xyutao/fscil."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    lists = [rng.permutation(np.flatnonzero(y_train < 60)).tolist()]
    for s in range(8):
        per_class = [np.flatnonzero(y_train == c)[:shots] for c in range(60 + 5 * s, 65 + 5 * s)]
        lists.append([int(per_class[c][k]) for k in range(shots) for c in range(5)])
    for i, items in enumerate(lists, 1):
        (folder / f"session_{i}.txt").write_text("".join(f"{v}\n" for v in items))
    return lists
