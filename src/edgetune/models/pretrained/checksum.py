"""sha256 of files, remembered per process by (path, size, mtime) so verifying a file twice costs nothing."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from edgetune.core.errors import DataError

__all__ = ["sha256_of", "verify_sha256"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_known: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the file at ``path``; cached while its size and mtime stay the same."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _known:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                h.update(block)
        _known[key] = h.hexdigest()
        log.debug("sha256 %s = %s", p, _known[key])
    return _known[key]


def verify_sha256(path: str | os.PathLike[str], expected: str, *, fix: str) -> None:
    """Raise :class:`DataError` naming the file, the expected and the actual sha256 when they differ.

    fix: the sentence telling the user how to get a good copy (e.g. the pip command that reinstalls it).
    """
    actual = sha256_of(path)
    if actual != expected.lower():
        raise DataError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}. The file is corrupt, "
            f"truncated or was replaced by another version. {fix}"
        )
