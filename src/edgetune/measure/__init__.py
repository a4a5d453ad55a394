"""Device budget: parameters, non-zeros, bytes in memory and on disk, peak memory, latency, environment.

Imports only torch, numpy, the standard library and :mod:`edgetune.core`.
"""

from edgetune.measure.env import environment, git_sha, hardware_string
from edgetune.measure.latency import LatencyResult, measure_latency
from edgetune.measure.memory import (
    MemoryPeak,
    cuda_peak_bytes,
    current_rss_bytes,
    peak_rss_bytes,
    track_peak_memory,
)
from edgetune.measure.size import (
    bytes_on_disk,
    count_nonzeros,
    count_parameters,
    state_dict_bytes,
    tensor_bytes,
    tensor_nonzeros,
)

__all__ = [
    "LatencyResult",
    "MemoryPeak",
    "bytes_on_disk",
    "count_nonzeros",
    "count_parameters",
    "cuda_peak_bytes",
    "current_rss_bytes",
    "environment",
    "git_sha",
    "hardware_string",
    "measure_latency",
    "peak_rss_bytes",
    "state_dict_bytes",
    "tensor_bytes",
    "tensor_nonzeros",
    "track_peak_memory",
]
