"""Wall-clock latency of a callable: median of timed repeats after warm-up, synchronized on CUDA."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgetune.core.errors import ConfigError

__all__ = ["LatencyResult", "measure_latency"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyResult:
    """Seconds per call: median and 10th/90th percentiles (linear interpolation) over ``repeats`` calls."""

    median_s: float
    p10_s: float
    p90_s: float
    mean_s: float
    repeats: int
    times_s: tuple[float, ...] = field(default=(), repr=False)

    def as_row(self, prefix: str = "latency") -> dict[str, Any]:
        """Flat columns in milliseconds for a results row: ``{prefix}_median_ms``, ``..._p10_ms``, ..."""
        return {
            f"{prefix}_median_ms": self.median_s * 1e3,
            f"{prefix}_p10_ms": self.p10_s * 1e3,
            f"{prefix}_p90_ms": self.p90_s * 1e3,
            f"{prefix}_mean_ms": self.mean_s * 1e3,
            f"{prefix}_repeats": self.repeats,
        }


def _sync_fn(device: str | torch.device | None) -> Callable[[], None]:
    if device is None:
        return lambda: None
    dev = torch.device(device)
    if dev.type != "cuda":
        return lambda: None
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} was asked for but CUDA is not available; use device='cpu'")
    return lambda: torch.cuda.synchronize(dev)


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: str | torch.device | None = None,
    min_time_s: float | None = None,
    max_repeats: int = 100_000,
) -> LatencyResult:
    """Time ``fn()`` (no arguments; wrap with a lambda) with :func:`time.perf_counter`.

    ``warmup`` untimed calls come first. Each timed call is bracketed by ``torch.cuda.synchronize``
    when ``device`` is a CUDA device, so queued kernels are counted; with ``device=None`` or a CPU
    device nothing is synchronized (pass the device whenever ``fn`` launches CUDA work).
    With ``min_time_s``, calls continue past ``repeats`` until the timed calls add up to at least
    that many seconds (at most ``max_repeats`` calls), which steadies the figures of very fast calls.
    """
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}; 20 is a good default")
    if max_repeats < repeats:
        raise ConfigError(f"max_repeats ({max_repeats}) must be >= repeats ({repeats})")
    if min_time_s is not None and min_time_s < 0:
        raise ConfigError(f"min_time_s must be >= 0 seconds, got {min_time_s}")
    sync = _sync_fn(device)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    total = 0.0
    target = min_time_s if min_time_s is not None else 0.0
    while len(times) < repeats or (total < target and len(times) < max_repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    arr = np.asarray(times, dtype=np.float64)
    p10, median, p90 = (float(v) for v in np.percentile(arr, [10, 50, 90]))
    result = LatencyResult(median, p10, p90, float(arr.mean()), len(times), tuple(times))
    log.debug("latency: median %.3f ms (p10 %.3f, p90 %.3f) over %d calls", median * 1e3, p10 * 1e3,
              p90 * 1e3, len(times))
    return result
