"""``incremental-text`` suite (quick) on MiniLM: HOP forgets nothing where the problem is named, starts exactly where
fine-tuning in sequence starts, learns the spam domains; the rows, table and plot are written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import edgetune.incremental.bench.text  # noqa: F401  (registers the suite)
from edgetune.bench import run_suite
from edgetune.data import locate
from edgetune.models.pretrained.catalog import is_installed


def _ready() -> bool:
    try:
        import transformers  # noqa: F401

        for name in ("brown", "spamassassin"):
            locate.find_folder(name, None, [], subdirs=("package",), how_to_get="")
    except Exception:  # noqa: BLE001  (transformers or a corpus missing: skip)
        return False
    return is_installed("minilm")


@pytest.mark.skipif(not _ready(), reason="run `make models` (minilm) and `make data` (brown, spamassassin)")
def test_quick_suite_hop_against_fine_tuning_in_sequence(tmp_path: Path) -> None:
    out = tmp_path / "text.csv"
    rows = run_suite("incremental-text", out_csv=out, quick=True, out_dir=tmp_path / "work", threads=1,
                     options={"methods": ["hop", "seq-ft"]})
    by = {(r["sequence"], r["method"]): r for r in rows}
    assert set(by) == {("brown-genres", "hop"), ("brown-genres", "seq-ft"), ("spam-domains", "hop"),
                       ("spam-domains", "hop (problem given)"), ("spam-domains", "seq-ft")}
    til = json.loads(by[("brown-genres", "hop")]["matrix"])
    assert len(til) == 2 and til[0][1] is None
    # task-incremental HOP: later problems leave earlier ones exactly as they were
    assert til[1][0] == til[0][0] and by[("brown-genres", "hop")]["forgetting"] == 0.0
    assert by[("brown-genres", "hop")]["bwt"] == 0.0 and by[("brown-genres", "hop")]["kt"] == 0.0
    # same seeds, same first problem: fine-tuning in sequence starts where HOP does
    assert json.loads(by[("brown-genres", "seq-ft")]["matrix"])[0][0] == til[0][0]
    given = by[("spam-domains", "hop (problem given)")]
    assert given["forgetting"] == 0.0 and given["avg_acc"] >= 0.75  # chance 0.5 (0.92 measured)
    dil = json.loads(by[("spam-domains", "hop")]["matrix"])
    assert dil[0][1] is not None  # domain 2 tested before it is learned (forward transfer)
    assert by[("spam-domains", "hop")]["selection"] == "confidence"
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = out.with_suffix(".md").read_text()
    assert "| hop (problem given) | given |" in table and "`spam-domains` (domain-incremental" in table
    assert (tmp_path / "work" / "incremental-text.png").stat().st_size > 10_000
