"""``adapters-convergence`` suite (quick): RAC-LoRA closes the gap to the least-squares optimum W* that plain LoRA,
limited to rank r, cannot; the rows, table and plot are written."""

from __future__ import annotations

import csv
from itertools import pairwise
from pathlib import Path

import edgetune.adapters.bench.convergence  # noqa: F401  (registers the suite)
from edgetune.bench import run_suite


def test_quick_suite_rac_lora_converges_where_lora_plateaus(tmp_path: Path) -> None:
    out = tmp_path / "conv.csv"
    rows = run_suite("adapters-convergence", out_csv=out, quick=True, out_dir=tmp_path / "work", threads=1)
    final = {(r["problem"], r["method"]): r["value"] for r in rows if r["final"]}
    ls = {m: v for (p, m), v in final.items() if p == "least-squares"}
    bound = ls["rank-2 optimum"]
    assert 0.6 < bound < 0.95  # a full-rank gap: the best rank-2 update leaves most of it
    assert ls["full"] < 1e-4  # full fine-tuning reaches the closed-form optimum
    assert abs(ls["lora"] - bound) < 0.02, ls  # LoRA stalls at its rank-2 optimum
    assert ls["asymmetric"] > bound  # a fixed random subspace does worse still
    assert ls["rac_lora"] < 0.4 * ls["lora"], ls  # RAC-LoRA's links keep closing the gap
    # the distance shrinks link after link
    curve = [r["value"] for r in rows if r["problem"] == "least-squares" and r["method"] == "rac_lora"]
    assert curve[0] == 1.0 and all(b <= a + 1e-6 for a, b in pairwise(curve)), curve
    mlp = {m: v for (p, m), v in final.items() if p == "mlp"}
    assert set(mlp) >= {"full", "lora", "asymmetric", "chain", "rac_lora"}
    assert mlp["full"] < mlp["lora"] < 1.0
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "| rac_lora |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "work" / "adapters-convergence.png").stat().st_size > 10_000
