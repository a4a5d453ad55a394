"""Compile one C++ source of :mod:`edgetune.sparse.native` into a cached shared library.

The cache key is the source, the flags, the compiler and the CPU (``-march=native``); the library is written to
a temporary file and renamed into place, so a failed or concurrent build never leaves a broken one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["FLAGS", "NativeBuildError", "build_library", "cache_dir", "cached_path", "compiler", "cpu_signature"]

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=c++17", "-Wno-psabi")


class NativeBuildError(RuntimeError):
    """Native kernels could not be compiled or loaded; the message says why."""


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU model and flags."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    sig += "|" + line.strip()
                if line.strip() == "":  # first processor only
                    break
    except OSError:
        pass
    return sig


def cache_dir() -> Path:
    """``$EDGETUNE_NATIVE_DIR``, else ``<venv>/share/edgetune-native`` inside a writable virtualenv, else
    ``~/.cache/edgetune/native``."""
    env = os.environ.get("EDGETUNE_NATIVE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        return Path(sys.prefix) / "share" / "edgetune-native"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgetune" / "native"


def cached_path(source: Path) -> Path:
    """Where the library of ``source`` for these flags, compiler and CPU is (or would be) cached."""
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(FLAGS).encode(), compiler().encode(), cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}{suffix}"


def build_library(source: Path, force: bool = False) -> Path:
    """Compile ``source`` into the cache (unless there already) and return the library's path.

    Raises :class:`NativeBuildError` with the compiler's message when compiling fails.
    """
    target = cached_path(source)
    if target.exists() and not force:
        return target
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise NativeBuildError(f"no C++ compiler {cxx!r} on PATH (install g++, or set CXX to one)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)  # then an atomic rename
    os.close(fd)
    cmd = [cxx, *FLAGS, str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
            raise NativeBuildError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n" + "\n".join(tail))
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeBuildError(f"`{' '.join(cmd)}` could not run: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s: %s", source.name, target)
    return target
