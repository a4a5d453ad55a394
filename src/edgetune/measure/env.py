"""Where a measurement was taken: hardware, software versions, git commit, time (no hostname, no user)."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["cpu_model", "environment", "git_sha", "hardware_string"]

log = logging.getLogger(__name__)

_REPO_DIR = Path(__file__).resolve().parent


def cpu_model() -> str:
    """CPU model from ``/proc/cpuinfo`` (x86 ``model name``, ARM ``Hardware``/``Model``), else platform."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "hardware", "model", "cpu model", "processor"):
        value = fields.get(key, "")
        if value and not value.isdigit():  # x86 "processor : 0" is an index, not a name
            return value
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"], cwd=None)
        if out:
            return out
    return platform.processor() or platform.machine() or "unknown"


def _run(cmd: list[str], cwd: Path | None) -> str | None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def git_sha(path: str | os.PathLike[str] | None = None) -> tuple[str | None, bool | None]:
    """``(sha, dirty)`` of the git checkout holding ``path`` (default: edgetune's source), or Nones."""
    cwd = Path(path) if path is not None else _REPO_DIR
    sha = _run(["git", "rev-parse", "HEAD"], cwd=cwd)
    if sha is None:
        return None, None
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                              capture_output=True, text=True, timeout=10, check=False)
        dirty: bool | None = bool(proc.stdout.strip()) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return sha, dirty


def _gpu() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_count": 0, "cuda_version": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_bytes": int(props.total_memory),
        "cuda_version": torch.version.cuda,
    }


def hardware_string(env: dict[str, Any] | None = None) -> str:
    """One-line hardware label for results tables: the GPU name when there is one, else CPU model x cores."""
    env = env if env is not None else environment()
    cpu = f"{env['cpu_model']} x{env['cpu_count_usable']}"
    return f"{env['gpu']} ({cpu})" if env.get("gpu") else cpu


def environment() -> dict[str, Any]:
    """JSON-serializable description of the machine and software (no hostname or user name)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    sha, dirty = git_sha()
    env: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **_gpu(),
    }
    env["hardware"] = hardware_string(env)
    return env
