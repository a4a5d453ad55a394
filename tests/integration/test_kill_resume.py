"""SIGKILL a run mid-training, resume it, and get bit-identical final weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch
from helpers_cli import cli, env, write_recipe
from safetensors.torch import load_file


def recipe(tmp_path):
    return write_recipe(
        tmp_path / "r.yaml", name="kill", seed=7, output_dir=str(tmp_path / "runs"),
        data={"name": "digits", "val_fraction": 0.1},
        model={"name": "mlp", "widths": [256, 256], "dropout": 0.1},
        train={"epochs": 12, "batch_size": 16, "progress": False, "num_threads": 1,
               "optimizer": {"name": "adamw", "lr": 0.001}, "schedule": {"name": "cosine", "warmup_steps": 20},
               "checkpoint": {"every_steps": 25, "keep_last": 2}},
    )


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    r = recipe(tmp_path)
    ref = cli("run", str(r), "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    total = json.loads((tmp_path / "ref" / "summary.json").read_text())["steps"]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli.main", "run", str(r), "--run-dir", str(run_dir)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = sorted(ckpts.glob("step-*.json")) if ckpts.exists() else []
        if found and int(found[-1].stem.split("-")[1]) >= 100:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    last = max(int(p.stem.split("-")[1]) for p in ckpts.glob("step-*.json"))
    assert 0 < last < total

    res = cli("run", "--resume", str(run_dir))
    assert res.returncode == 0, res.stderr
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((run_dir / "summary.json").read_text())
    assert sa["test_acc"] == sb["test_acc"] and sb["steps"] == total
