"""The incremental family's protocol suites in quick mode: ``incremental`` (FSCIL sessions: NCM, TEEN, moments,
ETF, naive fine-tuning), ``incremental-ncd`` (controllable forgetting) and ``incremental-speed``."""

from __future__ import annotations

from pathlib import Path

import edgetune.incremental.bench  # noqa: F401  (registers the suites)
from edgetune.bench import run_suite


def test_quick_fscil_protocols(tmp_path: Path) -> None:
    rows = run_suite("incremental", out_csv=tmp_path / "inc.csv", quick=True, out_dir=tmp_path / "work", threads=1,
                     options={"protocols": "digits,synglyph"})
    by = {(r["protocol"], r["learner"]): r for r in rows}
    assert {("digits", x) for x in ("ncm", "teen", "etf-ncm", "finetune")} <= set(by)
    assert {("synglyph", x) for x in ("ncm", "teen", "moments12", "moments123", "etf-ncm", "finetune")} <= set(by)
    ncm = by[("digits", "ncm")]
    assert ncm["acc_first"] >= 0.9 and ncm["acc_last"] >= 0.7, ncm
    assert ncm["acc_last"] < ncm["acc_first"] and ncm["last_novel_acc"] < ncm["last_base_acc"]
    # prototypes keep the base classes; naive fine-tuning on each session's shots forgets them (the cautionary case)
    for proto in ("digits", "synglyph"):
        assert by[(proto, "finetune")]["acc_last"] <= 0.3, by[(proto, "finetune")]
        assert by[(proto, "ncm")]["acc_last"] > by[(proto, "finetune")]["acc_last"] + 0.3
        assert by[(proto, "teen")]["acc_last"] >= by[(proto, "ncm")]["acc_last"] - 0.02
    assert by[("synglyph", "moments12")]["feature_dim"] == 2 * by[("synglyph", "ncm")]["feature_dim"]
    md = (tmp_path / "inc.md").read_text()
    assert "| synglyph | finetune |" in md and "| digits | ncm |" in md
    assert (tmp_path / "work" / "incremental-synglyph.png").stat().st_size > 10_000


def test_quick_ncd_gates_buy_novel_recall_within_the_budget(tmp_path: Path) -> None:
    rows = run_suite("incremental-ncd", out_csv=tmp_path / "ncd.csv", quick=True, out_dir=tmp_path / "work",
                     threads=1, options={"protocols": "digits"})
    by = {(r["rule"], r["budget"]): r for r in rows}
    vanilla = by[("vanilla", None)]
    assert vanilla["for"] < 0.03
    for b in (0.02, 0.05):
        d = by[("base-gate-or-vanilla", b)]
        assert d["ncr"] >= vanilla["ncr"], (d, vanilla)  # rule D never recalls fewer novel examples than vanilla
        assert d["for"] <= b + 0.05  # a small (54-sample) calibration set: loose, the full run checks 1.5 points
    assert by[("base-gate-or-vanilla", 0.05)]["ncr"] > vanilla["ncr"] + 0.1
    assert (tmp_path / "work" / "incremental-ncd-digits.png").stat().st_size > 10_000


def test_quick_speed_rows(tmp_path: Path) -> None:
    rows = run_suite("incremental-speed", out_csv=tmp_path / "sp.csv", quick=True, out_dir=tmp_path / "work",
                     threads=1)
    dims = {r["feature_dim"] for r in rows}
    assert {64, 512} <= dims
    for r in rows:
        assert 0 < r["add_class_learner_only_ms"] <= r["add_class_ms"]
        assert 0 < r["predict_one_learner_only_ms"] <= r["predict_one_ms"]
    assert "| mlp-digits | 64 |" in (tmp_path / "sp.md").read_text()
