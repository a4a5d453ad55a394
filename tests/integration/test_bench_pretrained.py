"""Smoke tests (``--quick`` sizes) of the ``pretrained``, ``loop-overhead`` and ``hf-parity`` bench suites:
the rows carry their fields with sane values, and the equal-by-construction figures are equal."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import edgetune.bench.suites  # noqa: F401  (registers the suites)
from edgetune.bench import run_suite
from edgetune.bench.hf_parity import hf_order
from edgetune.bench.pretrained import step_times_s
from edgetune.models.pretrained.catalog import is_installed


def _hf_ready() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


needs_mobilenet = pytest.mark.skipif(not is_installed("mobilenet-v2"), reason="run `make models` (mobilenet-v2)")
needs_minilm = pytest.mark.skipif(not (is_installed("minilm") and _hf_ready()), reason="run `make models` (minilm)")


def test_step_times_from_metrics(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    recs = [{"kind": "train", "step": s, "time_s": t} for s, t in ((1, 0.5), (2, 0.7), (3, 1.0), (4, 1.4))]
    recs.insert(2, {"kind": "eval", "step": 2, "loss": 1.0})
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert step_times_s(path, warmup=0) == pytest.approx([0.5, 0.2, 0.3, 0.4])
    assert step_times_s(path) == pytest.approx([0.3, 0.4])  # the first two steps are warm-up


def test_hf_order_is_the_trainer_order() -> None:
    n, batch, seed = 10, 4, 3
    order = hf_order(n, batch, steps=4, seed=seed)
    p0 = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003)).tolist()
    p1 = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 1)).tolist()
    # 3 batches per epoch (4, 4, 2): the short last batch is padded by nothing, the next epoch starts fresh
    assert order == p0 + p1[:6]


@needs_mobilenet
def test_pretrained_quick_mobilenet_probe(tmp_path: Path) -> None:
    out = tmp_path / "pretrained.csv"
    (row,) = run_suite("pretrained", out_csv=out, quick=True, out_dir=tmp_path / "w", threads=2,
                       options={"only": ["mobilenet-v2/probe"]})
    assert row["model"] == "mobilenet-v2" and row["variant"] == "probe" and row["input"] == "32 px"
    assert row["dataset"] == "fashion-mnist" and row["steps"] == 3 and row["train_examples"] == 48
    assert 0.0 <= row["test_acc"] <= 1.0 and row["step_time_ms_median"] > 0 and row["peak_rss_mb"] > 100
    assert row["trainable_parameters"] == 1280 * 10 + 10  # the new head alone
    assert row["parameters"] > 2_000_000 and row["load_s"] > 0
    assert "| mobilenet-v2 | mobilenet-v2 | probe |" in out.with_suffix(".md").read_text()


def test_pretrained_quick_resnet20_scratch(tmp_path: Path) -> None:
    (row,) = run_suite("pretrained", out_csv=tmp_path / "p.csv", quick=True, out_dir=tmp_path / "w", threads=2,
                       options={"only": ["resnet20/scratch"]})
    assert row["model"] == "resnet20" and row["variant"] == "scratch" and row["input"] == "28 px"
    assert row["steps"] == 3 and 0.0 <= row["test_acc"] <= 1.0 and row["step_time_ms_median"] > 0
    assert row["trainable_parameters"] == row["parameters"] and row["load_s"] is None  # nothing pretrained


@needs_minilm
def test_pretrained_quick_minilm_probe(tmp_path: Path) -> None:
    rows = run_suite("pretrained", out_csv=tmp_path / "p.csv", quick=True, out_dir=tmp_path / "w", threads=2,
                     options={"only": ["minilm/probe"]})
    (row,) = rows
    assert row["model"] == "minilm" and row["dataset"] == "spamassassin" and row["input"] == "32 tokens"
    assert row["trainable_parameters"] == 384 * 2 + 2 and row["parameters"] > 20_000_000
    assert 0.0 <= row["test_acc"] <= 1.0 and row["load_s"] > 0 and row["step_time_ms_median"] > 0


def test_loop_overhead_quick_mlp(tmp_path: Path) -> None:
    out = tmp_path / "lo.csv"
    (row,) = run_suite("loop-overhead", out_csv=out, quick=True, threads=1, options={"models": ["mlp"]})
    assert row["model"] == "mlp" and row["timed_steps_per_side"] == 2 * (12 - 3)
    assert row["edgetune_step_ms_median"] > 0 and row["bare_step_ms_median"] > 0
    assert math.isfinite(row["overhead_ratio"]) and row["overhead_ratio"] > -0.9
    # same weights, data order and optimizer: the two loops end on the same loss
    assert row["final_loss_abs_diff"] < 1e-6
    with open(out, newline="") as f:
        assert next(csv.DictReader(f))["overhead_ratio"] != ""


@needs_minilm
def test_hf_parity_quick_curves_match(tmp_path: Path) -> None:
    curves = tmp_path / "curves"
    (row,) = run_suite("hf-parity", out_csv=tmp_path / "hp.csv", quick=True, threads=2,
                       options={"curves_dir": str(curves), "steps": 2, "max_length": 16})
    assert row["dropout"] == "off" and row["steps_compared"] == 2
    assert row["max_abs_loss_diff"] < 1e-4, row  # same computation on both sides
    assert row["max_abs_lr_diff"] < 1e-12
    assert row["edgetune_step_ms_median"] > 0 and row["hf_step_ms_median"] > 0
    with open(curves / "hf-parity-curves.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [int(r["step"]) for r in got] == [1, 2]
    assert (curves / "hf-parity.png").stat().st_size > 5_000
