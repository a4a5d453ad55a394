"""``merging-rebasin`` suite (quick): weight matching removes most of the loss barrier between two MLPs trained
from different seeds on digits; the path rows and the plot are written."""

from __future__ import annotations

from pathlib import Path

import edgetune.merging.bench.rebasin  # noqa: F401  (registers the suite)
from edgetune.bench import run_suite


def test_quick_suite_rebasin_lowers_the_barrier(tmp_path: Path) -> None:
    rows = run_suite("merging-rebasin", out_csv=tmp_path / "rb.csv", quick=True, out_dir=tmp_path / "work", threads=1)
    path = [r for r in rows if r["row"] == "path"]
    (s,) = [r for r in rows if r["row"] == "summary"]
    assert [r["alpha"] for r in path] == [i / 10 for i in range(11)]
    assert s["acc_a"] > 0.85 and s["acc_b"] > 0.85
    # naive averaging of two seeds breaks the model; aligned first, the midpoint is about as good as the ends
    assert s["barrier_naive"] > 0.3, s
    assert s["barrier_rebasin"] < 0.3 * s["barrier_naive"], s
    assert s["mid_acc_rebasin"] > s["mid_acc_naive"] + 0.2, s
    assert (tmp_path / "work" / "merging-rebasin-digits.png").stat().st_size > 10_000
