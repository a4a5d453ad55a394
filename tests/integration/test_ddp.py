"""The same recipe under torchrun with 2 CPU processes (gloo): it trains and the ranks end identical."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers_cli import env, write_recipe


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", name="ddp", seed=0, output_dir=str(tmp_path / "runs"),
        data={"name": "digits"}, model={"name": "mlp", "widths": [64], "dropout": 0.1},
        train={"epochs": 8, "batch_size": 64, "progress": False, "num_threads": 1,
               "optimizer": {"name": "adam", "lr": 0.005}},
    )
    run_dir = tmp_path / "run"
    torchrun = shutil.which("torchrun") or None
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc-per-node", "2", "-m", "edgetune.cli.main", "run", str(recipe),
        "--run-dir", str(run_dir)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check = [x for x in recs if x["kind"] == "ddp_check"]
    assert len(check) == 1 and check[0]["world_size"] == 2
    assert check[0]["in_sync"] and len(set(check[0]["checksums"])) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_acc"] > 0.85
    # each rank saw half of every global batch: steps per epoch follow the global batch size
    assert summary["steps"] == 8 * -(-(summary["train_examples"] // 2) // 32)


HF_SCRIPT = r'''
import sys, torch
from transformers import BertConfig, BertForSequenceClassification
from edgetune import Trainer, TrainConfig
from edgetune.data.batches import DictDataset

torch.manual_seed(0)
cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=16, num_labels=2)
model = BertForSequenceClassification(cfg)
g = torch.Generator().manual_seed(1)
ids = torch.randint(5, 40, (256, 12), generator=g)
ids[:128, 3] = 4  # class 1: token 4 at position 3
labels = (ids[:, 3] == 4).long()
data = DictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
tc = TrainConfig(epochs=12, batch_size=32, progress=False, num_threads=1, log_every_steps=4,
                 optimizer={"name": "adamw", "lr": 3e-3})
out = Trainer(model, data, tc, test=data, run_dir=sys.argv[1], seed=0).fit()
from edgetune.train.distributed import exit_process
exit_process(0 if out["test_acc"] > 0.9 else 3)
'''


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_hugging_face_model_trains_under_ddp(tmp_path):
    """A transformers model (keyword inputs, ModelOutput) through edgetune's loop in 2 gloo processes."""
    pytest.importorskip("transformers")
    script = tmp_path / "hf_ddp.py"
    script.write_text(HF_SCRIPT)
    run_dir = tmp_path / "run"
    torchrun = shutil.which("torchrun") or None
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc-per-node", "2", str(script), str(run_dir)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check = [x for x in recs if x["kind"] == "ddp_check"]
    assert len(check) == 1 and check[0]["world_size"] == 2 and check[0]["in_sync"]
    assert [x["acc"] for x in recs if x["kind"] == "eval"][-1] > 0.9
