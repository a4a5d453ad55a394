"""Run folders you can trust (items 7, 8, 10): bad input is a one-paragraph message with exit 2, never a
traceback, and never touches an existing run folder; `validate` catches what `run` would reject; progress
is a log line off a terminal and `-q` silences it.

Most cases call ``main()`` in-process (a subprocess costs ~4 s of imports each); the few that need a real
process (a non-terminal stderr, the entry point) use ``helpers_cli.cli``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from helpers_cli import cli, write_recipe

from edgetune.cli.main import main
from edgetune.core.config import load_yaml, parse_override, writable_dir_problem
from edgetune.core.errors import ConfigError
from edgetune.recipe import load_recipe
from edgetune.train.config import TrainConfig
from edgetune.train.progress import LogProgress, progress


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures the 'edgetune' logger; give the next test the logger it had."""
    root = logging.getLogger("edgetune")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def edgetune(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def recipe(tmp_path: Path, name: str = "r.yaml", **train) -> Path:
    return write_recipe(
        tmp_path / name, name="t", seed=0, output_dir=str(tmp_path / "runs"), data={"name": "digits"},
        model={"name": "mlp", "widths": [16]},
        train={"epochs": 1, "batch_size": 64, "progress": False, **train},
    )


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def fake_run(tmp_path: Path, summary: bytes) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: t\n")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    (run / "summary.json").write_bytes(summary)
    return run


def assert_user_error(rc: int, err: str, needle: str, code: int = 2) -> None:
    assert rc == code, (rc, err)
    assert needle in err, err
    assert "Traceback" not in err, err
    assert err.startswith("edgetune: error: ") and err.count("\n") == 1, err  # one paragraph


# ---------------------------------------------------------------------------- 7: unreadable input
@pytest.mark.parametrize(("content", "needle"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
    (b"name: caf\xe9\ntrain: {epochs: 1}\n", "is not UTF-8 text (byte 0xe9 on line 1)"),
    (b"", "is empty"),
    (b"# only a comment\n\n", "is empty"),
    (b"- a\n- b\n", "mapping of keys to values"),
    (b"train:\n  epochs: [1\n", "is not valid YAML at line"),
])
def test_unreadable_recipe_files_exit_2_naming_the_file(tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    rc, _, err = edgetune(capsys, "validate", str(bad))
    assert_user_error(rc, err, needle)
    assert str(bad) in err


def test_a_folder_given_as_recipe_is_named(tmp_path, capsys):
    (tmp_path / "d.yaml").mkdir()
    rc, _, err = edgetune(capsys, "validate", str(tmp_path / "d.yaml"))
    assert_user_error(rc, err, "is a folder, not a recipe file")


@pytest.mark.parametrize(("summary", "needle"), [
    (b'{"test_acc": 0.9,', "is corrupt: not valid JSON (line 1"),
    (b"\xff\xfe\x00garbage", "is corrupt: not valid JSON"),
    (b"[1, 2, 3]", "holds a JSON list, not the object"),
    (b'"done"', "holds a JSON str"),
    (b'{"stages": [1]}', "'stages' must be a JSON object"),
])
def test_report_on_a_corrupt_summary_exits_2_and_leaves_the_folder_alone(tmp_path, capsys, summary, needle):
    run = fake_run(tmp_path, summary)
    before = tree_hash(run)
    rc, _, err = edgetune(capsys, "report", str(run))
    assert_user_error(rc, err, needle)
    assert str(run / "summary.json") in err and "--resume" in err
    assert tree_hash(run) == before


def test_report_on_a_file_is_a_user_error(tmp_path, capsys):
    f = tmp_path / "summary.json"
    f.write_text("{}")
    rc, _, err = edgetune(capsys, "report", str(f))
    assert_user_error(rc, err, "is not a folder")


def test_output_dir_under_a_file_exits_2_and_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file in the way")
    r = recipe(tmp_path)
    before = tree_hash(tmp_path)
    rc, _, err = edgetune(capsys, "run", str(r), f"output_dir={blocker}/runs")
    assert rc == 2 and "Traceback" not in err, err
    assert str(blocker) in err
    assert tree_hash(tmp_path) == before
    assert writable_dir_problem(blocker / "runs") and "is a file, not a folder" in writable_dir_problem(blocker / "x")


def test_report_that_cannot_be_written_names_the_file(tmp_path, capsys):
    run = fake_run(tmp_path, json.dumps({"test_acc": 0.5, "steps": 1}).encode())
    (run / "report.md").mkdir()  # something in the way of report.md
    before = tree_hash(run)
    rc, _, err = edgetune(capsys, "report", str(run))
    assert rc == 2 and "Traceback" not in err and "runtime failure" not in err, err
    assert f"{run / 'report.md'} is a folder where a file was expected" in err
    assert {k: v for k, v in tree_hash(run).items() if not k.endswith(".png")} == before


def test_permission_denied_is_a_paragraph_with_the_fix(tmp_path, capsys, monkeypatch):
    run = fake_run(tmp_path, json.dumps({"test_acc": 0.5}).encode())

    def denied(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("edgetune.report.atomic_write_bytes", denied)
    rc, _, err = edgetune(capsys, "report", str(run))
    assert_user_error(rc, err, f"cannot access {run / 'report.md'}: Permission denied")
    assert "--run-dir" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_reported_before_writing(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "is not writable" in writable_dir_problem(ro / "runs")
    finally:
        ro.chmod(0o755)


def test_writable_dir_problem_accepts_new_folders(tmp_path):
    assert writable_dir_problem(tmp_path / "a" / "b") is None
    assert writable_dir_problem(tmp_path) is None


# ---------------------------------------------------------------------------- 8: validation gaps
@pytest.mark.parametrize(("overrides", "needle"), [
    (["model.widths=[]"], "model.widths: give at least one hidden layer size"),
    (["train.max_steps=5", "train.schedule.warmup_steps=5"], "schedule.warmup_steps=5 is not below the run's 5"),
    (["train.lr=0.1"], 'unknown key \'train.lr\'. Did you mean "train.optimizer.lr"?'),
    (["train.warmup_steps=3"], 'Did you mean "train.schedule.warmup_steps"?'),
    (["lr=0.1"], 'Did you mean "train.optimizer.lr"?'),
    (["train.epohcs=2"], 'Did you mean "epochs"?'),  # a close sibling still wins over other sections
    (["data.name=off"], "unknown dataset 'off'"),  # a string, not False
    (["model.widths={a: 1, a: 2}"], "'a' is written twice"),
])
def test_validate_rejects_what_run_would(tmp_path, capsys, overrides, needle):
    rc, _, err = edgetune(capsys, "validate", str(recipe(tmp_path)), *[f"--set={o}" for o in overrides])
    assert_user_error(rc, err, needle)
    rc, _, err = edgetune(capsys, "run", str(recipe(tmp_path)), *overrides)  # run says the same, writes nothing
    assert_user_error(rc, err, needle)
    assert not (tmp_path / "runs").exists()


def test_the_warmup_message_is_the_same_at_run_start():
    cfg = TrainConfig(epochs=2, schedule={"warmup_steps": 40})
    with pytest.raises(ConfigError, match=r"train.schedule.warmup_steps=40 is not below the run's 30 optimizer steps "
                                          r"\(epochs=2 x 15 steps per epoch at batch_size=128\)"):
        cfg.check_total_steps(30, steps_per_epoch=15)
    cfg.check_total_steps(41, steps_per_epoch=21)  # warm-up ends before the run does
    TrainConfig(max_steps=10, schedule={"warmup_steps": 9}).check_total_steps(10)


def test_duplicate_yaml_keys_name_the_key_and_lines(tmp_path, capsys):
    r = tmp_path / "dup.yaml"
    r.write_text("name: t\ntrain:\n  epochs: 1\n  batch_size: 8\n  epochs: 3\ndata: {name: digits}\n")
    rc, _, err = edgetune(capsys, "validate", str(r))
    assert_user_error(rc, err, "key 'epochs' is written twice (lines 3 and 5)")
    assert str(r) in err


def test_yes_no_on_off_stay_strings_and_booleans_still_read_them(tmp_path):
    r = tmp_path / "b.yaml"
    r.write_text("name: no\ndata: {name: digits}\nmodel: {name: mlp, widths: [8]}\n"
                 "train: {amp: on, progress: no, epochs: 1, optimizer: {lr: 1e-3}}\n")
    assert load_yaml(r)["name"] == "no" and load_yaml(r)["train"]["optimizer"]["lr"] == 0.001
    cfg = load_recipe(str(r))
    assert cfg.name == "no" and cfg.train.amp is True and cfg.train.progress is False
    assert load_recipe(str(r), ["name=off"]).name == "off"
    assert parse_override("name=yes") == (["name"], "yes")
    assert parse_override("train.amp=true") == (["train", "amp"], True)
    assert parse_override("train.optimizer.lr=1e-3") == (["train", "optimizer", "lr"], 0.001)
    assert parse_override("description=nan") == (["description"], "nan")


def test_explicit_empty_mapping_means_defaults(tmp_path):
    r = tmp_path / "e.yaml"
    r.write_text("{}\n")
    assert load_yaml(r) == {}


def test_validate_checks_every_recipe_and_reports_each_failure(tmp_path, capsys):
    good = recipe(tmp_path, "good.yaml")
    bad1 = recipe(tmp_path, "bad1.yaml", lr=0.1)
    bad2 = tmp_path / "bad2.yaml"
    bad2.write_text("")
    rc, out, err = edgetune(capsys, "validate", str(bad1), str(good), str(bad2))
    assert rc == 2 and "Traceback" not in err
    assert f"{good}: ok" in out
    assert str(bad1) in err and "train.optimizer.lr" in err and str(bad2) in err and "is empty" in err


# ---------------------------------------------------------------------------- 10: progress and -q/-v
def test_progress_off_a_terminal_logs_about_every_tenth(caplog):
    caplog.set_level(logging.INFO, logger="edgetune.train")
    bar = progress(total=95, initial=0, desc="train", enabled=True)
    assert isinstance(bar, LogProgress)
    for i in range(95):
        bar.update(1)
        if i == 50:
            bar.set_postfix({"loss": "0.1234"})
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "edgetune.train"]
    assert 9 <= len(lines) <= 11, lines
    assert lines[-1].startswith("train: 95/95 steps (100%)") and "loss 0.1234" in lines[-1]
    assert "\r" not in "".join(lines)


def test_progress_resumed_midway_and_closed_early(caplog):
    caplog.set_level(logging.INFO, logger="edgetune.train")
    bar = progress(total=100, initial=40, desc="train s1")
    for _ in range(25):
        bar.update(1)
    bar.close()
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [m.split(" steps")[0] for m in lines] == ["train s1: 50/100", "train s1: 60/100", "train s1: 65/100"]


def test_progress_disabled_quiet_or_terminal(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="edgetune.train")
    off = progress(total=10, enabled=False)
    off.update(10)
    off.set_postfix({"loss": 1})
    off.close()
    assert not caplog.records
    logging.getLogger("edgetune").setLevel(logging.WARNING)  # what -q sets
    logging.getLogger("edgetune.train").setLevel(logging.NOTSET)
    assert not isinstance(progress(total=10), LogProgress)

    class Tty:
        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> int:
            return len(s)

        def flush(self) -> None:
            pass

    logging.getLogger("edgetune").setLevel(logging.INFO)
    monkeypatch.setattr("sys.stderr", Tty())
    bar = progress(total=10, desc="train")
    assert type(bar).__module__.startswith("tqdm")
    bar.update(3)
    bar.set_postfix({"loss": "0.5"})
    bar.close()


@pytest.mark.parametrize(("args", "level"), [
    (["-q", "validate", "R"], logging.WARNING),
    (["validate", "R", "-q"], logging.WARNING),
    (["validate", "-v", "R"], logging.DEBUG),
    (["-v", "validate", "R", "-v"], logging.DEBUG),
    (["validate", "R"], logging.INFO),
])
def test_verbosity_flags_work_before_and_after_the_command(tmp_path, capsys, args, level):
    r = str(recipe(tmp_path))
    rc, out, _ = edgetune(capsys, *[r if a == "R" else a for a in args])
    assert rc == 0 and f"{r}: ok" in out
    assert logging.getLogger("edgetune").level == level


def test_version(capsys):
    from edgetune import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"edgetune {__version__}"


def test_entry_point_quiet_after_command_and_version(tmp_path):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgetune ")
    r = cli("validate", str(recipe(tmp_path)), "-q", "--set=train.lr=1")
    assert_user_error(r.returncode, r.stderr, 'Did you mean "train.optimizer.lr"?')


def test_run_off_a_terminal_logs_progress_lines_and_q_silences_them(tmp_path):
    r = recipe(tmp_path, progress=True, max_steps=12, log_every_steps=100)
    loud = cli("run", str(r), "--run-dir", str(tmp_path / "a"))
    assert loud.returncode == 0, loud.stderr
    assert "\r" not in loud.stderr and "train: 12/12 steps (100%)" in loud.stderr
    quiet = cli("run", str(r), "--run-dir", str(tmp_path / "b"), "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert "steps (" not in quiet.stderr and "dataset" not in quiet.stderr


def test_warmup_longer_than_the_epochs_fails_at_run_start(tmp_path, capsys):
    r = recipe(tmp_path, schedule={"warmup_steps": 100})  # digits: 899 examples / 64 = 15 steps per epoch
    rc, _, err = edgetune(capsys, "validate", str(r))
    assert rc == 0  # the data size is not known yet
    rc, _, err = edgetune(capsys, "run", str(r), "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and "Traceback" not in err, err
    assert ("edgetune: error: train.schedule.warmup_steps=100 is not below the run's 15 optimizer steps "
            "(epochs=1 x 15 steps per epoch at batch_size=64)") in err
