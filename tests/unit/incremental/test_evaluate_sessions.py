"""``evaluate_sessions`` (the protocol on data as a user holds it) against ``run_sessions`` (the same on an
index split of precomputed features), and its refusals."""

from __future__ import annotations

import pytest
import torch

from edgetune.core.errors import ConfigError
from edgetune.data.splits import class_incremental_split
from edgetune.incremental.learner import IncrementalLearner
from edgetune.incremental.sessions import evaluate_sessions, run_sessions


def _data(classes: int = 8, per_class: int = 30, dim: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    return centers[y] + 0.9 * torch.randn(len(y), dim, generator=g), y


def test_evaluate_sessions_equals_run_sessions_on_the_same_split() -> None:
    (x, y), (xt, yt) = _data(seed=0), _data(per_class=20, seed=1)
    split = class_incremental_split(y, yt, 4, (2, 2), shots=3, seed=5)
    want = run_sessions(IncrementalLearner(), (x, y), (xt, yt), split)
    base = (x[split.train[0]], y[split.train[0]])
    supports = [(x[split.train[s]], y[split.train[s]]) for s in (1, 2)]
    learner = IncrementalLearner()
    got = learner.evaluate_sessions(supports, (xt, yt), base=base)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k != "add_ms"} == {k: v for k, v in w.items() if k != "add_ms"}
    assert [r["classes"] for r in got] == [4, 6, 8] and got[1]["shots"] == 3
    assert 0.0 < got[-1]["novel_acc"] < 1.0 and got[-1]["acc"] < got[0]["acc"]  # a real protocol, not a constant
    # a learner already fitted: its classes are session 0, the sessions continue from there
    again = IncrementalLearner().fit_base(base)
    cont = evaluate_sessions(again, supports, (xt, yt))
    assert [r["acc"] for r in cont] == [r["acc"] for r in got]


def test_evaluate_sessions_refuses_bad_sessions_and_keeps_the_learner() -> None:
    (x, y), (xt, yt) = _data(seed=0), _data(per_class=20, seed=1)
    with pytest.raises(ConfigError, match="needs base data"):
        evaluate_sessions(IncrementalLearner(), [(x[:3], y[:3])], (xt, yt))
    learner = IncrementalLearner().fit_base((x[y < 4], y[y < 4]))
    repeat = (x[y == 1][:3], y[y == 1][:3])  # a base class again
    with pytest.raises(ConfigError, match=r"support labels \[1\] are already known"):
        learner.evaluate_sessions([(x[y == 4][:3], y[y == 4][:3]), repeat], (xt, yt))
    assert learner.classes == [0, 1, 2, 3, 4]  # the first session landed, the refused one changed nothing
    with pytest.raises(ConfigError, match="no example of any class seen"):
        IncrementalLearner().evaluate_sessions([(x[y == 5][:3], y[y == 5][:3])], (xt[yt == 7], yt[yt == 7]),
                                               base=(x[y < 4], y[y < 4]))
