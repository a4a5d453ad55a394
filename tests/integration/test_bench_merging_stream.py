"""``merging-stream`` suite (quick): every method streams generated checkpoints with memory far below their size."""

from __future__ import annotations

from pathlib import Path

import edgetune.merging.bench.stream  # noqa: F401  (registers the suite)
from edgetune.bench import run_suite


def test_quick_suite_streams(tmp_path: Path) -> None:
    rows = run_suite("merging-stream", out_csv=tmp_path / "ms.csv", quick=True, out_dir=tmp_path / "work", threads=1,
                     options={"size_mb": "16"})
    assert [r["method"] for r in rows] == ["linear", "task_arithmetic", "ties", "dare", "breadcrumbs"]
    for r in rows:
        assert 60 < r["inputs_mib"] < 70 and r["tensors"] > 100
        assert r["read_once_s"] > 0 and r["merge_s"] > 0
        # a whole-model merge would hold all 64 MiB of inputs; streaming holds about a tensor per input
        assert r["peak_rss_delta_mib"] < 0.4 * r["inputs_mib"], r
