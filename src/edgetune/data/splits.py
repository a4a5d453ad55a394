"""Class-incremental and few-shot splits: pure functions from label tensors to index tensors.

Few-shot class-incremental learning (FSCIL, e.g. CIFAR-100 60 base classes + 8 sessions x 5-way 5-shot)
trains a base session on every training example of the base classes, then each later session on
``shots`` examples of each new class; after session s the model is tested on every test example of all
classes seen so far. All draws come from ``numpy.random.default_rng(seed)``: same seed, same indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from edgetune.core.errors import ConfigError

__all__ = ["FewShotEpisode", "IncrementalSplit", "class_incremental_split", "few_shot_episode"]


@dataclass(frozen=True)
class IncrementalSplit:
    """Per-session index tensors into the train / test label tensors.

    classes[s]: classes introduced in session s (session 0 is the base session).
    train[s]: ``(n_s,)`` int64 training indices of session s (sorted).
    test[s]: ``(m_s,)`` int64 test indices of every class seen up to session s (sorted).
    """

    classes: list[list[int]]
    train: list[Tensor]
    test: list[Tensor]

    @property
    def num_sessions(self) -> int:
        return len(self.classes)

    def seen_classes(self, session: int) -> list[int]:
        """Every class introduced in sessions ``0..session``."""
        return [c for s in self.classes[: session + 1] for c in s]


@dataclass(frozen=True)
class FewShotEpisode:
    """An N-way K-shot episode: indices into the labels and episode labels ``0..ways-1``.

    classes: the original class of episode label i is ``classes[i]``.
    support / support_labels: ``(ways*shots,)``; query / query_labels: ``(ways*queries,)``.
    """

    classes: list[int]
    support: Tensor
    support_labels: Tensor
    query: Tensor
    query_labels: Tensor


def _np_labels(labels: Tensor | np.ndarray | Sequence[int], what: str) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be a 1-d tensor of class ids (N,), got shape {tuple(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def _short_classes(counts: dict[int, int], classes: Sequence[int], need: int) -> list[str]:
    return [f"class {c} has {counts.get(c, 0)}" for c in classes if counts.get(c, 0) < need]


def class_incremental_split(
    train_labels: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    base_classes: int | Sequence[int],
    sessions: Sequence[Sequence[int]] | tuple[int, int],
    shots: int,
    seed: int = 0,
) -> IncrementalSplit:
    """Build an FSCIL split.

    train_labels ``(N,)``, test_labels ``(M,)``: class ids.
    base_classes: an int n (classes ``0..n-1``) or the explicit list of base classes.
    sessions: explicit class lists per incremental session, or ``(ways, num_sessions)`` to take the next
        classes in ascending order after the base classes, ``ways`` per session.
    shots: training examples drawn per new class in each incremental session.
    Raises :class:`ConfigError` when sessions overlap, name unknown classes, or a class has fewer than
    ``shots`` training examples.
    """
    y_train, y_test = _np_labels(train_labels, "train_labels"), _np_labels(test_labels, "test_labels")
    present = sorted(int(c) for c in np.unique(y_train))
    base = list(range(base_classes)) if isinstance(base_classes, int) else [int(c) for c in base_classes]
    if isinstance(sessions, tuple) and len(sessions) == 2 and all(isinstance(v, int) for v in sessions):
        ways, num = sessions
        rest = [c for c in present if c not in set(base)]
        if ways < 1 or num < 0 or ways * num > len(rest):
            raise ConfigError(
                f"cannot make {num} sessions of {ways} ways: only {len(rest)} classes remain after the "
                f"{len(base)} base classes ({len(present)} classes in the labels); lower ways or sessions."
            )
        session_lists = [rest[i * ways : (i + 1) * ways] for i in range(num)]
    else:
        session_lists = [[int(c) for c in s] for s in sessions]
    if shots < 1:
        raise ConfigError(f"shots must be at least 1, got {shots}")
    classes = [base, *session_lists]
    flat = [c for s in classes for c in s]
    if len(flat) != len(set(flat)):
        dup = sorted({c for c in flat if flat.count(c) > 1})
        raise ConfigError(
            f"sessions must not share classes, but classes {dup} appear in more than one session"
        )
    unknown = sorted(set(flat) - set(present))
    if unknown:
        raise ConfigError(
            f"classes {unknown} have no training examples (the labels hold {len(present)} classes: "
            f"{present[:5]}{'...' if len(present) > 5 else ''}); "
            "fix base_classes / sessions."
        )
    counts = dict(zip(*np.unique(y_train, return_counts=True)))
    counts = {int(k): int(v) for k, v in counts.items()}
    short = _short_classes(counts, [c for s in session_lists for c in s], shots)
    if short:
        raise ConfigError(
            f"{shots}-shot sessions need {shots} training examples of each new class, but {'; '.join(short)}; "
            "lower shots or choose other classes."
        )
    rng = np.random.default_rng(seed)
    train = [torch.from_numpy(np.flatnonzero(np.isin(y_train, base)))]
    for session in session_lists:
        picks = [rng.choice(np.flatnonzero(y_train == c), size=shots, replace=False) for c in session]
        train.append(torch.from_numpy(np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)))
    test, seen = [], []
    for session in classes:
        seen += session
        test.append(torch.from_numpy(np.flatnonzero(np.isin(y_test, seen))))
    return IncrementalSplit(classes=classes, train=train, test=test)


def few_shot_episode(
    labels: Tensor | np.ndarray,
    ways: int,
    shots: int,
    queries: int,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> FewShotEpisode:
    """Sample an episode: ``ways`` classes (from ``classes``, default all in ``labels`` ``(N,)``) that each
    have at least ``shots + queries`` examples, then disjoint support and query examples per class."""
    y = _np_labels(labels, "labels")
    if ways < 1 or shots < 1 or queries < 0:
        raise ConfigError(
            f"need ways >= 1, shots >= 1, queries >= 0; got ways={ways} shots={shots} queries={queries}"
        )
    pool = sorted(int(c) for c in (np.unique(y) if classes is None else classes))
    counts = {int(k): int(v) for k, v in zip(*np.unique(y, return_counts=True))}
    need = shots + queries
    eligible = [c for c in pool if counts.get(c, 0) >= need]
    if len(eligible) < ways:
        short = _short_classes(counts, pool, need)
        raise ConfigError(
            f"a {ways}-way {shots}-shot episode with {queries} queries needs {ways} classes with >= {need} "
            f"examples each, only {len(eligible)} have that ({'; '.join(short)}); lower ways, shots or queries."
        )
    rng = np.random.default_rng(seed)
    chosen = [int(c) for c in rng.choice(eligible, size=ways, replace=False)]
    sup, qry = [], []
    for c in chosen:
        idx = rng.choice(np.flatnonzero(y == c), size=need, replace=False)
        sup.append(idx[:shots])
        qry.append(idx[shots:])
    episode_labels = np.arange(ways, dtype=np.int64)
    return FewShotEpisode(
        classes=chosen,
        support=torch.from_numpy(np.concatenate(sup).astype(np.int64)),
        support_labels=torch.from_numpy(np.repeat(episode_labels, shots)),
        query=torch.from_numpy(np.concatenate(qry).astype(np.int64)),
        query_labels=torch.from_numpy(np.repeat(episode_labels, queries)),
    )
