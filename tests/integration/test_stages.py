"""Multi-stage recipes on digits: a folder per stage, one comparing report, stage inputs, resume, section order."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from helpers_cli import cli, write_recipe
from safetensors.torch import load_file

from edgetune import runner
from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback, TrainState
from edgetune.core.sections import SECTIONS, register_section
from edgetune.recipe import load_recipe

# ------------------------------------------------------------------------------- test-only sections
APPLIED: list[str] = []
ARMED = {"on": False}


class _TagCfg(Config):
    tag: str = ""


class _BombCfg(Config):
    at_step: int = 15


class _Bomb(Callback):
    """Raises at a global step while ARMED (simulates a crash mid-stage)."""

    name = "zz-stages-bomb"

    def __init__(self, at: int) -> None:
        self.at = at

    def after_optimizer_step(self, s: TrainState) -> None:
        if ARMED["on"] and s.step == self.at:
            raise RuntimeError("simulated crash in a stage")


if "zz_stages_first" not in SECTIONS:
    @register_section("zz_stages_first", config=_TagCfg, summary="test only: records that it applied")
    def _first(model, cfg, ctx):
        APPLIED.append("zz_stages_first")
        return []

    @register_section("zz_stages_second", config=_TagCfg, summary="test only: records that it applied")
    def _second(model, cfg, ctx):
        APPLIED.append("zz_stages_second")
        return []

    @register_section("zz_stages_bomb", config=_BombCfg, summary="test only: crashes mid-training when armed")
    def _bomb(model, cfg, ctx):
        return [_Bomb(cfg.at_step)]


def staged(tmp_path: Path, **over) -> dict:
    r = {
        "name": "st", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits"},
        "model": {"name": "mlp", "widths": [64]},
        "train": {"epochs": 2, "batch_size": 64, "progress": False, "num_threads": 1,
                  "optimizer": {"name": "adam", "lr": 0.01}, "checkpoint": {"every_steps": 10, "keep_last": 3}},
        "stages": [
            {"name": "base"},
            {"name": "sparse", "model": {"from": "stage:base"}, "sparse": {"method": "set", "density": 0.3},
             "train": {"epochs": 2, "optimizer": {"lr": 0.003}}},
            {"name": "eval", "model": {"from": "stage:base"}, "step": "evaluate"},
        ],
    }
    r.update(over)
    return r


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    res = runner.run(load_recipe(staged(tmp)), tmp / "run")
    return tmp / "run", res


def test_each_stage_is_a_complete_run_folder(three_stages):
    run, res = three_stages
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["base", "eval", "sparse"]
    for name in ("base", "sparse", "eval"):
        d = run / "stages" / name
        for f in ("config.yaml", "command.txt", "summary.json", "model.safetensors", "model.json"):
            assert (d / f).is_file(), (name, f)
        s = json.loads((d / "summary.json").read_text())
        assert s["stage"] == name
        # each stage folder reloads on its own
        loaded = runner.load_run_model(d)
        saved = load_file(str(d / "model.safetensors"))
        assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())
    for name in ("base", "sparse"):  # training stages keep their metrics and checkpoints
        assert (run / "stages" / name / "metrics.jsonl").is_file()
        assert list((run / "stages" / name / "checkpoints").glob("step-*.json"))
    assert json.loads((run / "stages" / "eval" / "summary.json").read_text())["steps"] == 0
    top = json.loads((run / "summary.json").read_text())
    assert top["order"] == ["base", "sparse", "eval"] and set(top["stages"]) == {"base", "sparse", "eval"}
    assert res.summary["order"] == top["order"]
    assert (run / "config.yaml").is_file() and "stages" in yaml.safe_load((run / "config.yaml").read_text())


def test_report_compares_the_stages(three_stages):
    run, _ = three_stages
    report = (run / "report.md").read_text()
    assert "## Stages compared" in report
    table = report.split("## Stages compared", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["base", "sparse", "eval"]
    top = json.loads((run / "summary.json").read_text())
    assert f"{top['stages']['base']['test_acc']:.4f}" in rows[1]
    for name in ("base", "sparse", "eval"):
        assert f"## Stage {name}" in report
    assert "stages/base/loss.png" in report and (run / "stages" / "base" / "loss.png").is_file()


def test_evaluate_stage_measures_base_and_sparse_did_not_touch_it(three_stages):
    run, _ = three_stages
    s = {n: json.loads((run / "stages" / n / "summary.json").read_text()) for n in ("base", "sparse", "eval")}
    assert s["eval"]["test_acc"] == s["base"]["test_acc"]
    assert s["eval"]["test_loss"] == pytest.approx(s["base"]["test_loss"])
    base_w = load_file(str(run / "stages" / "base" / "model.safetensors"))
    eval_w = load_file(str(run / "stages" / "eval" / "model.safetensors"))
    assert base_w.keys() == eval_w.keys() and all(torch.equal(base_w[k], eval_w[k]) for k in base_w)
    # base and eval are dense; only the sparse stage is sparse
    assert s["base"]["nonzeros"] == s["base"]["parameters"]
    assert s["eval"]["nonzeros"] == s["eval"]["parameters"]
    assert s["sparse"]["nonzeros"] < 0.6 * s["base"]["nonzeros"]
    for n in ("base", "eval"):
        assert yaml.safe_load((run / "stages" / n / "config.yaml").read_text()).get("sparse") is None
    assert yaml.safe_load((run / "stages" / "sparse" / "config.yaml").read_text())["sparse"]["density"] == 0.3
    assert s["sparse"]["model_source"] == "stage base" and s["eval"]["model_source"] == "stage base"


# ------------------------------------------------------------------------------------ bad stage inputs
BAD = [
    ([{"name": "a", "model": {"from": "stage:nope"}}], "names no stage"),
    ([{"name": "a", "model": {"from": "stage:b"}}, {"name": "b"}], "a later stage"),
    ([{"name": "a"}, {"name": "b", "model": {"from": "stage:b"}}], "from itself"),
    ([{"name": "a"}, {"name": "a"}], "two stages are named"),
    ([{"name": "a"}, {"train": {"epochs": 1}}], "needs a name"),
    ([{"name": "a"}, {"name": "b", "step": "fly"}], "fly"),
]


@pytest.fixture
def restore_logging():
    lg = logging.getLogger("edgetune")
    saved = (list(lg.handlers), lg.level, lg.propagate)
    yield
    lg.handlers[:], lg.level, lg.propagate = saved[0], saved[1], saved[2]


@pytest.mark.parametrize(("stages", "needle"), BAD)
def test_bad_stage_inputs_are_config_errors(tmp_path, stages, needle, capsys, restore_logging):
    from edgetune.cli.main import main

    with pytest.raises(ConfigError, match=needle):
        load_recipe(staged(tmp_path, stages=stages))
    path = write_recipe(tmp_path / "bad.yaml", **staged(tmp_path, stages=stages))
    assert main(["-q", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_bad_stage_input_exits_2_from_edgetune_run(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", **staged(tmp_path, stages=BAD[1][0]))
    r = cli("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert "a later stage" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- resume
# crash after stage 2's checkpoint at step 10, or before it wrote any (the stage then restarts from its start)
@pytest.mark.parametrize("crash_at", [
    15,
    5,
])
def test_resume_keeps_finished_stages_byte_identical_and_finishes_the_interrupted_one(tmp_path, crash_at):
    two = [staged(tmp_path)["stages"][0],
           {**staged(tmp_path)["stages"][1], "zz_stages_bomb": {"at_step": crash_at}}]
    recipe = staged(tmp_path, stages=two, model={"name": "mlp", "widths": [64], "dropout": 0.2})
    ref = runner.run(load_recipe(recipe), tmp_path / "ref", write_report=False)  # uninterrupted (unarmed)
    run = tmp_path / "run"
    ARMED["on"] = True
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            runner.run(load_recipe(recipe), run, write_report=False)
    finally:
        ARMED["on"] = False
    base = run / "stages" / "base"
    assert (base / "summary.json").is_file() and not (run / "stages" / "sparse" / "summary.json").exists()
    assert bool(list((run / "stages" / "sparse" / "checkpoints").glob("step-000000010.json"))) == (crash_at > 10)
    before = tree_hash(base)
    res = runner.resume(run)
    after = tree_hash(base)
    assert {k: after[k] for k in before} == before  # the finished stage's files are kept as they are
    assert all(k.endswith(".png") for k in set(after) - set(before))  # the report adds its plots only
    assert (run / "stages" / "sparse" / "summary.json").is_file()
    assert set(res.summary["stages"]) == {"base", "sparse"}
    # the resumed stage ends exactly where the uninterrupted one did
    a = load_file(str(tmp_path / "ref" / "stages" / "sparse" / "model.safetensors"))
    b = load_file(str(run / "stages" / "sparse" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.summary["stages"]["sparse"]["test_acc"] == ref.summary["stages"]["sparse"]["test_acc"]
    assert res.summary["stages"]["sparse"]["steps"] == ref.summary["stages"]["sparse"]["steps"]
    steps = [json.loads(x)["step"] for x in (run / "stages" / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


# ------------------------------------------------------------------------------------- section order
def _single(tmp_path, order: list[str]) -> dict:
    r = {"name": "o", "seed": 0, "output_dir": str(tmp_path / "runs"), "data": {"name": "digits"},
         "model": {"name": "mlp", "widths": [16]}, "step": "evaluate",
         "train": {"epochs": 1, "progress": False}}
    for n in order:
        r[n] = {"tag": n}
    return r


@pytest.mark.parametrize("order", [["zz_stages_first", "zz_stages_second"], ["zz_stages_second", "zz_stages_first"]])
def test_sections_apply_in_the_order_the_recipe_writes_them(tmp_path, order):
    path = write_recipe(tmp_path / "r.yaml", **_single(tmp_path, order))
    cfg = load_recipe(str(path))
    assert [n for n in cfg.section_names() if n.startswith("zz_")] == order
    APPLIED.clear()
    runner.run(cfg, tmp_path / "run", write_report=False)
    assert APPLIED == order
    # the run folder's recipe keeps the order, so reloading the run applies them alike
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert [k for k, v in saved.items() if k.startswith("zz_") and v is not None] == order
    APPLIED.clear()
    runner.load_run_model(tmp_path / "run")
    assert APPLIED == order
    # a stage's own sections too
    APPLIED.clear()
    st = {**_single(tmp_path, []), "stages": [{"name": "s", **{n: {"tag": n} for n in order}}]}
    runner.run(load_recipe(st), tmp_path / "staged", write_report=False)
    assert APPLIED == order
