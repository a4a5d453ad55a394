"""The incremental-instances bench suite in quick mode: rows, Markdown table, plot, and the figures' ordering."""

from __future__ import annotations

from pathlib import Path

import edgetune.incremental.bench.instances  # noqa: F401  (registers the suite until the family imports it)
from edgetune.bench.harness import run_suite


def test_quick_suite_rows_table_plot_and_claims(tmp_path: Path) -> None:
    out = tmp_path / "incremental-instances.csv"
    rows = run_suite("incremental-instances", quick=True, out_csv=out, device="cpu",
                     options={"plot_dir": str(tmp_path)}, env={"timestamp_utc": "t0", "git_sha": "abc",
                                                               "hardware": "test", "torch": "x"})
    assert (tmp_path / "incremental-instances.png").stat().st_size > 1000
    md = (tmp_path / "incremental-instances.md").read_text()
    assert "| convnet (trained on 12 base classes) | 3 | bag + moments (1,2) | oracle |" in md
    # 2 finetune + 2 all-instance + 4 bag methods x (oracle, predicted) rows per instances-per-object setting
    assert len(rows) == 2 * (2 + 2 + 4 * 2)
    acc = {(r["per_object"], r["method"], r["object_source"]): r["accuracy"] for r in rows}
    assert {r["instances"] for r in rows} == {8, 12}  # 4 object classes x 2 or 3 instances
    for per in (2, 3):
        few_steps = acc[(per, "fine-tune linear head (10 SGD steps)", "-")]
        bag12 = acc[(per, "bag + moments (1,2)", "oracle")]
        assert few_steps <= 0.3  # a few SGD steps on the shots stay near chance (1/8, 1/12)
        assert bag12 >= 0.6 and bag12 >= few_steps + 0.3
        # the bag never loses against the same search over every instance with the oracle's object class
        assert acc[(per, "bag (GAP)", "oracle")] >= acc[(per, "prototypes, all instances (GAP)", "-")]
        assert bag12 >= acc[(per, "prototypes, all instances (1,2)", "-")]
        # mean + std beat the mean alone on these glyph regions (seed 0: by 12 and 18 points)
        assert bag12 >= acc[(per, "bag (GAP)", "oracle")] + 0.05
    obj = [r["object_accuracy"] for r in rows if r["object_source"] == "predicted"]
    assert obj and min(obj) >= 0.8
