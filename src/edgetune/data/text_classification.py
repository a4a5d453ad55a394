"""Raw-text classification splits, and the checks and splits every text loader shares.

A :class:`TextDataset` holds strings and int64 labels; it is what the text loaders (``spamassassin``,
``brown``, ``text-csv``, ``text-jsonl``) put in a :class:`~edgetune.data.base.DataBundle`. It is not
batched directly: :func:`edgetune.data.tokenize.tokenize_bundle` turns every split into a
:class:`~edgetune.data.batches.DictDataset` (``input_ids``, ``attention_mask``, ``labels``) for the model's
tokenizer (or :class:`~edgetune.data.tokenize.ByteTokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from edgetune.core.errors import DataError
from edgetune.data.base import DataBundle, DataConfig
from edgetune.data.common import make_bundle, stratified_holdout

__all__ = ["TextDataset", "check_classes", "encode_labels", "holdout_split", "make_text_bundle"]


class TextDataset:
    """``N`` texts and their class ids ``labels (N,)`` int64."""

    def __init__(self, texts: Sequence[str], labels: Tensor) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"TextDataset has {len(texts)} texts but {len(labels)} labels")
        self.texts: list[str] = list(texts)
        self.labels: Tensor = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], int(self.labels[i])

    def subset(self, idx: Tensor) -> TextDataset:
        """The examples at positions ``idx (K,)``, in that order."""
        pos = idx.tolist()
        return TextDataset([self.texts[i] for i in pos], self.labels[idx])

    @property
    def targets(self) -> Tensor:
        return self.labels

    def __repr__(self) -> str:
        return f"TextDataset({len(self)} texts)"


def encode_labels(raw: Sequence[str | int], *, what: str) -> tuple[list[int], list[str]]:
    """Map raw labels to class ids: ints are kept (class names ``"0".."K-1"``), strings sorted -> ids.

    Raises :class:`DataError` (naming ``what``, e.g. the file) on negative ints or a mix of kinds.
    """
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        ints = [int(v) for v in raw]
        if ints and min(ints) < 0:
            raise DataError(
                f"{what}: integer labels must be class ids 0..K-1, found {min(ints)}. Renumber the labels "
                "from 0, or write them as strings (class names) and edgetune will number them."
            )
        k = max(ints) + 1 if ints else 0
        return ints, [str(i) for i in range(k)]
    if all(isinstance(v, str) for v in raw):
        names = sorted(set(raw))  # type: ignore[arg-type]
        ids = {n: i for i, n in enumerate(names)}
        return [ids[v] for v in raw], names  # type: ignore[index]
    kinds = sorted({type(v).__name__ for v in raw})
    raise DataError(
        f"{what}: labels mix kinds ({', '.join(kinds)}); use all integers (class ids) or all strings "
        "(class names)."
    )


def check_classes(name: str, labels: Tensor, class_names: Sequence[str], *, where: str) -> None:
    """Raise :class:`DataError` when a split has no examples, one class only, or a class with none.

    labels ``(N,)``: class ids of the training examples (before any limit); where: file or folder, for
    the message.
    """
    if len(labels) == 0:
        raise DataError(
            f"dataset {name!r}: no examples found in {where}; check the path and the file contents."
        )
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    if len(class_names) < 2 or sum(c > 0 for c in counts) < 2:
        raise DataError(
            f"dataset {name!r}: every example in {where} has the same class "
            f"({class_names[int(labels[0])] if class_names else int(labels[0])!r}); classification needs at "
            "least two classes. Check the label column / class folders."
        )
    empty = [class_names[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        shown = ", ".join(repr(e) for e in empty[:5]) + (
            f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        )
        raise DataError(
            f"dataset {name!r}: {len(empty)} of {len(class_names)} classes have no training examples in "
            f"{where}: {shown}. Integer labels must run 0..K-1 without gaps (renumber them, or use string "
            "class names); a class folder must hold at least one file."
        )


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified ``(train_idx, test_idx)`` over ``labels (N,)``: ~``fraction`` of each class to test."""
    return stratified_holdout(np.asarray(labels), fraction, np.random.default_rng([seed, 0]))


def make_text_bundle(
    cfg: DataConfig,
    *,
    name: str,
    train: TextDataset,
    test: TextDataset,
    class_names: Sequence[str],
    source: str,
    notes: Sequence[str] = (),
) -> DataBundle:
    """Check the classes of ``train`` and apply ``cfg``'s limits and validation split (see make_bundle)."""
    check_classes(name, train.labels, class_names, where=source)
    if len(test) == 0:
        raise DataError(
            f"dataset {name!r}: the test split from {source} is empty; give a test file or test_fraction > 0."
        )
    return make_bundle(
        cfg,
        name=name,
        task="classification",
        train=train,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        source=source,
        notes=notes,
        input_shape=(),
    )
