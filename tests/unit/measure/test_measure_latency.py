"""Latency: ordering of percentiles, scale of a known sleep, warm-up, min_time_s, CUDA synchronization."""

from __future__ import annotations

import time

import pytest
import torch

from edgetune.core.errors import ConfigError
from edgetune.measure import LatencyResult, measure_latency


def test_sleep_5ms_reports_about_5ms() -> None:
    res = measure_latency(lambda: time.sleep(0.005), warmup=1, repeats=10)
    assert isinstance(res, LatencyResult) and res.repeats == 10 and len(res.times_s) == 10
    assert res.p10_s <= res.median_s <= res.p90_s
    assert min(res.times_s) <= res.p10_s and res.p90_s <= max(res.times_s)
    assert 0.002 <= res.median_s <= 0.020
    assert res.median_s >= 0.005  # sleep never returns early
    row = res.as_row("fwd")
    assert row["fwd_median_ms"] == pytest.approx(res.median_s * 1e3) and row["fwd_repeats"] == 10


def test_latency_scales_with_work() -> None:
    short = measure_latency(lambda: time.sleep(0.001), warmup=0, repeats=5)
    long = measure_latency(lambda: time.sleep(0.010), warmup=0, repeats=5)
    assert long.median_s > short.median_s + 0.005


def test_percentiles_on_known_times(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0, 30.0, 34.0, 40.0, 45.0])  # durations 1..5 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    res = measure_latency(lambda: None, warmup=0, repeats=5)
    assert res.times_s == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert (res.median_s, res.mean_s) == (3.0, 3.0)
    assert res.p10_s == pytest.approx(1.4) and res.p90_s == pytest.approx(4.6)


def test_warmup_calls_are_not_timed_and_min_time_extends_repeats() -> None:
    calls = []
    res = measure_latency(lambda: calls.append(1), warmup=4, repeats=6)
    assert len(calls) == 10 and res.repeats == 6
    res = measure_latency(lambda: time.sleep(0.001), warmup=0, repeats=2, min_time_s=0.03)
    assert res.repeats > 2 and sum(res.times_s) >= 0.03
    res = measure_latency(lambda: None, warmup=0, repeats=3, min_time_s=10.0, max_repeats=50)
    assert res.repeats == 50


def test_cuda_device_synchronizes_around_each_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    measure_latency(lambda: events.append("call"), warmup=1, repeats=2, device="cuda")
    assert events == ["call", "sync", "sync", "call", "sync", "sync", "call", "sync"]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConfigError, match="repeats"):
        measure_latency(lambda: None, repeats=0)
    with pytest.raises(ConfigError, match="warmup"):
        measure_latency(lambda: None, warmup=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            measure_latency(lambda: None, device="cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matmul_time_includes_kernels() -> None:
    a = torch.randn(2048, 2048, device="cuda")
    synced = measure_latency(lambda: a @ a, warmup=3, repeats=10, device="cuda")
    assert 0 < synced.p10_s <= synced.median_s <= synced.p90_s
