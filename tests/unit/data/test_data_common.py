"""The shared limit / validation-split helper, and the digits loader that relies on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.data import DataConfig, load_dataset, make_bundle
from edgetune.data.common import images_to_tensor, random_subset, stratified_holdout


def _toy(n_per_class: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(n_per_class)])
    x = torch.arange(len(y), dtype=torch.float32)[:, None]  # x encodes the original index
    return x, y


def _bundle(cfg: DataConfig, counts: list[int] = [40, 20, 10, 3]):  # noqa: B006
    x, y = _toy(counts)
    return make_bundle(
        cfg, name="toy", task="classification", train=(x, y), test=(x, y), num_classes=len(counts)
    )


def test_val_split_is_stratified_disjoint_and_complete() -> None:
    b = _bundle(DataConfig(val_fraction=0.25, seed=3))
    (xt, yt), (xv, yv) = b.train.tensors, b.val.tensors
    assert torch.bincount(yv).tolist() == [10, 5, 2, 1]  # round(0.25 * n), at least 1
    assert torch.bincount(yt).tolist() == [30, 15, 8, 2]
    seen = torch.cat([xt, xv])[:, 0].long().sort().values
    assert seen.tolist() == list(range(73))  # disjoint and nothing lost
    assert torch.equal(yv, _toy([40, 20, 10, 3])[1][xv[:, 0].long()])  # labels travel with their inputs


def test_val_split_is_seeded() -> None:
    a, b, c = (_bundle(DataConfig(val_fraction=0.2, seed=s)).val.tensors[0] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_limits_keep_n_random_examples_in_order() -> None:
    b = _bundle(DataConfig(limit_train=10, limit_test=5, seed=0))
    idx = b.train.tensors[0][:, 0]
    assert len(b.train) == 10 and len(b.test) == 5
    assert torch.all(idx[1:] > idx[:-1])  # original order kept
    assert idx.max() > 20  # a random subset, not the head of the data
    assert torch.equal(b.test.tensors[0], _bundle(DataConfig(limit_test=5, limit_train=30)).test.tensors[0])


def test_limit_then_val() -> None:
    b = _bundle(DataConfig(limit_train=40, val_fraction=0.25))
    assert len(b.train) + len(b.val) == 40 and set(b.val.tensors[0][:, 0].tolist()).isdisjoint(
        b.train.tensors[0][:, 0].tolist()
    )


def test_no_limit_no_val_is_the_input_untouched() -> None:
    x, y = _toy([3, 3])
    b = make_bundle(DataConfig(), name="toy", task="classification", train=(x, y), test=(x, y), num_classes=2)
    assert b.train.tensors[0] is x and b.val is None and b.input_shape == (1,)


def test_val_for_sequence_tasks_is_a_random_subset() -> None:
    src = torch.arange(50).view(10, 5)
    b = make_bundle(
        DataConfig(val_fraction=0.3),
        name="s",
        task="lm",
        train=(src, src + 1),
        test=(src, src),
        num_classes=256,
    )
    assert len(b.val) == 3 and len(b.train) == 7
    assert torch.equal(b.val.tensors[1], b.val.tensors[0] + 1)


def test_helpers() -> None:
    rng = np.random.default_rng(0)
    assert random_subset(5, None, rng).tolist() == [0, 1, 2, 3, 4]
    assert random_subset(5, 9, rng).tolist() == [0, 1, 2, 3, 4]
    kept, held = stratified_holdout(np.array([0, 0, 1]), 0.5, rng)
    assert sorted(kept.tolist() + held.tolist()) == [0, 1, 2] and len(held) == 1  # single-example class kept
    x = images_to_tensor(np.full((2, 3, 3), 255, dtype=np.uint8))
    assert x.shape == (2, 1, 3, 3) and x.dtype == torch.float32 and float(x.max()) == 1.0


@pytest.mark.parametrize("frac", [0.5, 0.2])
def test_digits_split(frac: float) -> None:
    b = load_dataset(DataConfig(name="digits", seed=1, options={"test_fraction": frac}))
    (xtr, ytr), (xte, yte) = b.train.tensors, b.test.tensors
    assert len(b.train) + len(b.test) == 1797 and b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert xtr.dtype == torch.uint8 and int(xtr.min()) == 0 and int(xtr.max()) == 16
    xf = b.transform([xtr, ytr])[0]  # float32 in [0, 1], bit-identical to the old float32(v) / 16.0
    assert xf.dtype == torch.float32 and float(xf.max()) == 1.0
    assert torch.equal(xf, xtr.to(torch.float32) / 16.0)
    counts = torch.bincount(ytr, minlength=10) + torch.bincount(yte, minlength=10)
    assert torch.all((torch.bincount(yte, minlength=10) - frac * counts).abs() <= 0.5)
    # train + test is exactly the whole of digits (as a multiset of rows): disjoint and complete
    from sklearn.datasets import load_digits

    raw = load_digits()
    rows = torch.cat([torch.cat([xtr, xte]).flatten(1).long(), torch.cat([ytr, yte])[:, None]], 1)
    ours = sorted(map(tuple, rows.tolist()))
    full = sorted(map(tuple, np.concatenate([raw.data, raw.target[:, None]], 1).astype(int).tolist()))
    assert ours == full


def test_digits_without_sklearn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from edgetune.core.errors import DataError

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now raises ImportError
    with pytest.raises(DataError, match=r"pip install scikit-learn.*pip install edgetune\[data\]"):
        load_dataset(DataConfig(name="digits"))
