"""The incremental stage step through recipes: digits 6+4 end to end (report, learner file, reload, resume) and
the CIFAR-100 recipe with the standard index lists on a fake CIFAR-format folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune import runner
from edgetune.core.errors import ConfigError
from edgetune.incremental import IncrementalLearner
from edgetune.incremental.heads import CosineHead
from edgetune.recipe import load_recipe
from edgetune.testing.fake_cifar import fake_cifar100, write_index_lists

FAST = ["train.progress=false", "train.num_threads=1"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("digits-fscil")
    cfg = load_recipe("incremental/digits-fscil", [*FAST, f"output_dir={tmp}"])
    runner.run(cfg, tmp / "run")
    return tmp / "run"


def test_digits_sessions_reach_the_protocol_figures(digits_run: Path) -> None:
    s = json.loads((digits_run / "stages" / "sessions" / "summary.json").read_text())
    assert s["sessions"] == 5 and s["classes"] == 10 and s["draws"] == 5 and s["steps"] == 0
    assert s["acc_first"] >= 0.95 and s["acc_last"] >= 0.80, s
    assert s["acc_last"] < s["acc_first"] and 0.0 < s["last_novel_acc"] < s["last_base_acc"]
    assert all(e["ok"] for e in s["expect"].values())
    base = json.loads((digits_run / "stages" / "base" / "summary.json").read_text())
    assert base["method_metrics"]["best_epoch"] >= 1
    report = (digits_run / "report.md").read_text()
    assert "stages/sessions/sessions.png" in report and "| acc_last |" in report
    assert (digits_run / "stages" / "sessions" / "sessions.png").stat().st_size > 1000


def test_saved_learner_and_reloaded_backbone_reproduce_the_last_session(digits_run: Path) -> None:
    from edgetune.data import DataConfig, load_dataset
    from edgetune.incremental import Backbone

    loaded = runner.load_run_model(digits_run / "stages" / "base")  # the cosine head is rebuilt from the recipe
    assert isinstance(loaded.model.head, CosineHead)
    learner = IncrementalLearner.load(digits_run / "stages" / "sessions" / "learner.safetensors",
                                      Backbone(loaded.model, transform=None))
    assert learner.classes == list(range(10)) and learner.base_classes == list(range(6))
    bundle = load_dataset(DataConfig(name="digits", val_fraction=0.1))
    x, y = bundle.test.tensors
    learner.backbone.transform = bundle.transform
    got = learner.evaluate((x, y))
    draws = json.loads((digits_run / "stages" / "sessions" / "sessions.json").read_text())["draws"]
    assert got["acc"] == pytest.approx(draws[0][-1]["acc"], abs=1e-9)  # the first draw's learner was saved


def test_resume_reruns_an_unfinished_incremental_stage_identically(digits_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(digits_run, copy)
    before = json.loads((copy / "stages" / "sessions" / "summary.json").read_text())
    (copy / "stages" / "sessions" / "summary.json").unlink()  # as if the process died in that stage
    (copy / "summary.json").unlink()
    runner.resume(copy)
    after = json.loads((copy / "stages" / "sessions" / "summary.json").read_text())
    for k in ("acc_first", "acc_last", "acc_avg", "last_novel_acc"):
        assert after[k] == before[k], k


def test_cifar100_recipe_with_index_lists_on_a_fake_copy(tmp_path: Path) -> None:
    y_train, _ = fake_cifar100(tmp_path / "data", per_class_train=6, per_class_test=2)
    write_index_lists(tmp_path / "lists", y_train)
    over = [*FAST, f"output_dir={tmp_path}", f"data.path={tmp_path / 'data'}", "train.device=cpu",
            "train.epochs=1", "train.batch_size=64", "train.schedule.warmup_steps=0", "model.width=0.25",
            f"stages.sessions.incremental.index_lists={tmp_path / 'lists'}", "stages.sessions.data.val_fraction=0",
            "stages.sessions.incremental.draws=1", "stages.base.expect={}", "stages.sessions.expect={}"]
    result = runner.run(load_recipe("incremental/cifar100-fscil", over), tmp_path / "run")
    s = result.summary["stages"]["sessions"]
    assert s["sessions"] == 9 and s["classes"] == 100 and s["feature_dim"] == 16
    recs = json.loads((tmp_path / "run" / "stages" / "sessions" / "sessions.json").read_text())["mean"]
    assert [r["new_classes"] for r in recs] == [60] + [5] * 8 and [r["shots"] for r in recs][1:] == [5] * 8
    # index lists with a validation hold-out in the stage: refused with the fix
    bad = [o for o in over if not o.startswith("stages.sessions.data")]
    with pytest.raises(ConfigError, match="val_fraction=0"):
        runner.run(load_recipe("incremental/cifar100-fscil", bad), tmp_path / "run2")


def test_stage_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    base = {"name": "x", "seed": 0, "output_dir": str(tmp_path), "data": {"name": "digits"},
            "model": {"name": "mlp", "widths": [16]},
            "train": {"epochs": 1, "progress": False, "num_threads": 1}}
    with pytest.raises(ConfigError, match="ways needs sessions"):
        load_recipe({**base, "stages": [{"name": "s", "step": "incremental",
                                         "incremental": {"base_classes": 6, "ways": 1}}]})
    cfg = load_recipe({**base, "stages": [
        {"name": "s", "step": "incremental", "incremental": {"base_classes": 6, "gate": "base-gate", "budget": 0.05}}]})
    with pytest.raises(ConfigError, match="val_fraction"):
        runner.run(cfg, tmp_path / "r")
