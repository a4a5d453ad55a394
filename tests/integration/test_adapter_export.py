"""`edgetune export` of an adapter run: merged weights reload into the plain architecture and give the same outputs."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers_cli import cli

from edgetune.core.state import load_tensors
from edgetune.recipe import load_recipe
from edgetune.runner import load_run_model, run


def _adapter_run(tmp_path: Path) -> Path:
    cfg = load_recipe({"name": "ad", "seed": 0, "data": {"name": "synglyph", "limit_train": 512, "limit_test": 64},
                       "model": {"name": "mlp", "widths": [32]},
                       "train": {"epochs": 1, "batch_size": 64, "progress": False,
                                 "optimizer": {"name": "adamw", "lr": 0.01}},
                       "adapter": {"method": "lora", "rank": 4, "targets": ["*"]}, "output_dir": str(tmp_path)})
    return run(cfg, tmp_path / "run").run_dir


def test_merged_export_reloads_as_plain_model(tmp_path: Path) -> None:
    run_dir = _adapter_run(tmp_path)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    r = cli("export", str(run_dir), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "largest output difference" in r.stdout
    state = load_tensors(tmp_path / "out" / "model.safetensors")
    assert not any("adapters" in k or "base_layer" in k for k in state), "wrappers must be gone"
    loaded = load_run_model(run_dir, with_data=True)
    from edgetune.models.base import ModelSpec, build_model

    b = loaded.bundle
    plain = build_model("mlp", {"widths": [32]}, ModelSpec(b.input_shape, b.num_classes, b.task),
                        device=torch.device("cpu"))
    plain.load_state_dict(state)
    from edgetune.data.batches import compose, take

    x = compose(b.transform, loaded.loaded.transform)(take(b.test, torch.arange(8)))[0]
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), loaded.model(x), rtol=0, atol=1e-5)
    assert any(p.abs().sum() > 0 for k, p in load_tensors(run_dir / "adapter" / "adapter_model.safetensors").items()
               if "lora_B" in k), "the trained adapter's B must have moved off zero"


def test_peft_export(tmp_path: Path) -> None:
    run_dir = _adapter_run(tmp_path)
    r = cli("export", str(run_dir), "--format", "adapter-peft", "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "adapter_config.json").is_file()
