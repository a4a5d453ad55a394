"""Run folders you can trust: one run per folder, a lock, --resume changes only what it can apply, no duplicated
records, no half folders, BatchNorm's one-example batch, and a compact export that never grows the model.

Every refused case checks the exit status, the message, that no traceback reached the user, and that the run
folder is byte-identical before and after.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_cli import cli, write_recipe

from edgetune.pipeline.runfolder import LOCK


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def small(tmp_path: Path, **train) -> Path:
    return write_recipe(tmp_path / "r.yaml", name="t", seed=0, output_dir=str(tmp_path / "runs"),
                        data={"name": "digits"}, model={"name": "mlp", "widths": [32]},
                        train={"epochs": 2, "batch_size": 64, "progress": False, "num_threads": 1, **train})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("finished")
    recipe = small(tmp)
    r = cli("run", str(recipe), "--run-dir", str(tmp / "run"))
    assert r.returncode == 0, r.stderr
    return recipe, tmp / "run"


def refused(r: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_new_run_into_a_folder_holding_a_run_is_refused(finished):
    recipe, run = finished
    before = tree(run)
    refused(cli("run", str(recipe), "--run-dir", str(run)), 2, "already holds")
    assert tree(run) == before


def test_a_live_lock_is_refused_naming_the_process(finished, tmp_path):
    _, run = finished
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (copy / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "now"}))
        before = tree(copy)
        refused(cli("run", "--resume", str(copy)), 1, f"pid {sleeper.pid}")
        assert tree(copy) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale, taken over, and removed at the end
    r = cli("run", "--resume", str(copy))
    assert r.returncode == 0, r.stderr
    assert "stale lock" in r.stderr and not (copy / LOCK).exists()


@pytest.mark.parametrize("override", ["train.optimizer.lr=0.5", "seed=3", "model.widths=[8]", "data.name=mnist"])
def test_resume_refuses_settings_the_checkpoint_cannot_follow(finished, override):
    _, run = finished
    before = tree(run)
    r = cli("run", "--resume", str(run), override)
    refused(r, 2, "--resume cannot change")
    assert "train.epochs" in r.stderr  # the message lists what may change
    assert tree(run) == before


def test_resume_with_more_epochs_trains_them_for_real(finished, tmp_path):
    import shutil

    _, run = finished
    copy = tmp_path / "more"
    shutil.copytree(run, copy)
    old = json.loads((copy / "summary.json").read_text())
    r = cli("run", "--resume", str(copy), "train.epochs=3")
    assert r.returncode == 0, r.stderr
    new = json.loads((copy / "summary.json").read_text())
    assert new["epochs"] == 3 and new["steps"] == old["steps"] * 3 // 2
    assert "epochs: 3" in (copy / "config.yaml").read_text()
    steps = [x["step"] for x in map(json.loads, (copy / "metrics.jsonl").read_text().splitlines()) if x["kind"] == "train"]
    assert steps == sorted(set(steps))  # no record twice


def test_a_restart_without_checkpoint_does_not_duplicate_records(finished, tmp_path):
    import shutil

    _, run = finished
    copy = tmp_path / "nockpt"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints")
    r = cli("run", "--resume", str(copy))
    assert r.returncode == 0, r.stderr
    assert "starting this stage from the beginning" in r.stderr
    recs = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    keys = [(x["kind"], x.get("split"), x["step"]) for x in recs]
    assert len(keys) == len(set(keys))


def test_a_run_that_fails_at_start_up_leaves_no_folder(tmp_path):
    recipe = small(tmp_path)
    run = tmp_path / "never"
    refused(cli("run", str(recipe), "--run-dir", str(run), "data.name=mnist", f"data.path={tmp_path / 'nothing'}"),
            1, "does not exist")
    assert not run.exists()


def test_batchnorm_trains_when_the_last_batch_would_hold_one_example():
    from torch.utils.data import TensorDataset

    from edgetune import TrainConfig, Trainer, build_model
    from edgetune.models import ModelSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 6, generator=g)
    y = (x[:, 0] > 0).long()
    model = build_model("mlp", {"widths": [16], "batch_norm": True}, ModelSpec((6,), 2))
    tr = Trainer(model, TensorDataset(x, y), TrainConfig(epochs=2, batch_size=16, progress=False), test=TensorDataset(x, y))
    out = tr.fit()
    assert out["steps"] == 4  # 2 full batches per epoch; the 33rd example's batch of one is dropped
    plain = build_model("mlp", {"widths": [16]}, ModelSpec((6,), 2))
    assert Trainer(plain, TensorDataset(x, y), TrainConfig(epochs=2, batch_size=16, progress=False)).fit()["steps"] == 6


def test_compact_export_never_grows_the_model(tmp_path):
    """At 10% density the latency rule stores layers dense (bigger than the run's sparse model); the compact
    export picks the smaller storage per layer, so it is never larger."""
    recipe = write_recipe(tmp_path / "s.yaml", name="s", seed=0, data={"name": "digits"},
                          model={"name": "mlp", "widths": [256, 256]}, sparse={"method": "set", "density": 0.1},
                          train={"epochs": 1, "batch_size": 64, "progress": False, "num_threads": 1})
    run = tmp_path / "run"
    assert cli("run", str(recipe), "--run-dir", str(run)).returncode == 0
    r = cli("export", str(run), "--out", str(tmp_path / "small"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "small" / "export_report.json").read_text())
    assert rep["bytes_after"] <= rep["bytes_before"] and "dense" not in rep["storage"][:-1]
    r = cli("export", str(run), "--format", "sparse-fast", "--out", str(tmp_path / "fast"))
    assert r.returncode == 0, r.stderr
    fast = json.loads((tmp_path / "fast" / "export_report.json").read_text())
    assert fast["storage"][:-1] == ["dense", "dense"] and fast["bytes_after"] > rep["bytes_after"]


def test_export_of_a_damaged_model_file_names_it(finished, tmp_path):
    import shutil

    _, run = finished
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:100])
    before = tree(copy)
    refused(cli("export", str(copy), "--format", "sparse-compact"), 2, "model.safetensors cannot be read")
    assert tree(copy) == before
