"""The few-shot class-incremental protocol: a base session, then sessions of new classes with few shots each;
after every session the learner is tested on all test examples of every class seen so far.

:func:`evaluate_sessions` takes data as a user holds it (a base split, one support set per session, one test
split) and runs the protocol on an :class:`IncrementalLearner` (also ``learner.evaluate_sessions(...)``).
:func:`run_sessions` is the same on precomputed features, replaying an
:class:`~edgetune.data.splits.IncrementalSplit` (from :func:`~edgetune.data.splits.class_incremental_split` or
the standard index lists): the bench and the ``incremental`` step extract features once and replay many draws.
Both return one record per session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from edgetune.core.errors import ConfigError
from edgetune.data.splits import IncrementalSplit
from edgetune.incremental.learner import IncrementalLearner

__all__ = ["evaluate_sessions", "run_sessions", "summarize_sessions"]

log = logging.getLogger(__name__)


def run_sessions(
    learner: IncrementalLearner,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    split: IncrementalSplit,
    *,
    val: tuple[Tensor, Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Replay ``split`` on ``learner`` with precomputed features.

    train / test: ``(z (N, D), y (N,))`` features and labels of the whole training / test split (the indices of
    ``split`` point into them); val: held-out base training features for the learner's gate (if it has one).
    Returns one record per session: ``session``, ``classes`` (seen), ``new_classes``, ``shots``, ``acc``,
    ``base_acc``, ``novel_acc``, ``hm`` and ``add_ms`` (time to add the session's classes).
    """
    z_tr, y_tr = train
    z_te, y_te = test
    records: list[dict[str, Any]] = []
    for s in range(split.num_sessions):
        idx = split.train[s]
        t0 = time.perf_counter()
        if s == 0:
            learner.fit_base_features(z_tr[idx], y_tr[idx], val)
        else:
            learner.add_classes_features(z_tr[idx], y_tr[idx])
        add_ms = (time.perf_counter() - t0) * 1e3
        test_idx = split.test[s]
        records.append(_record(learner, s, len(split.classes[s]), len(idx), add_ms, z_te[test_idx], y_te[test_idx]))
    return records


def evaluate_sessions(
    learner: IncrementalLearner,
    supports: Sequence[Any],
    test: Any,
    *,
    base: Any = None,
    val: Any = None,
) -> list[dict[str, Any]]:
    """Run the protocol on data: ``learner.fit_base(base, val)`` when ``base`` is given (else the learner's
    current classes are session 0), then ``add_classes(support)`` for each support set in turn; after every
    session the learner is tested on the examples of ``test`` whose classes it has seen (the rest wait for
    their session). Supports and splits are ``(x, y)`` pairs or splits, as ``add_classes`` takes them.

    Returns the records of :func:`run_sessions`; a support set the learner refuses raises before it changes
    anything (the records of the sessions before it are lost with the exception, the learner is not).
    """
    if base is not None:
        t0 = time.perf_counter()
        learner.fit_base(base, val)
        base_ms = (time.perf_counter() - t0) * 1e3
    elif not learner.classes:
        raise ConfigError("evaluate_sessions needs base data (base=...) or a learner fitted with fit_base first")
    else:
        base_ms = 0.0
    z_te, y_te = learner.features(test)
    n_base = len(learner.classes)

    def seen(session: int) -> Tensor:
        keep = torch.isin(y_te, torch.tensor(learner.classes, dtype=y_te.dtype))
        if not bool(keep.any()):
            raise ConfigError(f"session {session}: the test data holds no example of any class seen so far "
                              f"({len(learner.classes)} classes); give test examples of the base classes too")
        return keep

    keep = seen(0)
    records = [_record(learner, 0, n_base, int(learner.counts.sum()), base_ms, z_te[keep], y_te[keep])]
    for s, support in enumerate(supports, start=1):
        z, y = learner.features(support)
        t0 = time.perf_counter()
        new = learner.add_classes_features(z, y)
        add_ms = (time.perf_counter() - t0) * 1e3
        keep = seen(s)
        records.append(_record(learner, s, len(new), len(y), add_ms, z_te[keep], y_te[keep]))
    return records


def _record(learner: IncrementalLearner, session: int, new_classes: int, examples: int, add_ms: float,
            z: Tensor, y: Tensor) -> dict[str, Any]:
    """One session's record: sizes, the learner's accuracies on ``(z, y)`` and the time to add the classes."""
    metrics = learner.evaluate_features(z, y)
    rec = {"session": session, "classes": len(learner.classes), "new_classes": new_classes,
           "shots": examples // max(1, new_classes), **metrics, "add_ms": add_ms}
    log.debug("session %d: %d classes, acc %.4f (base %s, novel %s)", session, rec["classes"], rec["acc"],
              _fmt(rec["base_acc"]), _fmt(rec["novel_acc"]))
    return rec


def summarize_sessions(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """First, last and average session accuracy, performance drop (first - last), last base/novel/hm."""
    accs = [r["acc"] for r in records]
    last = records[-1]
    out = {"acc_first": accs[0], "acc_last": accs[-1], "acc_avg": sum(accs) / len(accs),
           "performance_drop": accs[0] - accs[-1]}
    for k in ("base_acc", "novel_acc", "hm"):
        if last.get(k) is not None:
            out[f"last_{k}"] = last[k]
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
