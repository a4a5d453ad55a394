"""Peak memory: process RSS (CPU) and CUDA allocator peaks.

Limits worth knowing:

- ``ru_maxrss`` (:func:`peak_rss_bytes`) is a high-water mark over the *whole process lifetime*; it
  never goes down, so it cannot tell the peak of one block once the process has been bigger before.
- :func:`track_peak_memory` therefore samples the current RSS in a background thread (every
  ``interval_s``, default 2 ms) and takes the maximum of the samples within the block. A spike
  shorter than the interval can be missed, except when it raises the lifetime high-water mark, which
  the tracker also checks. RSS counts pages actually touched: ``torch.empty`` of 1 GB that is never
  written adds (almost) nothing, and memory the allocator keeps cached after ``del`` still counts.
- The current RSS comes from ``/proc/self/statm`` (Linux). Where that file is missing (macOS), the
  tracker falls back to the growth of ``ru_maxrss``, which is only non-zero when the block sets a
  new lifetime record.
- On CUDA the tracker resets the allocator's peak statistics at entry; ``cuda_bytes`` is
  ``torch.cuda.max_memory_allocated`` (tensors, not the caching allocator's reserve or the context).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from edgetune.core.errors import ConfigError

try:  # not on Windows
    import resource
except ImportError:  # pragma: no cover - platform dependent
    resource = None  # type: ignore[assignment]

__all__ = ["MemoryPeak", "cuda_peak_bytes", "current_rss_bytes", "peak_rss_bytes", "track_peak_memory"]

log = logging.getLogger(__name__)

_STATM = "/proc/self/statm"


def peak_rss_bytes() -> int:
    """Lifetime high-water mark of this process's resident memory, in bytes (0 where unknown).

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
    """
    if resource is None:  # pragma: no cover - platform dependent
        return 0
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss_bytes() -> int | None:
    """Resident memory of this process now, in bytes, from ``/proc/self/statm``; None where unavailable."""
    try:
        with open(_STATM, "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _cuda_device(device: str | torch.device | None) -> torch.device | None:
    """The CUDA device to watch, or None when the work runs elsewhere."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} was asked for but CUDA is not available; use device='cpu'")
    return dev


def cuda_peak_bytes(device: str | torch.device | None = None) -> int:
    """Peak bytes allocated by tensors on a CUDA device since the last reset; 0 for CPU devices.

    ``device=None`` means the current CUDA device when there is one.
    """
    dev = _cuda_device(device)
    return int(torch.cuda.max_memory_allocated(dev)) if dev is not None else 0


@dataclass
class MemoryPeak:
    """What :func:`track_peak_memory` saw. Byte counts are absolute; ``*_delta_bytes`` are above entry.

    Fields are filled when the block exits (``rss_bytes`` is the highest value seen within the block).
    """

    rss_start_bytes: int = 0
    rss_bytes: int = 0
    rss_source: str = "sampled"  # "sampled" (/proc) or "ru_maxrss" (fallback, see module docstring)
    samples: int = 0
    cuda_start_bytes: int | None = None
    cuda_bytes: int | None = None

    @property
    def rss_delta_bytes(self) -> int:
        """How far the RSS rose above its value at entry."""
        return max(0, self.rss_bytes - self.rss_start_bytes)

    @property
    def cuda_delta_bytes(self) -> int | None:
        if self.cuda_bytes is None or self.cuda_start_bytes is None:
            return None
        return max(0, self.cuda_bytes - self.cuda_start_bytes)


class _RssSampler:
    """Background thread that keeps the maximum of the current RSS."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.peak = current_rss_bytes() or 0
        self.samples = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgetune-rss-sampler", daemon=True)

    def _sample(self) -> None:
        rss = current_rss_bytes()
        if rss is not None:
            self.peak = max(self.peak, rss)
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the state at exit counts too


@contextmanager
def track_peak_memory(
    device: str | torch.device | None = None, *, interval_s: float = 0.002
) -> Iterator[MemoryPeak]:
    """Measure the peak memory of the block it wraps.

    Example::

        with track_peak_memory("cuda") as mem:
            loss = model(x).sum(); loss.backward()
        mem.rss_delta_bytes, mem.cuda_bytes

    ``device``: the device the work runs on; CUDA peak stats are reset at entry for a CUDA device
    (``None`` = CPU only). ``interval_s``: RSS sampling period in seconds.
    """
    if interval_s <= 0:
        raise ConfigError(f"interval_s must be > 0 seconds, got {interval_s}; try 0.002")
    dev = torch.device(device) if device is not None else None
    cuda_dev = _cuda_device(dev) if dev is not None else None
    result = MemoryPeak()
    if cuda_dev is not None:
        torch.cuda.synchronize(cuda_dev)
        torch.cuda.reset_peak_memory_stats(cuda_dev)
        result.cuda_start_bytes = int(torch.cuda.memory_allocated(cuda_dev))
    maxrss_start = peak_rss_bytes()
    start = current_rss_bytes()
    sampler = _RssSampler(interval_s) if start is not None else None
    result.rss_start_bytes = start if start is not None else maxrss_start
    if sampler is not None:
        sampler.start()
    try:
        yield result
    finally:
        if cuda_dev is not None:
            torch.cuda.synchronize(cuda_dev)
            result.cuda_bytes = int(torch.cuda.max_memory_allocated(cuda_dev))
        maxrss_end = peak_rss_bytes()
        if sampler is not None:
            sampler.stop()
            result.samples = sampler.samples
            # A new lifetime record set inside the block is a peak of the block, even if unsampled.
            record = maxrss_end if maxrss_end > maxrss_start else 0
            result.rss_bytes = max(sampler.peak, record)
        else:
            result.rss_source = "ru_maxrss"
            result.rss_bytes = maxrss_end
        log.debug("peak memory: rss %.1f MiB (+%.1f MiB, %d samples), cuda %s", result.rss_bytes / 2**20,
                  result.rss_delta_bytes / 2**20, result.samples, result.cuda_bytes)
