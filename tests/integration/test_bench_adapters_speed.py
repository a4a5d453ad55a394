"""Smoke tests (``--quick`` sizes) of the ``adapters-speed`` suite: every part's rows carry their columns, PEFT and
edgetune LoRA compute the same losses, LoRA-FA keeps fewer activation bytes than LoRA, and merged models give the
unmerged outputs."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import edgetune.adapters.bench.speed  # noqa: F401  (registers the suite)
from edgetune.adapters.bench.speed import peak_bytes, saved_activation_bytes, speed_table
from edgetune.bench import run_suite
from edgetune.models.pretrained.catalog import is_installed


def _ready() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ready(), reason="needs transformers and peft (pip install 'edgetune[hf]')")

TRAIN = {"variant", "step_median_ms", "step_p10_ms", "step_p90_ms", "time_vs_peft", "time_vs_peft_paired",
         "saved_activations_mb", "step_peak_mb", "persistent_mb", "peak_mb", "peak_vs_peft", "memory_source",
         "trainable_params", "final_loss"}
ACTIVATIONS = {"variant", "adapter_dropout", "saved_activations_mb", "fwd_bwd_peak_mb", "adapter_inputs_mb",
               "projections_mb", "saved_vs_lora", "saved_minus_lora_mb"}
INFERENCE = {"variant", "latency_median_ms", "vs_base", "vs_base_paired", "max_abs_diff_vs_unmerged", "infer_batch"}
COMMON = {"suite", "git_sha", "torch_threads", "quick", "model", "task", "targets", "rank", "alpha", "batch", "seq_len"}


def _check(rows: list[dict[str, Any]], model: str, dropouts: list[float]) -> None:
    rows = [r for r in rows if r["model"] == model]
    for r in rows:
        missing = COMMON | {"train": TRAIN, "activations": ACTIVATIONS, "inference": INFERENCE}[r["part"]]
        assert not missing - set(r), f"{r['part']} row lacks {missing - set(r)}"
    train = {r["variant"]: r for r in rows if r["part"] == "train"}
    assert set(train) == {"edgetune-lora", "peft-lora", "edgetune-lora_fa"}
    assert train["edgetune-lora"]["max_abs_loss_diff_vs_peft"] < 1e-4  # the same function, step after step
    assert train["edgetune-lora"]["trainable_params"] == train["peft-lora"]["trainable_params"]
    assert train["edgetune-lora_fa"]["trainable_params"] < train["edgetune-lora"]["trainable_params"]
    assert train["edgetune-lora_fa"]["saved_activations_mb"] < train["edgetune-lora"]["saved_activations_mb"]
    for r in train.values():
        assert r["step_median_ms"] > 0 and math.isfinite(r["final_loss"]) and r["peak_mb"] > r["persistent_mb"] > 0
    for p in dropouts:
        act = {r["variant"]: r for r in rows if r["part"] == "activations" and r["adapter_dropout"] == p}
        assert set(act) == {"edgetune-lora", "peft-lora", "edgetune-lora_fa"}
        lora, fa = act["edgetune-lora"], act["edgetune-lora_fa"]
        assert fa["saved_activations_mb"] < lora["saved_activations_mb"]
        assert act["peft-lora"]["saved_activations_mb"] == pytest.approx(lora["saved_activations_mb"])
        if p == 0:  # LoRA keeps the adapted layers' inputs, LoRA-FA their rank-r projections instead
            assert lora["saved_activations_mb"] - fa["saved_activations_mb"] == pytest.approx(lora["adapter_inputs_mb"])
    inf = {r["variant"]: r for r in rows if r["part"] == "inference"}
    assert set(inf) == {"base", "edgetune-unmerged", "edgetune-merge_", "edgetune-remove_adapters_merge",
                        "peft-merge_adapter", "peft-merge_and_unload"}
    assert inf["base"]["max_abs_diff_vs_unmerged"] > 1e-6  # training moved the adapter, so merging means something
    for name in ("edgetune-merge_", "edgetune-remove_adapters_merge", "peft-merge_adapter", "peft-merge_and_unload"):
        assert inf[name]["max_abs_diff_vs_unmerged"] < 1e-4, name
    assert inf["edgetune-merge_"]["wrapped_layers"] == inf["edgetune-unmerged"]["wrapped_layers"] > 0
    assert inf["edgetune-remove_adapters_merge"]["wrapped_layers"] == 0
    assert all(r["latency_median_ms"] > 0 for r in inf.values())


def test_quick_suite_on_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "adapters-speed.csv"
    rows = run_suite("adapters-speed", out_csv=out, quick=True, out_dir=tmp_path / "w", threads=1)
    for model in ("tiny-bert", "tiny-llama"):
        _check(rows, model, [0.0, 0.1])
    table = speed_table(out)
    assert "### train" in table and "### activations" in table and "### inference" in table
    assert (tmp_path / "adapters-speed.md").read_text() == table


@pytest.mark.skipif(not is_installed("minilm"), reason="run `make models` (minilm)")
def test_quick_suite_on_minilm(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    rows = run_suite("adapters-speed", out_csv=tmp_path / "a.csv", quick=True, out_dir=tmp_path / "w", threads=1,
                     options={"models": ["minilm"], "steps": 2, "infer_repeats": 3, "dropout": [0.0]})
    _check(rows, "minilm", [0.0])
    assert time.perf_counter() - t0 < 60


def test_saved_bytes_and_peak_measures() -> None:
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    out, saved = saved_activation_bytes(lambda: torch.tanh(x @ w), [w])
    assert saved == 2 * 32 * 64 * 4  # x for w's gradient, tanh's output for its own
    peak, source = peak_bytes(lambda: out.sum().backward(), torch.device("cpu"))
    assert source != "unavailable" and peak >= 64 * 64 * 4  # w.grad at least
