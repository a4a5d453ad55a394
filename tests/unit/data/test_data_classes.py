"""data.classes: keep a subset of classes, relabelled by position, after the validation hold-out."""

from __future__ import annotations

import pytest
import torch

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.data import DataConfig, load_dataset
from edgetune.data.base import parse_classes


def test_parse_ranges_and_lists() -> None:
    assert parse_classes("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_classes([9, 2]) == [9, 2]
    for bad, why in (("5-2", "backwards"), ("a-3", "not a class id"), ([1, 1], "more than once"), ([], "empty")):
        with pytest.raises(ValueError, match=why):
            parse_classes(bad)
    with pytest.raises(ConfigError, match="classes"):
        validate(DataConfig, {"classes": "3-1"})


def test_subset_relabels_and_shares_the_validation_holdout() -> None:
    full = load_dataset(DataConfig(name="digits", val_fraction=0.1))
    base = load_dataset(DataConfig(name="digits", val_fraction=0.1, classes="0-5"))
    assert base.num_classes == 6 and base.class_names == ["0", "1", "2", "3", "4", "5"]
    for split in ("train", "val", "test"):
        x_full, y_full = getattr(full, split).tensors
        x, y = getattr(base, split).tensors
        keep = y_full < 6
        assert torch.equal(x, x_full[keep]) and torch.equal(y, y_full[keep])
    swapped = load_dataset(DataConfig(name="digits", classes=[7, 3]))
    x_all, y_all = load_dataset(DataConfig(name="digits")).train.tensors
    x, y = swapped.train.tensors
    assert torch.equal(x[y == 0], x_all[y_all == 7]) and torch.equal(x[y == 1], x_all[y_all == 3])
    assert swapped.class_names == ["7", "3"]


def test_unknown_class_is_named() -> None:
    with pytest.raises(ConfigError, match=r"names \[10\].*classes 0-9"):
        load_dataset(DataConfig(name="digits", classes=[1, 10]))
