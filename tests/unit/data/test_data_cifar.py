"""CIFAR python-batch reader on small fake batches written like the originals; the unpickler is safe."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.core.errors import DataError
from edgetune.data import DataConfig, load_dataset
from edgetune.data.vision import read_cifar_pickle


def _dump(path: Path, obj: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _batch(rng: np.random.Generator, n: int, **labels: list[int]) -> dict[bytes, object]:
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        **{k.encode(): v for k, v in labels.items()},
    }


def test_cifar10_layout_and_values(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 4, labels=[i, i, 9 - i, 0]) for i in range(5)]
    for i, b in enumerate(batches, 1):
        _dump(folder / f"data_batch_{i}", b, protocol=2 if i % 2 else 5)  # old and new pickle protocols
    _dump(folder / "test_batch", _batch(rng, 3, labels=[1, 2, 3]))
    _dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    b = load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))  # found in the usual subfolder
    x, y = b.train.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and b.input_shape == (3, 32, 32)
    assert y.tolist() == [v for bt in batches for v in bt[b"labels"]] and b.class_names[3] == "c3"
    first = batches[0][b"data"][0]
    assert int(x[0, 1, 0, 0]) == first[1024]  # green plane starts at 1024
    assert int(x[0, 0, 1, 0]) == first[32]  # row-major 32x32 per plane
    xf = b.transform([x[:2], y[:2]])[0]  # the per-batch transform gives float32 in [0, 1]
    assert xf.dtype == torch.float32 and float(xf[0, 1, 0, 0]) == pytest.approx(first[1024] / 255)
    assert len(b.test) == 3


@pytest.mark.parametrize("mode,num", [("fine", 100), ("coarse", 20)])
def test_cifar100_label_modes(tmp_path: Path, mode: str, num: int) -> None:
    rng = np.random.default_rng(1)
    _dump(tmp_path / "train", _batch(rng, 5, fine_labels=[0, 99, 5, 6, 7], coarse_labels=[0, 19, 1, 1, 2]))
    _dump(tmp_path / "test", _batch(rng, 2, fine_labels=[1, 2], coarse_labels=[3, 4]))
    _dump(
        tmp_path / "meta",
        {
            b"fine_label_names": [b"f%d" % i for i in range(100)],
            b"coarse_label_names": [b"k%d" % i for i in range(20)],
        },
    )
    b = load_dataset(DataConfig(name="cifar100", path=str(tmp_path), options={"label_mode": mode}))
    expected = [0, 99, 5, 6, 7] if mode == "fine" else [0, 19, 1, 1, 2]
    assert b.train.tensors[1].tolist() == expected and b.num_classes == num == len(b.class_names)


def test_python2_era_module_names_load_without_warnings(tmp_path: Path) -> None:
    """The original files name numpy.core.multiarray (numpy < 2), which numpy 2 deprecates."""
    data = np.arange(3072 * 2, dtype=np.int64).reshape(2, 3072).astype(np.uint8)
    raw = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=2)
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != raw
    (tmp_path / "old").write_bytes(legacy)
    got = read_cifar_pickle(tmp_path / "old")  # warnings are errors in this suite
    np.testing.assert_array_equal(got[b"data"], data)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    _dump(tmp_path / "evil", {b"data": Evil()})
    with pytest.raises(DataError, match="evil.*not a readable CIFAR"):
        read_cifar_pickle(tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()


def test_bad_batch_shape_and_truncation(tmp_path: Path) -> None:
    _dump(tmp_path / "b", {b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]})
    _dump(tmp_path / "test_batch", {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]})
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes((tmp_path / "b").read_bytes())
    _dump(tmp_path / "batches.meta", {b"label_names": []})
    with pytest.raises(DataError, match=r"data_batch_1.*shape \(2, 100\).*expected uint8 \(N, 3072\)"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    raw = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="test_batch.*not a readable"):
        read_cifar_pickle(tmp_path / "test_batch")
