"""Run folders you can trust, from the command line: a data location the user gave is used or refused (never
swapped for another location or for data.fallback), the fallback is used only for a dataset not installed at
all and then said so in the report, an edited checkpoint is not resumed; each refusal exits 1 with a message
naming the file and the fix, no traceback, and leaves every earlier result as it was."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import cli, write_recipe

from edgetune.data.idx import write_idx
from edgetune.data.locate import SYSTEM_ROOTS


def _recipe(tmp_path: Path, data: dict) -> Path:
    return write_recipe(
        tmp_path / "r.yaml", name="t", seed=0, output_dir=str(tmp_path / "runs"), data=data,
        model={"name": "mlp", "widths": [16]},
        train={"epochs": 1, "max_steps": 6, "batch_size": 32, "progress": False, "num_threads": 1,
               "optimizer": {"name": "sgd", "lr": 0.1}, "checkpoint": {"every_steps": 2, "keep_last": 5}},
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$EDGETUNE_DATA and the per-user data root point at empty temp folders (the CLI inherits them)."""
    env = tmp_path / "data"
    env.mkdir()
    monkeypatch.setenv("EDGETUNE_DATA", str(env))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return env


@pytest.fixture(scope="module")
def _finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("earlier")
    r = cli("run", str(_recipe(tmp, {"name": "digits"})), "--run-dir", str(tmp / "run"))
    assert r.returncode == 0, r.stderr
    return tmp / "run"


@pytest.fixture
def earlier(tmp_path: Path, data_env: Path, _finished: Path) -> Path:
    """A finished run with checkpoints (the earlier result that a refused command must leave as it was)."""
    return Path(shutil.copytree(_finished, tmp_path / "earlier"))


def _refused(tmp_path: Path, earlier: Path, data: dict, *phrases: str) -> str:
    before = _snapshot(earlier)
    r = cli("run", str(_recipe(tmp_path, data)), "--run-dir", str(tmp_path / "new"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("edgetune: error: ")
    for phrase in phrases:
        assert phrase in r.stderr, (phrase, r.stderr)
    assert _snapshot(earlier) == before
    assert not (tmp_path / "new").exists()  # failed at start-up: nothing left behind
    return r.stderr


def _write_fmnist(folder: Path, n_train: int = 40, n_test: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_a_data_path_that_does_not_exist_is_refused_not_replaced(tmp_path: Path, earlier: Path) -> None:
    typo = tmp_path / "fashoin-mnist"
    _write_fmnist(tmp_path / "data" / "fashion-mnist")  # a good copy elsewhere must not stand in
    _refused(tmp_path, earlier, {"name": "fashion-mnist", "path": str(typo), "fallback": "digits"},
             f"data.path {str(typo)!r} does not exist", "Point data.path at the folder",
             "data.fallback='digits' was not used")


def test_a_data_path_with_the_wrong_files_is_refused(tmp_path: Path, earlier: Path) -> None:
    wrong = tmp_path / "cifar"
    wrong.mkdir()
    (wrong / "data_batch_1").write_bytes(b"not fashion-mnist")
    _refused(tmp_path, earlier, {"name": "fashion-mnist", "path": str(wrong)},
             f"data.path {str(wrong)!r} does not hold dataset 'fashion-mnist'",
             f"{wrong} (data.path, holds none of the files)")


def test_truncated_files_are_an_error_even_with_a_fallback(tmp_path: Path, earlier: Path, data_env: Path) -> None:
    folder = _write_fmnist(data_env / "fashion-mnist")
    blob = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(blob.read_bytes())
    blob.write_bytes(gzip.compress(raw[:-100]))
    _refused(tmp_path, earlier, {"name": "fashion-mnist", "fallback": "digits"},
             str(blob), "is truncated", "data.fallback='digits' was not used")


def test_mismatched_files_are_an_error_even_with_a_fallback(tmp_path: Path, earlier: Path, data_env: Path) -> None:
    folder = _write_fmnist(data_env / "fashion-mnist")
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))  # another split's labels
    _refused(tmp_path, earlier, {"name": "fashion-mnist", "fallback": "digits"},
             "holds 20 images but label file", "data.fallback='digits' was not used")


def test_an_incomplete_copy_under_edgetune_data_is_refused(tmp_path: Path, earlier: Path, data_env: Path) -> None:
    folder = _write_fmnist(data_env / "fashion-mnist")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    _refused(tmp_path, earlier, {"name": "fashion-mnist", "fallback": "digits"},
             "holds an incomplete copy of dataset 'fashion-mnist'", "lacks t10k-images-idx3-ubyte")


@pytest.mark.skipif(any((r / "mnist").exists() for r in SYSTEM_ROOTS), reason="MNIST is installed here")
def test_a_missing_dataset_uses_the_fallback_and_says_so(tmp_path: Path, data_env: Path) -> None:
    r = cli("run", str(_recipe(tmp_path, {"name": "mnist", "fallback": "digits"})), "--run-dir", str(tmp_path / "fb"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "fb" / "summary.json").read_text())
    assert summary["dataset"] == "digits"
    assert summary["data_notes"][0].startswith("dataset 'mnist' is not installed, using fallback 'digits' instead")
    assert "note: dataset 'mnist' is not installed, using fallback 'digits'" in (tmp_path / "fb" / "report.md").read_text()
    r = cli("run", str(_recipe(tmp_path, {"name": "mnist"})), "--run-dir", str(tmp_path / "nofb"))
    assert r.returncode == 1 and "dataset 'mnist' not found" in r.stderr and "data.fallback=NAME" in r.stderr


def test_an_edited_checkpoint_is_not_resumed(tmp_path: Path, earlier: Path) -> None:
    latest = max((earlier / "checkpoints").glob("step-*.json"))
    latest.write_text(_bump_lr(latest.read_text()))
    (earlier / "checkpoints" / f".{latest.name}.0a1b2c3d.tmp").write_text("{")  # left by a kill mid-write
    before = _snapshot(earlier)
    r = cli("run", "--resume", str(earlier))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"checkpoint {latest} was changed after it was written" in r.stderr and "Delete it" in r.stderr
    after = _snapshot(earlier)
    temp = f"checkpoints/.{latest.name}.0a1b2c3d.tmp"
    assert temp not in after  # the interrupted write's temp file is gone
    changed = sorted(k for k in before if k != temp and after.get(k) != before[k])
    assert changed in ([], ["command.txt"]), changed  # no result changed (command.txt logs every attempt)
    assert set(after) - set(before) <= {"failed.json"}


def _bump_lr(text: str) -> str:
    """The JSON with every learning rate set to 10 (still valid JSON, still an edgetune checkpoint)."""
    meta = json.loads(text)

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "__dict__" and isinstance(v, list):
                    for pair in v:
                        if pair[0] == "lr":
                            pair[1] = 10.0
                        walk(pair[1])
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(meta)
    out = json.dumps(meta, indent=2, sort_keys=True)
    assert out != json.dumps(json.loads(text), indent=2, sort_keys=True)
    return out
