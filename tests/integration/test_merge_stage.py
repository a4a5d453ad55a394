"""The merge stage: fine-tune experts from one base, merge them, evaluate, in one recipe (digits, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgetune import runner
from edgetune.core.errors import ConfigError
from edgetune.merging import merge_state_dicts
from edgetune.recipe import load_recipe


def recipe(tmp_path: Path, merge: dict, **over) -> dict:
    r = {
        "name": "mg", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits"},
        "model": {"name": "mlp", "widths": [32]},
        "train": {"epochs": 1, "batch_size": 64, "progress": False, "num_threads": 1,
                  "optimizer": {"name": "adam", "lr": 0.01}},
        "stages": [
            {"name": "pre", "train": {"epochs": 2}},
            {"name": "a", "model": {"from": "stage:pre"}, "seed": 1},
            {"name": "b", "model": {"from": "stage:pre"}, "seed": 2, "train": {"optimizer": {"lr": 0.003}}},
            {"name": "merged", "step": "merge", "model": {"from": "stage:a"}, "merge": merge},
        ],
    }
    r.update(over)
    return r


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge-stage")
    cfg = load_recipe(recipe(tmp, {"method": "ties", "density": 0.5, "base": "stage:pre",
                                   "models": ["stage:a", "stage:b"]}))
    runner.run(cfg, tmp / "run")
    return tmp / "run"


def test_merge_stage_equals_merging_the_saved_stages(merged_run):
    st = merged_run / "stages"
    sds = {n: load_file(str(st / n / "model.safetensors")) for n in ("pre", "a", "b", "merged")}
    want = merge_state_dicts([sds["a"], sds["b"]], {"method": "ties", "density": 0.5}, base=sds["pre"])
    for k, v in want.items():
        assert torch.equal(sds["merged"][k], v), k
    s = json.loads((st / "merged" / "summary.json").read_text())
    assert s["merge_method"] == "ties" and s["merge_models"] == ["stage:a", "stage:b"] and s["steps"] == 0
    accs = {n: json.loads((st / n / "summary.json").read_text())["test_acc"] for n in ("pre", "a", "b", "merged")}
    # two fine-tunes of one base on the same task: their TIES merge works as well as the base, not like noise
    assert accs["merged"] > 0.8 and accs["merged"] >= accs["pre"] - 0.05, accs
    assert "## Stage merged" in (merged_run / "report.md").read_text()
    # the stage's saved config (the merge section written back flat) reloads, and so does its model
    loaded = runner.load_run_model(st / "merged")
    assert loaded.cfg.merge.method.density == 0.5
    assert all(torch.equal(v, sds["merged"][k]) for k, v in loaded.model.state_dict().items())


def test_keep_takes_tensors_from_the_stage_model(tmp_path):
    cfg = load_recipe(recipe(tmp_path, {"method": "linear", "models": ["stage:a", "stage:b"], "keep": ["head"]}))
    runner.run(cfg, tmp_path / "run")
    st = tmp_path / "run" / "stages"
    a, b, m = (load_file(str(st / n / "model.safetensors")) for n in ("a", "b", "merged"))
    head = [k for k in m if k not in ("net.0.weight", "net.0.bias")]
    heads = [k for k in head if torch.equal(m[k], a[k])]
    assert heads, "the head is a's"
    body = [k for k in m if k not in heads]
    assert body and all(torch.allclose(m[k], (a[k] + b[k]) / 2) for k in body)


@pytest.mark.parametrize(("merge", "match"), [
    ({"method": "ties", "models": ["stage:a", "stage:b"]}, "needs a base model"),
    ({"method": "linear", "models": ["stage:a", "stage:zz"]}, "names no earlier stage"),
    ({"method": "linear", "models": ["stage:a"], "keep": ["nothing*"]}, "matches no tensor"),
    ({"method": "linear", "models": ["stage:a"], "densty": 0.2}, "densty"),
])
def test_bad_merge_sections(tmp_path, merge, match):
    with pytest.raises(ConfigError, match=match):
        runner.run(load_recipe(recipe(tmp_path, merge)), tmp_path / "run")


def test_edgetune_merge_of_run_folders_gives_a_loadable_model_folder(merged_run, tmp_path):
    """`edgetune merge` on stage folders writes a folder that loads like the stages (config.yaml, model.json)."""
    from edgetune.merging import load_job, run_merge

    st = merged_run / "stages"
    job = load_job({"method": "ties", "density": 0.5, "base": str(st / "pre"),
                    "models": [str(st / "a"), str(st / "b")], "output": str(tmp_path / "merged")})
    run_merge(job)
    loaded = runner.load_run_model(tmp_path / "merged")
    want = load_file(str(st / "merged" / "model.safetensors"))  # the merge stage did the same merge
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["copied"] == ["config.yaml", "model.json"]


def test_data_aware_merges_run_on_the_stage_data(tmp_path):
    """Fisher, RegMean, AdaMerging and safety as merge stages: they read the stage's (transformed) training split;
    the merged models are real (between and near the fine-tunes), and safety needs its must-keep reference."""
    r = recipe(tmp_path, {"method": "linear", "models": ["stage:a", "stage:b"]})
    r["data"]["val_fraction"] = 0.1
    two = {"models": ["stage:a", "stage:b"], "base": "stage:pre"}
    r["stages"][3:] = [
        {"name": "fisher", "step": "merge", "model": {"from": "stage:a"},
         "merge": {"method": "fisher", "models": two["models"], "n_batches": 4}},
        {"name": "regmean", "step": "merge", "model": {"from": "stage:a"},
         "merge": {"method": "regmean", "models": two["models"], "n_batches": 4}},
        {"name": "ada", "step": "merge", "model": {"from": "stage:a"},
         "merge": {"method": "adamerging", **two, "steps": 10, "n_batches": 2}},
        {"name": "safety", "step": "merge", "model": {"from": "stage:a"},
         "merge": {"method": "safety", **two, "must_keep_from": "stage:pre", "steps": 10, "n_batches": 2}},
    ]
    runner.run(load_recipe(r), tmp_path / "run")
    st = tmp_path / "run" / "stages"
    accs = {n: json.loads((st / n / "summary.json").read_text())["test_acc"] for n in
            ("pre", "a", "b", "fisher", "regmean", "ada", "safety")}
    for n in ("fisher", "regmean", "ada", "safety"):
        assert accs[n] > min(accs["a"], accs["b"]) - 0.1, accs
    with pytest.raises(ConfigError, match="must_keep_from"):
        runner.run(load_recipe(recipe(tmp_path, {"method": "safety", **two})), tmp_path / "run2")
    assert not (tmp_path / "run2").exists()  # refused when the stages are read, before any training


def test_two_task_recipe_merges_backbones_and_keeps_each_head(tmp_path):
    """merging/mlp-two-tasks-merge at tiny sizes: both tasks see the same merged backbone, each with its own head."""
    cfg = load_recipe("merging/mlp-two-tasks-merge", [f"output_dir={tmp_path}", "train.max_steps=20", "train.schedule.warmup_steps=2",
                                                      "train.progress=false", "train.num_threads=1",
                                                      "data.limit_train=1024", "data.limit_test=256"])
    res = runner.run(cfg, tmp_path / "run", command="test")
    st = tmp_path / "run" / "stages"
    assert res.summary["order"][:3] == ["pre", "fmnist", "glyphs"] and len(res.summary["order"]) == 11
    f, g = (load_file(str(st / n / "model.safetensors")) for n in ("ties-fmnist", "ties-glyphs"))
    heads = {k for k in f if k.startswith("head.")}
    assert heads and all(torch.equal(f[k], g[k]) for k in f if k not in heads)  # one merged backbone
    assert f["head.weight"].shape[0] == 10 and g["head.weight"].shape[0] == 20  # each task its own head
    fm = load_file(str(st / "fmnist" / "model.safetensors"))
    assert all(torch.equal(f[k], fm[k]) for k in heads)
