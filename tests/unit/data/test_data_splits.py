"""Class-incremental and few-shot splits: invariants, determinism and error messages."""

from __future__ import annotations

import pytest
import torch

from edgetune.core.errors import ConfigError
from edgetune.data import class_incremental_split, few_shot_episode


def _labels(classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)[
        torch.randperm(classes * per_class, generator=torch.Generator().manual_seed(0))
    ]


def test_fscil_structure_and_invariants() -> None:
    ytr, yte = _labels(20, 12), _labels(20, 4)
    sp = class_incremental_split(ytr, yte, base_classes=8, sessions=(3, 4), shots=5, seed=1)
    assert sp.num_sessions == 5 and sp.classes[0] == list(range(8))
    assert sp.classes[1:] == [[8, 9, 10], [11, 12, 13], [14, 15, 16], [17, 18, 19]]
    assert torch.equal(sp.train[0], torch.nonzero(ytr < 8).flatten())  # every base training example
    for s in range(1, 5):
        got = ytr[sp.train[s]]
        assert sorted(got.tolist()) == sorted(c for c in sp.classes[s] for _ in range(5))  # shots per class
        assert len(set(sp.train[s].tolist())) == 15
    for s in range(5):
        seen = set(sp.seen_classes(s))
        assert set(yte[sp.test[s]].tolist()) == seen
        assert len(sp.test[s]) == 4 * len(seen)  # all test examples of seen classes
    assert all(torch.all(t[1:] > t[:-1]) for t in sp.train + sp.test)  # sorted, no repeats


def test_fscil_seeded() -> None:
    ytr, yte = _labels(10, 20), _labels(10, 2)
    a, b, c = (class_incremental_split(ytr, yte, 4, (2, 3), 3, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.train, b.train))
    assert not all(torch.equal(x, y) for x, y in zip(a.train[1:], c.train[1:]))


def test_fscil_explicit_sessions_and_errors() -> None:
    ytr = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    sp = class_incremental_split(ytr, ytr, base_classes=[1], sessions=[[2, 0]], shots=2)
    assert sp.classes == [[1], [2, 0]] and set(ytr[sp.train[1]].tolist()) == {0, 2}
    with pytest.raises(ConfigError, match=r"2-shot.*class 3 has 1"):
        class_incremental_split(ytr, ytr, base_classes=[0], sessions=[[1], [3]], shots=2)
    with pytest.raises(ConfigError, match=r"classes \[1\] appear in more than one session"):
        class_incremental_split(ytr, ytr, base_classes=2, sessions=[[1, 2]], shots=1)
    with pytest.raises(ConfigError, match=r"classes \[7\] have no training examples"):
        class_incremental_split(ytr, ytr, base_classes=2, sessions=[[7]], shots=1)
    with pytest.raises(ConfigError, match="only 2 classes remain"):
        class_incremental_split(ytr, ytr, base_classes=2, sessions=(2, 2), shots=1)


def test_few_shot_episode() -> None:
    y = _labels(8, 10)
    ep = few_shot_episode(y, ways=5, shots=2, queries=3, seed=4)
    assert len(set(ep.classes)) == 5
    assert ep.support_labels.tolist() == [i for i in range(5) for _ in range(2)]
    assert torch.equal(y[ep.support], torch.tensor(ep.classes)[ep.support_labels])
    assert torch.equal(y[ep.query], torch.tensor(ep.classes)[ep.query_labels])
    assert not set(ep.support.tolist()) & set(ep.query.tolist())
    again = few_shot_episode(y, ways=5, shots=2, queries=3, seed=4)
    assert torch.equal(again.support, ep.support) and again.classes == ep.classes


def test_few_shot_episode_not_enough_examples() -> None:
    y = torch.tensor([0] * 5 + [1] * 2 + [2] * 5)
    ep = few_shot_episode(y, ways=2, shots=2, queries=2, seed=0)
    assert sorted(ep.classes) == [0, 2]  # class 1 is too small to be drawn
    with pytest.raises(ConfigError, match=r"needs 3 classes with >= 4.*class 1 has 2"):
        few_shot_episode(y, ways=3, shots=2, queries=2)
