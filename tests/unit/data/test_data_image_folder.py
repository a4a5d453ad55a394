"""image-folder: class subfolders decoded with Pillow to uint8, sizes, modes, splits and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetune.core.errors import ConfigError, DataError
from edgetune.data import DataConfig, load_dataset


def _write(
    root: Path, counts: dict[str, int], size: tuple[int, int] = (6, 8), seed: int = 0
) -> dict[str, np.ndarray]:
    """PNG (lossless) RGB images ``(H, W, 3)`` per class; returns {file name: pixels}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            name = f"{c}_{i}.png"
            Image.fromarray(px).save(root / c / name)
            out[name] = px
    return out


def test_rgb_pixels_exact_and_seeded_split(tmp_path: Path) -> None:
    pixels = _write(tmp_path, {"cat": 10, "dog": 5})
    (tmp_path / "cat" / "notes.txt").write_text("ignored", encoding="utf-8")
    b = load_dataset(DataConfig(name="image-folder", path=str(tmp_path)))
    x, y = b.train.tensors
    assert x.dtype == torch.uint8 and b.input_shape == (3, 6, 8) and b.class_names == ["cat", "dog"]
    assert (len(b.train), len(b.test)) == (12, 3) and torch.bincount(b.test.tensors[1]).tolist() == [2, 1]
    stored = {tuple(v.permute(1, 2, 0).flatten().tolist()) for v in torch.cat([x, b.test.tensors[0]])}
    assert stored == {tuple(p.flatten().tolist()) for p in pixels.values()}  # every image once, unchanged
    xf = b.transform([x, y])[0]
    assert xf.dtype == torch.float32 and torch.equal(xf, x.float() / 255.0)


def test_grey_resize_and_train_test_folders(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"a": 3, "b": 3}, size=(10, 12))
    _write(tmp_path / "test", {"a": 1, "b": 2}, size=(20, 20), seed=1)
    opts = {"mode": "grey", "size": [5, 7]}
    b = load_dataset(DataConfig(name="image-folder", path=str(tmp_path), options=opts))
    assert b.train.tensors[0].shape == (6, 1, 5, 7) and b.test.tensors[0].shape == (3, 1, 5, 7)
    assert b.test.tensors[1].tolist() == [0, 1, 1]
    single = (
        Image.open(tmp_path / "train" / "a" / "a_0.png")
        .convert("L")
        .resize((7, 5), Image.Resampling.BILINEAR)
    )
    assert torch.equal(b.train.tensors[0][0, 0], torch.from_numpy(np.array(single)))
    with pytest.raises(DataError, match=r"are 20x20 but those in .*train' are 10x12; set data.options.size"):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path)))


def test_mixed_sizes_need_the_size_option(tmp_path: Path) -> None:
    _write(tmp_path, {"a": 3, "b": 2})
    _write(tmp_path, {"b": 0}, size=(4, 4))
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "b" / "small.png")
    with pytest.raises(
        DataError, match=r"2 sizes \(height x width: 6x8: 5 files.*4x4: 1 files, e.g. small.png\)"
    ):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path)))
    b = load_dataset(DataConfig(name="image-folder", path=str(tmp_path), options={"size": 4}))
    assert b.input_shape == (3, 4, 4) and len(b.train) + len(b.test) == 6


def test_corrupt_files_listed_or_skipped(tmp_path: Path) -> None:
    _write(tmp_path, {"a": 4, "b": 4})
    for i in range(7):
        (tmp_path / "a" / f"bad{i}.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path)))
    msg = str(info.value)
    assert (
        "7 of 15 image files" in msg and "bad0.jpg" in msg and "and 2 more" in msg and "skip_bad=true" in msg
    )
    b = load_dataset(DataConfig(name="image-folder", path=str(tmp_path), options={"skip_bad": True}))
    assert len(b.train) + len(b.test) == 8 and "skipped 7 unreadable files" in b.notes[0]


def test_empty_single_and_missing(tmp_path: Path) -> None:
    _write(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match=r"same class \('only'\)"):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path / "one")))
    _write(tmp_path / "two", {"a": 3, "b": 2})
    (tmp_path / "two" / "empty").mkdir()
    with pytest.raises(DataError, match=r"1 of 3 classes have no training examples.*'empty'"):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path / "two")))
    (tmp_path / "none" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds no readable images"):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match=r"set data.path"):
        load_dataset(DataConfig(name="image-folder"))
