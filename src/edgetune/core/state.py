"""Atomic file writes and hashed safetensors files.

Files are written to a temporary name in the same folder (``.<name>.<8 random characters>.tmp``), fsynced,
then renamed over the target, so a reader never sees a half-written file (a crash leaves either the old
file or the new one, plus possibly the temporary file, which :func:`remove_temp_files` cleans). Files are
created with mode ``0o666 & ~umask``, as :func:`open` would create them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file, save

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_writer",
    "load_tensors",
    "remove_temp_files",
    "save_tensors",
    "sha256_file",
]

log = logging.getLogger(__name__)

# .<target name>.<8 random characters>.tmp: this writer's (and tempfile.mkstemp's, used before) temp names
_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create a new empty temp file beside ``path`` with mode ``0o666 & ~umask``; return (fd, its path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp  # the kernel applies the umask, as for open(path, "wb")
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextmanager
def atomic_writer(path: str | Path, check: Callable[[Path], None] | None = None) -> Iterator[IO[bytes]]:
    """A binary file object on a fresh temp file beside ``path``: fsynced and renamed over ``path`` when the block
    succeeds (after ``check(temp_path)``, which may raise), removed when anything raises (KeyboardInterrupt too).
    ``path`` is not touched until the rename; the file gets ``0o666 & ~umask``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename); the file gets ``0o666 & ~umask``."""
    with atomic_writer(path) as f:
        f.write(data)


def remove_temp_files(folder: str | Path, target: str | re.Pattern[str] | None = None) -> list[Path]:
    """Delete the temp files that :func:`atomic_write_bytes` left in ``folder`` when its process was killed
    mid-write; return them. ``target``: only those of targets whose name matches this regex (fullmatch).

    Call it only where no other process is writing into ``folder`` (e.g. when a run starts in it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(target) if isinstance(target, str) else target
    removed = []
    for p in sorted(folder.iterdir()):
        m = _TEMP.match(p.name)
        if m is None or not p.is_file() or (pattern is not None and not pattern.fullmatch(m["target"])):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.info(
            "removed %d temporary file(s) left by an interrupted write in %s: %s",
            len(removed),
            folder,
            ", ".join(p.name for p in removed),
        )
    return removed


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> str:
    """Write ``tensors`` as safetensors atomically; return the file's SHA-256."""
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        if t.numel() and t.untyped_storage().data_ptr() in seen:  # tied weights: safetensors wants one owner
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        flat[k] = t
    data = save(flat, metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))
