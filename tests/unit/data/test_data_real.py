"""The real Fashion-MNIST files, when the system has them (Debian package dataset-fashion-mnist)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from edgetune.data import DataConfig, load_dataset

SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (SYSTEM / "train-images-idx3-ubyte.gz").is_file(), reason="fashion-mnist not installed"
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGETUNE_DATA", raising=False)
    start = time.perf_counter()
    b = load_dataset(DataConfig(name="fashion-mnist"))
    seconds = time.perf_counter() - start
    x, y = b.train.tensors
    assert (len(b.train), len(b.test)) == (60000, 10000) and b.num_classes == 10 and len(b.class_names) == 10
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert int(x.min()) == 0 and int(x.max()) == 255
    xf = b.transform([x[:1000], y[:1000]])[0]
    assert xf.dtype == torch.float32 and float(xf.min()) == 0.0 and float(xf.max()) == 1.0
    assert (
        torch.bincount(y).tolist() == [6000] * 10
        and torch.bincount(b.test.tensors[1]).tolist() == [1000] * 10
    )
    assert seconds < 15, f"loading took {seconds:.1f} s"  # ~1.5 s here; generous for a busy CI machine
