"""`edgetune merge` as a user runs it: a job file, a mergekit file, --dry-run, and a bad input's message."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from helpers_cli import cli
from safetensors.torch import load_file, save_file


def _write(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for i, name in enumerate(("base", "a", "b")):
        g = torch.Generator().manual_seed(i)
        p = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.randn(8, 4, generator=g), "b": torch.randn(8, generator=g)}, str(p))
        paths[name] = str(p)
    return paths


def test_merge_job_and_mergekit_file(tmp_path):
    p = _write(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"method": "task_arithmetic", "scaling": 0.5, "base": p["base"],
                                   "models": [p["a"], p["b"]], "output": str(tmp_path / "out")}))
    r = cli("merge", str(job), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and not (tmp_path / "out").exists()
    r = cli("merge", str(job), "scaling=0.25")
    assert r.returncode == 0, r.stderr
    assert "merged 2 model(s) with task_arithmetic" in r.stdout and "peak memory" in r.stdout
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    sd = {k: load_file(v) for k, v in p.items()}
    want = sd["base"]["w"] + 0.25 * ((sd["a"]["w"] - sd["base"]["w"]) + (sd["b"]["w"] - sd["base"]["w"]))
    torch.testing.assert_close(got["w"], want)

    mk = tmp_path / "mergekit.yml"
    mk.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": p["base"], "dtype": "bfloat16",
                                  "models": [{"model": p["a"], "parameters": {"weight": 1, "density": 0.5}},
                                             {"model": p["b"], "parameters": {"weight": 1, "density": 0.5}}]}))
    r = cli("merge", str(mk), "--out", str(tmp_path / "mk"))
    assert r.returncode == 0, r.stderr
    assert load_file(str(tmp_path / "mk" / "model.safetensors"))["w"].dtype == torch.bfloat16


def test_merge_bad_input_exits_2_with_a_message(tmp_path):
    p = _write(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"method": "ties", "models": [p["a"], p["b"]], "output": str(tmp_path / "o")}))
    r = cli("merge", str(job))
    assert r.returncode == 2
    assert "needs a base model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
