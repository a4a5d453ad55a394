"""``incremental-search`` suite (quick: MobileNetV2 stride 16 at 224 px, 5 personal objects): the training-free search
with mask supports finds and identifies the personal objects far better than the global-pooling / centre-box
baseline measured in the same run; the rows, the Markdown table and the plot are written."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgetune.incremental.bench.search  # noqa: F401  (registers the suite)
from edgetune.bench import run_suite
from edgetune.core.errors import DataError
from edgetune.data.scenes import load_objects
from edgetune.models.pretrained.catalog import is_installed


def _photos() -> bool:
    try:
        load_objects(side=16)
    except DataError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not is_installed("mobilenet-v2"), reason="run `make models` (mobilenet-v2)"),
    pytest.mark.skipif(not _photos(), reason="foolbox photos not installed: run `bash scripts/fetch-data.sh`"),
]


def test_quick_suite_search_beats_the_baseline(tmp_path: Path) -> None:
    csv = tmp_path / "search.csv"
    rows = run_suite("incremental-search", out_csv=csv, quick=True, out_dir=tmp_path / "work", threads=1)
    by = {r["method"]: r for r in rows}
    assert sorted(by) == ["baseline (global pool, centre box)", "swiss-dino (box support)",
                          "swiss-dino (box support, no split)", "swiss-dino (mask support)"]
    mask, box, base = by["swiss-dino (mask support)"], by["swiss-dino (box support)"], by[
        "baseline (global pool, centre box)"]
    whole = by["swiss-dino (box support, no split)"]
    assert mask["personal"] == 5 and mask["queries"] == 14 and mask["positives"] == 10
    # mask supports: objects found (patch IoU) and identified (AP over queries with negatives, accuracy)
    assert mask["miou"] > 0.35 and mask["miou"] > base["miou"] + 0.25, (mask, base)
    assert mask["ap"] > 0.75 and mask["ap"] > base["ap"] + 0.3, (mask, base)
    assert mask["accuracy"] >= 0.6 and mask["accuracy"] > base["accuracy"] + 0.3, (mask, base)
    assert mask["support_fg_iou"] > 0.6  # the area-resized mask covers the object's patches
    # box supports (k-means split, or the whole box) still identify better than the baseline
    assert box["ap"] > base["ap"] + 0.15, (box, base)
    assert whole["ap"] > base["ap"] + 0.15, (whole, base)
    assert all(r["query_median_ms"] > 0 for r in rows)
    table = csv.with_suffix(".md").read_text()
    assert table.count("| s16@224") == 4 and "swiss-dino (mask support)" in table
    assert (tmp_path / "work" / "incremental-search.png").stat().st_size > 10_000
