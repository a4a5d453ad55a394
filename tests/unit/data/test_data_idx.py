"""IDX reader: hand-built files, gzip and plain, and every malformed-file error; IDX-based loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.core.errors import DataError
from edgetune.data import DataConfig, load_dataset
from edgetune.data.idx import read_idx, read_idx_images, read_idx_labels, read_idx_pair, write_idx


def _raw_images(n: int, h: int, w: int) -> bytes:
    return b"\x00\x00\x08\x03" + struct.pack(">III", n, h, w) + bytes(i % 256 for i in range(n * h * w))


def test_hand_built_file_reads_back_exactly(tmp_path: Path) -> None:
    (tmp_path / "imgs").write_bytes(_raw_images(2, 2, 3))
    (tmp_path / "imgs.gz").write_bytes(gzip.compress(_raw_images(2, 2, 3)))
    for name in ("imgs", "imgs.gz"):
        x = read_idx_images(tmp_path / name)
        assert x.dtype == np.uint8 and x.shape == (2, 2, 3)
        assert x[1, 0, 2] == 8 and x[1, 1, 2] == 11  # C order: index = 6*n + 3*r + c


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_write_read_round_trip(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    write_idx(tmp_path / name, images)
    write_idx(tmp_path / f"l{name}", labels)
    x, y = read_idx_pair(tmp_path / name, tmp_path / f"l{name}")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_other_dtypes_round_trip(tmp_path: Path) -> None:
    arr = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    write_idx(tmp_path / "f", arr)
    got = read_idx(tmp_path / "f")
    np.testing.assert_array_equal(got, arr)
    assert torch.equal(torch.from_numpy(got), torch.from_numpy(arr))  # native order, writable: no warning


def test_truncated_file_names_file_and_sizes(tmp_path: Path) -> None:
    (tmp_path / "cut").write_bytes(_raw_images(2, 2, 3)[:-1])
    with pytest.raises(DataError, match=r"cut.*truncated.*\(2, 2, 3\).*12 bytes.*11 bytes"):
        read_idx_images(tmp_path / "cut")


def test_truncated_gzip_archive(tmp_path: Path) -> None:
    blob = gzip.compress(_raw_images(50, 8, 8))
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut.gz.*damaged gzip"):
        read_idx_images(tmp_path / "cut.gz")


def test_wrong_magic_names_both_numbers(tmp_path: Path) -> None:
    write_idx(tmp_path / "labels", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"labels.*not an IDX image file.*0x00000801.*expected 0x00000803"):
        read_idx_images(tmp_path / "labels")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx at all")
    with pytest.raises(DataError, match="junk"):
        read_idx_labels(tmp_path / "junk")


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.zeros((3, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "y", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"'.*x' holds 3 images.*'.*y' holds 4 labels"):
        read_idx_pair(tmp_path / "x", tmp_path / "y")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope")


def _write_split(folder: Path, stem: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    ext = ".gz" if gz else ""
    write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", labels)


def test_mnist_loader_from_data_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tr_x, te_x = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (20, 8))
    tr_y, te_y = np.arange(20, dtype=np.uint8) % 10, np.arange(8, dtype=np.uint8) % 10
    _write_split(tmp_path, "train", tr_x, tr_y, gz=True)
    _write_split(tmp_path, "t10k", te_x, te_y, gz=False)  # mixed plain / gz in one folder is fine
    b = load_dataset(DataConfig(name="mnist", path=str(tmp_path)))
    x, y = b.train.tensors
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(tr_x))
    xf = b.transform([x, y])[0]
    assert xf.dtype == torch.float32 and torch.equal(xf[:, 0], torch.from_numpy(tr_x).float() / 255.0)
    assert y.tolist() == tr_y.tolist() and len(b.test) == 8 and b.input_shape == (1, 28, 28)


@pytest.mark.parametrize("split,offset,classes", [("balanced", 0, 47), ("letters", 1, 26)])
def test_emnist_transposes_and_shifts_letters(tmp_path: Path, split: str, offset: int, classes: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    y = np.arange(6, dtype=np.uint8) + offset
    _write_split(tmp_path, f"emnist-{split}-train", x, y, gz=True)
    _write_split(tmp_path, f"emnist-{split}-test", x[:2], y[:2], gz=True)
    b = load_dataset(DataConfig(name="emnist", path=str(tmp_path), options={"split": split}))
    got = b.train.tensors[0][:, 0]
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(x.transpose(0, 2, 1).copy()))
    assert b.train.tensors[1].tolist() == list(range(6)) and b.num_classes == len(b.class_names) == classes
