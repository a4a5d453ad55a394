"""The few-shot class-incremental protocol: a base session, then sessions of new classes with few shots each;
after every session the learner is tested on all test examples of every class seen so far.

:func:`run_sessions` extracts the features of the training and test splits once, then replays an
:class:`~edgetune.data.splits.IncrementalSplit` (from :func:`~edgetune.data.splits.class_incremental_split` or
the standard index lists) on an :class:`IncrementalLearner`: one record per session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from edgetune.data.splits import IncrementalSplit
from edgetune.incremental.learner import IncrementalLearner

__all__ = ["run_sessions", "summarize_sessions"]

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
        metrics = learner.evaluate_features(z_te[test_idx], y_te[test_idx])
        new = split.classes[s]
        shots = len(idx) // max(1, len(new))
        rec = {"session": s, "classes": len(split.seen_classes(s)), "new_classes": len(new), "shots": shots,
               **metrics, "add_ms": add_ms}
        records.append(rec)
        log.debug("session %d: %d classes, acc %.4f (base %s, novel %s)", s, rec["classes"], rec["acc"],
                 _fmt(rec["base_acc"]), _fmt(rec["novel_acc"]))
    return records


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
