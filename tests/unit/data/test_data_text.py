"""Byte-level text dataset: lm shift, seq2seq reversal, contiguous split, files/globs, default corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.core.errors import DataError
from edgetune.data import DataConfig, load_dataset
from edgetune.data.text import BOS, byte_windows, default_corpus_files


def _corpus(tmp_path: Path) -> tuple[Path, bytes]:
    (tmp_path / "sub").mkdir()
    a = bytes(range(256)) * 4
    b = b"the quick brown fox jumps over the lazy dog. " * 30
    (tmp_path / "a.txt").write_bytes(a)
    (tmp_path / "sub" / "b.txt").write_bytes(b)
    return tmp_path, a + b


def test_lm_windows_shift_by_one_and_match_the_stream(tmp_path: Path) -> None:
    folder, data = _corpus(tmp_path)
    cfg = DataConfig(
        name="bytes", options={"files": [str(folder / "a.txt"), str(folder / "sub")], "block_size": 16}
    )
    b = load_dataset(cfg)
    x, y = b.train.tensors
    assert b.task == "lm" and b.num_classes == 256 and b.input_shape == (16,) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # y[t] == x[t+1]
    stream = torch.tensor(list(data), dtype=torch.int64)
    assert torch.equal(x.flatten(), stream[: x.numel()])  # non-overlapping, stride T, file order kept
    assert torch.equal(y[:, -1], stream[torch.arange(1, len(x) + 1) * 16])
    cut = round(len(data) * 0.9)
    assert torch.equal(b.test.tensors[0][0], stream[cut : cut + 16])  # test = the trailing 10 %
    assert len(x) == (cut - 1) // 16


def test_seq2seq_reversal_with_bos(tmp_path: Path) -> None:
    folder, _ = _corpus(tmp_path)
    b = load_dataset(
        DataConfig(
            name="bytes", options={"files": [str(folder / "*.txt")], "block_size": 8, "task": "seq2seq"}
        )
    )
    src, tgt_in, tgt_out = b.train.tensors
    assert b.task == "seq2seq" and b.num_classes == 257 and b.vocab_size == 257
    assert src[0].tolist() == list(range(8)) and tgt_out[0].tolist() == list(range(7, -1, -1))
    assert torch.equal(tgt_out, src.flip(1))
    assert torch.all(tgt_in[:, 0] == BOS) and torch.equal(tgt_in[:, 1:], tgt_out[:, :-1])
    assert int(src.max()) < 256


def test_byte_windows_hand_case() -> None:
    x, y = byte_windows(np.arange(10, dtype=np.uint8), 3, "lm")
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x, y = byte_windows(np.arange(9, dtype=np.uint8), 3, "lm")  # the last byte has no target
    assert len(x) == 2
    _, tin, tout = byte_windows(np.arange(7, dtype=np.uint8), 3, "seq2seq")
    assert tout.tolist() == [[2, 1, 0], [5, 4, 3]] and tin.tolist() == [[BOS, 2, 1], [BOS, 5, 4]]


def test_missing_files_are_named(tmp_path: Path) -> None:
    cfg = DataConfig(name="bytes", options={"files": [str(tmp_path / "nope.txt"), str(tmp_path / "*.md")]})
    with pytest.raises(
        DataError, match=r"2 of the text files.*nope\.txt \(no such file.*\*\.md \(pattern matches"
    ):
        load_dataset(cfg)


def test_too_short_corpus(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"tiny")
    with pytest.raises(DataError, match="too short.*block_size=128"):
        load_dataset(DataConfig(name="bytes", path=str(tmp_path / "t.txt")))


def test_default_corpus_is_the_package_sources() -> None:
    files = default_corpus_files()
    names = {f.name for f in files}
    assert "text.py" in names and all(f.suffix in (".py", ".md") for f in files)
    assert [f.as_posix() for f in files] == sorted(f.as_posix() for f in files)
    b = load_dataset(DataConfig(name="bytes", limit_train=50, limit_test=10))
    assert len(b.train) == 50 and len(b.test) == 10 and "edgetune package sources" in b.source
