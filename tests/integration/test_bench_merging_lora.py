"""``merging-lora`` suite (quick): on held-out adapter pairs ZipLoRA's per-pair optimisation beats the plain
average, LoRA.rar with input statistics lands between them in one forward pass, at least 100x faster."""

from __future__ import annotations

from pathlib import Path

import edgetune.merging.bench.lora  # noqa: F401  (registers the suite)
from edgetune.bench import run_suite


def test_quick_suite_ziplora_and_lorarar(tmp_path: Path) -> None:
    rows = run_suite("merging-lora", out_csv=tmp_path / "lm.csv", quick=True, out_dir=tmp_path / "work", threads=1)
    by = {r["method"]: r for r in rows}
    assert set(by) >= {"base", "own", "linear", "concat", "svd", "ziplora", "lorarar", "lorarar_stats"}
    assert by["own"]["rel_error"] == 0 and by["base"]["rel_error"] == 1
    # the plain sum of two task LoRAs is worse than the base; the average helps; the learnt merges help more
    assert by["concat"]["rel_error"] > 1 > by["linear"]["rel_error"]
    assert by["ziplora"]["rel_error"] < by["linear"]["rel_error"] - 0.08, by
    assert by["lorarar_stats"]["rel_error"] < by["linear"]["rel_error"] - 0.03, by
    assert by["lorarar"]["seconds"] * 100 < by["ziplora"]["seconds"], by  # the issue: at least 100x faster
