"""``bytes``: a byte-level text dataset over local files, for causal LM or a toy seq2seq task.

The corpus is the bytes of the given files concatenated in order (globs expand sorted, folders to all
their files, recursively and sorted). With no ``files`` option and no ``data.path``, the corpus is the
``.py`` and ``.md`` files of the installed edgetune package itself: always present, offline, and fixed
for a given edgetune version. The last ``test_fraction`` of the bytes is the test split (contiguous, so
no test window overlaps a training one); each part is cut into non-overlapping windows of ``block_size``.

Tasks (``T = block_size``):

- ``lm``: ``x = b[i : i+T]``, ``y = b[i+1 : i+T+1]`` (so ``y[t] == x[t+1]``), vocabulary 256.
- ``seq2seq``: reverse the window. ``src = b[i : i+T]``, ``tgt_out = src[::-1]``,
  ``tgt_in = [BOS] + tgt_out[:-1]`` with ``BOS = 256``; vocabulary 257 (the 256 bytes + BOS).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from edgetune.core.config import Config
from edgetune.core.errors import DataError
from edgetune.data.base import DataBundle, DataConfig, loader_options, register_dataset
from edgetune.data.common import make_bundle

__all__ = ["BOS", "BytesOptions", "byte_windows", "default_corpus_files", "load_bytes", "resolve_files"]

BOS = 256
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


class BytesOptions(Config):
    """files: paths, folders or glob patterns (default: edgetune's own .py/.md files); block_size: window
    length T; task: ``lm`` or ``seq2seq`` (reversal); test_fraction: trailing share of the bytes for test."""

    files: list[str] = Field(default_factory=list)
    block_size: int = Field(default=128, ge=2)
    task: Literal["lm", "seq2seq"] = "lm"
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)


def default_corpus_files() -> list[Path]:
    """The ``.py`` and ``.md`` files of the edgetune package, sorted by path relative to the package."""
    files = [p for p in _PACKAGE_DIR.rglob("*") if p.suffix in (".py", ".md") and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(_PACKAGE_DIR).as_posix())


def resolve_files(specs: list[str]) -> list[Path]:
    """Expand file paths, folders and glob patterns; raise :class:`DataError` naming those that match nothing."""
    out: list[Path] = []
    missing: list[str] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            out += matches
            if not matches:
                missing.append(f"{spec} (pattern matches no file)")
        else:
            missing.append(f"{spec} (no such file or folder)")
    if missing:
        raise DataError(
            f"dataset 'bytes': {len(missing)} of the text files given do not exist: {'; '.join(missing)}. "
            "Fix data.options.files (paths are relative to the current folder) or leave it empty to use "
            "edgetune's own source files."
        )
    return out


def byte_windows(data: np.ndarray, block_size: int, task: str) -> tuple[torch.Tensor, ...]:
    """Cut a uint8 byte array into non-overlapping windows, stride ``block_size`` (T).

    lm: ``(x, y)`` each ``(N, T)`` int64 with ``y[:, t] == x[:, t+1]`` inside the stream;
    seq2seq: ``(src, tgt_in, tgt_out)`` each ``(N, T)`` int64, ``tgt_out = src`` reversed.
    """
    t = block_size
    tokens = torch.from_numpy(data.astype(np.int64))
    if task == "lm":
        n = max(0, (len(tokens) - 1) // t)
        x = tokens[: n * t].view(n, t)
        y = tokens[1 : n * t + 1].view(n, t)
        return x, y
    n = len(tokens) // t
    src = tokens[: n * t].view(n, t)
    tgt_out = src.flip(1)
    tgt_in = torch.cat([torch.full((n, 1), BOS, dtype=torch.int64), tgt_out[:, :-1]], dim=1)
    return src, tgt_in, tgt_out


@register_dataset(
    "bytes", config=BytesOptions, summary="byte-level text from local files (lm or seq2seq reversal)"
)
def load_bytes(cfg: DataConfig) -> DataBundle:
    """Byte-level text windows; ``input_shape = (T,)``, vocabulary 256 (lm) or 257 (seq2seq)."""
    opts: BytesOptions = loader_options(cfg, BytesOptions)
    specs = list(opts.files) or ([cfg.path] if cfg.path else [])
    files = resolve_files(specs) if specs else default_corpus_files()
    source = ", ".join(specs) if specs else f"edgetune package sources ({_PACKAGE_DIR})"
    data = np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)
    cut = round(len(data) * (1.0 - opts.test_fraction))
    train = byte_windows(data[:cut], opts.block_size, opts.task)
    test = byte_windows(data[cut:], opts.block_size, opts.task)
    if len(train[0]) == 0 or len(test[0]) == 0:
        raise DataError(
            f"dataset 'bytes': the corpus ({len(data)} bytes from {len(files)} files: {source}) is too short for "
            f"one window of block_size={opts.block_size} in both train and test (test_fraction="
            f"{opts.test_fraction}); give more text or a smaller data.options.block_size."
        )
    vocab = 256 if opts.task == "lm" else 257
    return make_bundle(
        cfg,
        name="bytes",
        task=opts.task,
        train=train,
        test=test,
        num_classes=vocab,
        input_shape=(opts.block_size,),
        source=f"{source} ({len(data)} bytes, {len(files)} files)",
    )
