"""CIFAR-100 FSCIL index lists (session_1..9.txt) on a fake CIFAR-100 folder: round trip and every error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.core.errors import ConfigError, DataError
from edgetune.data import DataConfig, load_dataset
from edgetune.data.fscil_index import read_index_lists, split_from_index_lists
from edgetune.data.splits import class_incremental_split
from edgetune.testing.fake_cifar import fake_cifar100, write_index_lists

PER_CLASS_TRAIN, PER_CLASS_TEST, SHOTS = 6, 2, 5


def _fake_cifar100(root: Path) -> tuple[np.ndarray, np.ndarray]:
    return fake_cifar100(root, PER_CLASS_TRAIN, PER_CLASS_TEST)


def _write_lists(folder: Path, y_train: np.ndarray) -> list[list[int]]:
    return write_index_lists(folder, y_train, SHOTS)


@pytest.fixture
def fscil(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, list[list[int]]]:
    y_train, y_test = _fake_cifar100(tmp_path / "data")
    lists = _write_lists(tmp_path / "index_list" / "cifar100", y_train)
    return tmp_path, y_train, y_test, lists


def test_round_trip_with_the_cifar100_loader(fscil) -> None:  # type: ignore[no-untyped-def]
    root, y_train, y_test, lists = fscil
    bundle = load_dataset(DataConfig(name="cifar100", path=str(root / "data")))
    train_labels, test_labels = bundle.train.tensors[1], bundle.test.tensors[1]
    assert train_labels.tolist() == y_train.tolist()
    split = split_from_index_lists(root / "index_list" / "cifar100", train_labels, test_labels)
    assert split.num_sessions == 9
    assert split.classes[0] == list(range(60))
    assert split.classes[1:] == [list(range(60 + 5 * s, 65 + 5 * s)) for s in range(8)]
    assert split.seen_classes(8) == list(range(100))
    for s in range(9):
        assert split.train[s].dtype == torch.int64 and split.train[s].tolist() == sorted(lists[s])
        assert len(split.test[s]) == PER_CLASS_TEST * (60 + 5 * s)
        expected_test = [i for i, c in enumerate(y_test.tolist()) if c < 60 + 5 * s]  # loop reference
        assert split.test[s].tolist() == expected_test
    assert len(split.train[0]) == 60 * PER_CLASS_TRAIN
    for s in range(1, 9):
        counts = np.bincount(y_train[split.train[s].numpy()], minlength=100)
        assert counts[split.classes[s]].tolist() == [SHOTS] * 5 and counts.sum() == 25
    # same base session and test sets as the seeded splitter on the same classes
    ref = class_incremental_split(train_labels, test_labels, 60, (5, 8), shots=SHOTS)
    assert ref.classes == split.classes and torch.equal(ref.train[0], split.train[0])
    assert all(torch.equal(a, b) for a, b in zip(ref.test, split.test, strict=True))


def test_read_keeps_file_order_and_tolerates_whitespace(tmp_path: Path) -> None:
    (tmp_path / "session_1.txt").write_text("7\r\n3\r\n\r\n 5 \n\n")
    (tmp_path / "session_2.txt").write_text("2\n0")  # no final newline
    lists = read_index_lists(tmp_path)
    assert [t.tolist() for t in lists] == [[7, 3, 5], [2, 0]] and lists[0].dtype == torch.int64
    assert len(read_index_lists(tmp_path, num_sessions=1)) == 1


def test_missing_session_files(fscil) -> None:  # type: ignore[no-untyped-def]
    root, y_train, y_test, _ = fscil
    folder = root / "index_list" / "cifar100"
    with pytest.raises(DataError, match=r"missing session_10\.txt.*session_1\.txt \(base session\) to sess"):
        read_index_lists(folder, num_sessions=10)
    (folder / "session_4.txt").unlink()
    with pytest.raises(DataError, match=r"missing session_4\.txt\. Expected.*to session_9\.txt"):
        split_from_index_lists(folder, y_train, y_test)
    assert len(read_index_lists(folder, num_sessions=3)) == 3  # the first three are still there
    with pytest.raises(DataError, match=r"missing session_1\.txt"):
        read_index_lists(root)  # a folder without lists
    with pytest.raises(DataError, match="does not exist"):
        read_index_lists(root / "nowhere")
    with pytest.raises(ConfigError, match="num_sessions"):
        read_index_lists(folder, num_sessions=0)


@pytest.mark.parametrize(
    "text,match",
    [
        ("1\n2\nabc\n", r"session_2\.txt' line 3: 'abc' is not a non-negative integer"),
        ("1\n-4\n", r"line 2: '-4' is not a non-negative integer"),
        ("1.0\n", r"line 1: '1\.0'"),
        ("MINI-ImageNet/train/n01/x.jpg\n", r"line 1: .*image paths"),
        ("5\n6\n5\n", r"line 3: index 5 repeats line 1"),
        ("\n\n", "holds no index"),
    ],
)
def test_malformed_lines(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "session_1.txt").write_text("0\n1\n")
    (tmp_path / "session_2.txt").write_text(text)
    with pytest.raises(DataError, match=match):
        read_index_lists(tmp_path)


def test_index_out_of_range(fscil) -> None:  # type: ignore[no-untyped-def]
    root, y_train, y_test, lists = fscil
    folder = root / "index_list" / "cifar100"
    bad = [*lists[3][:7], 600, *lists[3][8:]]
    (folder / "session_4.txt").write_text("".join(f"{v}\n" for v in bad))
    with pytest.raises(DataError, match=r"session_4\.txt' line 8: index 600 is out of range.*600 examples"):
        split_from_index_lists(folder, y_train, y_test)
    # a validation hold-out shortens the train split: the indices no longer fit it
    held = load_dataset(DataConfig(name="cifar100", path=str(root / "data"), val_fraction=0.2))
    _write_lists(folder, y_train)
    with pytest.raises(DataError, match="out of range.*without a validation hold-out"):
        split_from_index_lists(folder, held.train.tensors[1], y_test)


def test_sessions_with_overlapping_classes(fscil) -> None:  # type: ignore[no-untyped-def]
    root, y_train, y_test, lists = fscil
    folder = root / "index_list" / "cifar100"
    intruder = int(np.flatnonzero(y_train == 62)[-1])  # a class of session_2, not among its listed shots
    (folder / "session_3.txt").write_text("".join(f"{v}\n" for v in [*lists[2][:24], intruder]))
    with pytest.raises(DataError, match=rf"session_3\.txt' line 25: index {intruder} has class 62, which "
                                        r"session_2\.txt already introduced"):
        split_from_index_lists(folder, y_train, y_test)
    # the coarse labels of the same images (a wrong label_mode) make the sessions collide with the base one
    _write_lists(folder, y_train)
    assert split_from_index_lists(folder, y_train, y_test).num_sessions == 9
    cfg = DataConfig(name="cifar100", path=str(root / "data"), options={"label_mode": "coarse"})
    coarse = load_dataset(cfg)
    with pytest.raises(DataError, match=r"session_2\.txt' line 1: .*which session_1\.txt already introduced"):
        split_from_index_lists(folder, coarse.train.tensors[1], coarse.test.tensors[1])


def test_uneven_shots_are_refused(fscil) -> None:  # type: ignore[no-untyped-def]
    root, y_train, y_test, lists = fscil
    folder = root / "index_list" / "cifar100"
    extra = int(np.flatnonzero(y_train == 70)[SHOTS])  # a 6th shot of class 70 (session_4)
    (folder / "session_4.txt").write_text("".join(f"{v}\n" for v in [*lists[3], extra]))
    with pytest.raises(DataError, match=r"session_4\.txt'.*unequal shot counts.*class 70: 6.*classes \[70\] "
                                        r"\(lines \[1, 6, 11, 16, 21, 26\]\) differ from the usual 5"):
        split_from_index_lists(folder, y_train, y_test)


def test_label_shapes(fscil) -> None:  # type: ignore[no-untyped-def]
    root, y_train, y_test, _ = fscil
    with pytest.raises(ConfigError, match=r"train_labels must be a 1-d.*\(600, 1\)"):
        split_from_index_lists(root / "index_list" / "cifar100", y_train[:, None], y_test)
