"""The TOPIC/CEC index lists of the standard CIFAR-100 few-shot class-incremental (FSCIL) split.

The split that TOPIC (Tao et al., CVPR 2020) introduced and CEC, FACT, TEEN, SAVC, NC-FSCIL... reuse comes as
text files ``session_1.txt`` .. ``session_9.txt`` (public repository xyutao/fscil, folder
``data/index_list/cifar100/``). Each line is one bare decimal integer: an index into the CIFAR-100 *train*
set in its original order (the ``train`` file of ``cifar-100-python``, 50000 images). ``session_1.txt`` lists
the base session (30000 lines: every training image of the fine classes 0-59); ``session_2.txt`` ..
``session_9.txt`` list 25 indices each, 5 shots of each of 5 new classes (60-64, 65-69, ..., 95-99). The
files carry no labels: the classes of a session are the train labels of its indices. After session ``s``
the test set is every test image of every class seen so far (the lists' ``test_*.txt`` are not needed).

:func:`read_index_lists` reads the files; :func:`split_from_index_lists` pairs them with the train/test
labels into an :class:`~edgetune.data.splits.IncrementalSplit`. Incremental sessions whose classes do not
all have the same number of shots are refused (DataError), not warned about: in the published lists every
new class has exactly 5 shots, so an uneven count means the labels do not belong to the lists (coarse labels,
a reordered or filtered train set) or the file was edited; build such a split with
:func:`~edgetune.data.splits.class_incremental_split` or an :class:`IncrementalSplit` by hand instead.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from edgetune.core.errors import ConfigError, DataError
from edgetune.data.splits import IncrementalSplit

__all__ = ["SESSION_FILE", "read_index_lists", "split_from_index_lists"]

log = logging.getLogger(__name__)

SESSION_FILE = "session_{}.txt"
_SESSION_RE = re.compile(r"session_(\d+)\.txt")
_INT_RE = re.compile(r"[0-9]+")
_WHERE = "xyutao/fscil data/index_list/cifar100/"


@dataclass(frozen=True)
class _IndexList:
    path: Path
    indices: np.ndarray  # (n,) int64, file order
    lines: np.ndarray  # (n,) int64, the 1-based line each index came from

    def where(self, i: int) -> str:
        return f"{str(self.path)!r} line {int(self.lines[i])}"


def _session_paths(folder: Path, num_sessions: int | None) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"FSCIL index-list folder {str(folder)!r} does not exist or is not a folder; point "
                        f"it at the folder holding session_1.txt .. session_9.txt (from {_WHERE}).")
    if num_sessions is not None:
        if isinstance(num_sessions, bool) or not isinstance(num_sessions, int) or num_sessions < 1:
            raise ConfigError(f"num_sessions must be an integer >= 1 (9 for CIFAR-100), got {num_sessions!r}")
        expected = list(range(1, num_sessions + 1))
    else:
        found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SESSION_RE.fullmatch(p.name)))
        expected = list(range(1, max(found, default=1) + 1))
    missing = [SESSION_FILE.format(i) for i in expected if not (folder / SESSION_FILE.format(i)).is_file()]
    if missing:
        raise DataError(
            f"FSCIL index lists in {str(folder)!r}: missing {', '.join(missing)}. Expected one file per "
            f"session, {SESSION_FILE.format(1)} (base session) to {SESSION_FILE.format(expected[-1])} with "
            f"no gap (CIFAR-100: session_1.txt .. session_9.txt, from {_WHERE})."
        )
    return [folder / SESSION_FILE.format(i) for i in expected]


def _read_list(path: Path) -> _IndexList:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read FSCIL index list {str(path)!r} ({type(err).__name__}: {err}); it "
                        "should be a text file with one integer per line.") from err
    values: list[int] = []
    lines: list[int] = []
    first_line: dict[int, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        item = raw.strip()
        if not item:
            continue
        if not _INT_RE.fullmatch(item):
            raise DataError(
                f"{str(path)!r} line {lineno}: {item[:60]!r} is not a non-negative integer index. The "
                "CIFAR-100 FSCIL lists hold one train-set index per line; lists of image paths "
                "(miniImageNet, CUB-200) are not read by this function."
            )
        value = int(item)
        if value in first_line:
            raise DataError(f"{str(path)!r} line {lineno}: index {value} repeats line {first_line[value]}; "
                            "each training image may appear once per session.")
        first_line[value] = lineno
        values.append(value)
        lines.append(lineno)
    if not values:
        raise DataError(f"FSCIL index list {str(path)!r} holds no index; it should list one train-set index "
                        "per line.")
    return _IndexList(path, np.asarray(values, dtype=np.int64), np.asarray(lines, dtype=np.int64))


def _read_all(folder: str | Path, num_sessions: int | None) -> list[_IndexList]:
    return [_read_list(p) for p in _session_paths(Path(folder), num_sessions)]


def read_index_lists(folder: str | Path, num_sessions: int | None = None) -> list[Tensor]:
    """Read ``session_1.txt`` .. ``session_T.txt`` from ``folder``: one ``(n_s,)`` int64 tensor per session.

    Indices stay in file order. ``num_sessions``: read exactly ``session_1..session_{num_sessions}`` (others
    ignored); None reads every ``session_<i>.txt`` found, which must run from 1 with no gap.
    Raises :class:`DataError` naming the file (and line) for missing files, a line that is not a
    non-negative integer, a repeated index within a file, or an empty file.
    """
    return [torch.from_numpy(item.indices.copy()) for item in _read_all(folder, num_sessions)]


def _labels(labels: Tensor | np.ndarray, what: str) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be a 1-d tensor of class ids (N,), got shape {tuple(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def split_from_index_lists(
    folder: str | Path,
    train_labels: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    *,
    num_sessions: int | None = None,
) -> IncrementalSplit:
    """The FSCIL split the index lists define: session ``s`` trains on the images ``session_{s+1}.txt`` lists.

    train_labels ``(N,)``: class ids of the train set in the order the lists index (CIFAR-100: the fine
    labels of the whole 50000-image train file, no hold-out, shuffle or class subset). test_labels ``(M,)``.
    Returns classes[s] (sorted class ids the session introduces), train[s] (sorted indices) and test[s]
    (sorted indices of every test example of the classes seen up to session s).
    Raises :class:`DataError` naming the file and line for: an index outside ``0..N-1``, a session that
    introduces a class an earlier session already had, an incremental session (file 2 onwards) whose
    classes have unequal shot counts (see the module docstring); plus :func:`read_index_lists`' errors.
    """
    y_train, y_test = _labels(train_labels, "train_labels"), _labels(test_labels, "test_labels")
    lists = _read_all(folder, num_sessions)
    n = len(y_train)
    for item in lists:
        bad = np.flatnonzero(item.indices >= n)
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{item.where(i)}: index {int(item.indices[i])} is out of range of the train set ({n} "
                f"examples, indices 0..{n - 1}). The lists index the full CIFAR-100 train set in its "
                "original order (50000 images): pass the labels of the whole train split, without a "
                "validation hold-out, shuffling or class subset."
            )
    classes: list[list[int]] = []
    owner: dict[int, int] = {}  # class -> session (0-based) that introduced it
    for s, item in enumerate(lists):
        labels = y_train[item.indices]
        for i, c in enumerate(labels.tolist()):
            if owner.get(c, s) != s:
                raise DataError(
                    f"{item.where(i)}: index {int(item.indices[i])} has class {c}, which "
                    f"{lists[owner[c]].path.name} already introduced; sessions must introduce disjoint "
                    "classes. Are these the fine CIFAR-100 labels of the train set in its original order?"
                )
            owner[c] = s
        session_classes, counts = np.unique(labels, return_counts=True)
        if s > 0 and len(set(counts.tolist())) > 1:
            mode = int(np.bincount(counts).argmax())
            odd = [int(c) for c, k in zip(session_classes, counts, strict=True) if k != mode]
            odd_lines = [int(ln) for ln in item.lines[np.isin(labels, odd)][:10]]
            per_class = ", ".join(f"class {c}: {k}" for c, k in zip(session_classes, counts, strict=True))
            raise DataError(
                f"{str(item.path)!r}: the session's classes have unequal shot counts ({per_class}); classes "
                f"{odd} (lines {odd_lines}) differ from the usual {mode}. The published lists have 5 shots "
                "of each new class: check that the labels belong to these lists, or build an uneven split "
                "with class_incremental_split / IncrementalSplit by hand."
            )
        classes.append([int(c) for c in session_classes])
    train = [torch.from_numpy(np.sort(item.indices)) for item in lists]
    test: list[Tensor] = []
    seen: list[int] = []
    for session_classes in classes:
        seen += session_classes
        test.append(torch.from_numpy(np.flatnonzero(np.isin(y_test, seen)).astype(np.int64)))
    untested = sorted(set(seen) - {int(c) for c in np.unique(y_test)})
    if untested:
        log.warning("FSCIL split from %s: classes %s have no test example; their accuracy cannot be measured "
                    "(are the test labels the fine labels of the matching test set?)", folder, untested[:10])
    log.info("FSCIL split from %s: %d sessions, base %d classes / %d images, then %s new classes per "
             "session", folder, len(lists), len(classes[0]), len(train[0]), [len(c) for c in classes[1:]])
    return IncrementalSplit(classes=classes, train=train, test=test)
