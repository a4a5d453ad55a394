"""The CLI as a user meets it: exit codes, messages without tracebacks, a run folder with a report."""

from __future__ import annotations

import json

from helpers_cli import cli, write_recipe


def digits_recipe(tmp_path, **train):
    return write_recipe(
        tmp_path / "r.yaml", name="t", seed=0, output_dir=str(tmp_path / "runs"),
        data={"name": "digits"}, model={"name": "mlp", "widths": [64]},
        train={"epochs": 10, "batch_size": 64, "progress": False, "optimizer": {"name": "adam", "lr": 0.003},
               **train},
        expect={"min_test_acc": 0.85},
    )


def test_run_writes_report_and_reaches_accuracy(tmp_path):
    r = cli("run", str(digits_recipe(tmp_path)), "--run-dir", str(tmp_path / "run"), "--check")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_acc"] >= 0.85 and summary["expect"]["min_test_acc"]["ok"]
    report = (run / "report.md").read_text()
    assert "test accuracy" in report and "loss.png" in report and "seed: 0" in report
    assert (run / "loss.png").stat().st_size > 1000 and (run / "accuracy.png").stat().st_size > 1000
    for f in ("config.yaml", "metrics.jsonl", "model.safetensors"):
        assert (run / f).is_file()
    assert "report:" in r.stdout
    r2 = cli("report", str(run))
    assert r2.returncode == 0 and (run / "report.md").is_file()


def test_overrides_apply(tmp_path):
    r = cli("run", str(digits_recipe(tmp_path)), "train.epochs=1", "train.max_steps=3",
            "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


def test_config_errors_exit_2_with_message_and_no_traceback(tmp_path):
    recipe = str(digits_recipe(tmp_path))
    cases = [
        (("run", recipe, "train.epohcs=2"), 'Did you mean "epochs"'),
        (("run", recipe, "train.batch_size=-1"), "train.batch_size"),
        (("run", recipe, "model.widht=[3]"), 'Did you mean "widths"'),
        (("run", recipe, "data.name=fashion-mnst"), 'Did you mean "fashion-mnist"'),
        (("validate", str(tmp_path / "missing.yaml")), "does not exist"),
        (("run", "no/such/recipe"), "no recipe file"),
        (("run", recipe, "train.device=cuda:0"), "cuda"),
    ]
    for args, needle in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_runtime_failure_exits_1_without_traceback(tmp_path):
    r = cli("report", str(tmp_path))  # not a run folder -> config error 2
    assert r.returncode == 2 and "Traceback" not in r.stderr
    recipe = write_recipe(tmp_path / "m.yaml", name="m", output_dir=str(tmp_path / "runs"),
                          data={"name": "mnist", "path": str(tmp_path / "nowhere")}, model={"name": "mlp"},
                          train={"epochs": 1, "progress": False})
    r = cli("run", str(recipe))
    assert r.returncode == 1, r.stderr
    assert "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_ls_and_validate_shipped(tmp_path):
    for what, needle in (("models", "mlp"), ("datasets", "fashion-mnist"), ("recipes", "foundation/default")):
        r = cli("ls", what)
        assert r.returncode == 0 and needle in r.stdout, (what, r.stdout, r.stderr)
    r = cli("validate", "foundation/default", "foundation/digits-mlp")
    assert r.returncode == 0 and r.stdout.count(": ok") == 2
