"""Sparse training from the command line: a run, its export, and identical masks across DDP ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers_cli import cli, env, write_recipe


def recipe(tmp_path, method="chts", **sparse):
    return write_recipe(
        tmp_path / f"{method}.yaml", name="sp", seed=0, output_dir=str(tmp_path / "runs"),
        data={"name": "digits"}, model={"name": "mlp", "widths": [128, 128]},
        train={"epochs": 6, "batch_size": 32, "progress": False, "num_threads": 1,
               "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        sparse={"method": method, "density": 0.05, **sparse},
    )


def test_run_report_and_export(tmp_path):
    r = cli("run", str(recipe(tmp_path)), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "run" / "report.md").read_text()
    assert "sparse_active_neurons" in report and "sparse_density" in report
    e = cli("export", str(tmp_path / "run"))
    assert e.returncode == 0, e.stderr
    rep = json.loads((tmp_path / "run" / "export" / "export_report.json").read_text())
    assert rep["test_acc_after"] == pytest.approx(rep["test_acc_before"], abs=1e-9)
    assert rep["bytes_after"] <= rep["bytes_before"] * 1.01
    # every neuron the run counted as active survives compaction, and only those
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    active = summary["method_metrics"]["sparse_active_neurons"]
    assert rep["compacted"] and rep["widths_before"] == [128, 128]
    assert sum(rep["widths_after"]) == round(active * 256)


def test_bad_sparse_inputs_exit_2(tmp_path):
    r = recipe(tmp_path)
    for args, needle in ((("sparse.density=1.5",), "sparse.density"),
                         (("sparse.density=0.0005",), "too small"),
                         (("sparse.method=rigll",), 'Did you mean "rigl"'),
                         (("sparse.regrowth=magic",), "sparse.regrowth")):
        p = cli("run", str(r), *args)
        assert p.returncode == 2, (args, p.stderr)
        assert needle in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("method", ["chts", "rigl"])
def test_ddp_ranks_take_identical_topology_decisions(tmp_path, method):
    r = recipe(tmp_path, method, update_interval=5, update_unit="steps")
    run_dir = tmp_path / "run"
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc-per-node", "2", "-m", "edgetune.cli.main", "run", str(r), "--run-dir", str(run_dir),
        "train.epochs=2"]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check = next(x for x in recs if x["kind"] == "ddp_check")
    assert check["in_sync"], "ranks hold different weights or masks"  # the checksum covers every mask's indices
    updates = [x for x in recs if x["kind"] == "method"][-1]["sparse_updates"]
    assert updates >= 3
