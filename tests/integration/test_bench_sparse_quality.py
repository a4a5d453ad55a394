"""``sparse-quality`` suite: one real (reduced) run per row, the Markdown table, and resuming a slice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from edgetune.bench import run_suite
from edgetune.sparse.bench.quality import quality_table

OPTS = {"methods": ["set"], "seeds": [0], "epochs": 3, "set": ["train.num_threads=1"]}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_row_learns_writes_table_and_resumes(tmp_path: Path) -> None:
    out, work = tmp_path / "q.csv", tmp_path / "work"
    rows = run_suite("sparse-quality", out_csv=out, quick=True, options=OPTS, out_dir=work)
    assert len(rows) == 1
    row = rows[0]
    # quick = digits at 10% density; the user's epochs=3 wins over the quick default (8)
    assert row["method"] == "set" and row["dataset"] == "digits" and row["epochs"] == 3
    assert abs(row["density"] - 0.1) < 1e-3
    assert row["test_acc"] > 0.8, row  # a broken sparse layer or update stays near chance (0.1)
    # the official code's figure: best per-epoch test accuracy after T_end (= epoch 3 of 3 here: the last)
    assert row["best_test_acc_late"] == pytest.approx(row["test_acc"])
    assert row["torch_threads"] == 1  # the run's own thread count, not the process default
    (run_dir,) = work.glob("fmnist-mlp-1pct-e3-set-s0-*")  # suffix: hash of the settings
    assert (run_dir / "summary.json").is_file()
    assert json.loads((run_dir / "bench-row.json").read_text())["method"] == "set"
    assert (work / "curves.png").stat().st_size > 10_000  # test accuracy + active neurons per epoch

    # the table: one group (its settings = the overrides besides epochs and density), seeds, mean accuracy
    table = out.with_suffix(".md").read_text()
    assert table == quality_table(out)
    line = next(x for x in table.splitlines() if "| set |" in x)
    # 3 epochs of 29 steps, T_end = floor(0.75 * 87) = 65: SET updates once per epoch before it (steps 29, 58)
    assert row["topology_updates"] == 2
    assert "| digits | 3 | data.name=digits model.widths=[256,256,256] train.num_threads=1 | set | 2 | 1 |" in line and f"{row['test_acc']:.4f} ± 0.0000" in line

    # the same slice again with the same work dir continues from the run's checkpoint instead of retraining
    again = run_suite("sparse-quality", out_csv=out, quick=True, options=OPTS, out_dir=work)
    assert again[0]["test_acc"] == row["test_acc"]
    assert again[0]["steps"] == row["steps"]
    assert len((run_dir / "command.txt").read_text().splitlines()) == 2
    assert len(_rows(out)) == 2

    # other settings never resume this run: they get a folder of their own
    run_suite("sparse-quality", out_csv=out, quick=True, out_dir=work,
              options={**OPTS, "set": ["train.num_threads=1", "sparse.zeta=0.1"]})
    (new,) = set(work.glob("fmnist-mlp-1pct-e3-set-s0-*")) - {run_dir}
    assert len((new / "command.txt").read_text().splitlines()) == 1  # trained from scratch
    assert "zeta: 0.1" in (new / "config.yaml").read_text()
