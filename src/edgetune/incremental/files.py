"""The incremental family's own files: tensors plus a JSON-able header in one safetensors file, tagged with a
format name and version so a file of another kind, a damaged one or one from a newer edgetune is refused clearly."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from edgetune.core.errors import CheckpointError
from edgetune.core.state import load_tensors, save_tensors

__all__ = ["read_tagged", "write_tagged"]


def write_tagged(path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, str], fmt: str,
                 version: int) -> Path:
    """Write ``tensors`` with ``meta`` (strings) and the ``format`` / ``version`` tags, atomically."""
    path = Path(path)
    save_tensors(tensors, path, {**meta, "format": fmt, "version": str(version)})
    return path


def read_tagged(path: str | Path, fmt: str, version: int, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, meta)`` of a file :func:`write_tagged` wrote with format ``fmt`` at most ``version``;
    :class:`CheckpointError` naming ``what`` (e.g. "learner") for a missing, unreadable or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_tensors(path)
    except Exception as err:  # noqa: BLE001  (a damaged file is a user-facing error, not a traceback)
        raise CheckpointError(f"{path} is not a readable {what} file ({err}); save it again") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path} is not an edgetune {what} (format {meta.get('format')!r}, expected {fmt!r})")
    if int(meta.get("version", 0)) > version:
        raise CheckpointError(f"{path} was written by a newer edgetune ({what} format {meta['version']}); upgrade "
                              "edgetune to read it")
    return tensors, meta
