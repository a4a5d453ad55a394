"""Peak memory: units of ru_maxrss, and the sampled peak within a block."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from edgetune.core.errors import ConfigError
from edgetune.measure import cuda_peak_bytes, current_rss_bytes, peak_rss_bytes, track_peak_memory

MB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/statm")


@linux_only
def test_rss_units_are_bytes() -> None:
    now = current_rss_bytes()
    peak = peak_rss_bytes()
    assert now is not None and now > 20 * MB  # python + torch: tens of MB at least
    assert peak >= now * 0.9  # lifetime peak in bytes, not KiB (KiB would be ~1000x smaller)
    assert peak < 1 << 40


@linux_only
def test_sees_allocation_freed_inside_block() -> None:
    with track_peak_memory() as mem:
        x = torch.ones(50_000_000)  # 200 MB, written so the pages are resident
        time.sleep(0.05)
        del x
        time.sleep(0.02)
    assert mem.rss_source == "sampled"
    assert mem.samples >= 3
    assert mem.rss_delta_bytes >= 150 * MB
    assert mem.cuda_bytes is None and mem.cuda_delta_bytes is None


@linux_only
def test_sees_allocation_alive_at_exit_and_a_quiet_block_stays_small() -> None:
    with track_peak_memory(interval_s=0.5) as mem:  # sampler too slow to matter: the exit sample counts
        x = torch.ones(50_000_000)
    assert mem.rss_delta_bytes >= 150 * MB
    del x
    # Unlike ru_maxrss (a lifetime high-water mark), a quiet block after a big one reports little.
    with track_peak_memory() as quiet:
        time.sleep(0.02)
    assert quiet.rss_delta_bytes < 50 * MB
    assert peak_rss_bytes() >= mem.rss_bytes * 0.9


def test_cpu_device_reports_no_cuda_and_bad_arguments_raise() -> None:
    assert cuda_peak_bytes("cpu") == 0
    with pytest.raises(ConfigError, match="interval_s"), track_peak_memory(interval_s=0):
        pass
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            cuda_peak_bytes("cuda")
        with pytest.raises(ConfigError, match="CUDA is not available"), track_peak_memory("cuda"):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_within_block() -> None:
    dev = torch.device("cuda")
    keep = torch.ones(10_000_000, device=dev)  # 40 MB allocated before the block
    with track_peak_memory(dev) as mem:
        y = torch.ones(25_000_000, device=dev)  # 100 MB
        del y
    assert mem.cuda_start_bytes is not None and mem.cuda_start_bytes >= 40_000_000
    assert mem.cuda_delta_bytes is not None and 100_000_000 <= mem.cuda_delta_bytes < 110_000_000
    assert cuda_peak_bytes(dev) == mem.cuda_bytes
    del keep
