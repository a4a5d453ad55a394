"""Checkpoints you can trust: the whole checkpoint (tensors + JSON state) is checksummed and an edit is refused
before any state is touched; old (version 1) checkpoints still resume, with a warning; what a kill during a
write leaves behind is removed when the folder is opened again; files follow the user's umask."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.config import validate
from edgetune.core.errors import CheckpointError
from edgetune.core.state import atomic_write_bytes, atomic_write_json, remove_temp_files, save_tensors
from edgetune.train.checkpoint import VERSION, CheckpointManager, json_checksum
from edgetune.train.config import TrainConfig
from edgetune.train.loop import Trainer

SRC = Path(__file__).resolve().parents[3] / "src"


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(torch.randn(n, 2, generator=g) + y[:, None].float(), y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))


def _trainer(run_dir: Path) -> Trainer:
    cfg = validate(TrainConfig, {"epochs": 2, "batch_size": 16, "progress": False,
                                 "optimizer": {"name": "sgd", "lr": 0.1},
                                 "checkpoint": {"every_steps": 3, "keep_last": 10}})
    return Trainer(_model(), _data(), cfg, run_dir=run_dir)


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """A run folder with checkpoints; returns the newest checkpoint JSON."""
    _trainer(tmp_path / "run").fit()
    latest = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    assert latest is not None
    return latest


def _pairs(node: Any) -> Iterator[list[Any]]:
    """Every [key, value] pair of the JSON tree (dicts are stored as ``{"__dict__": [[k, v], ...]}``)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "__dict__" and isinstance(v, list):
                for pair in v:
                    yield pair
                    yield from _pairs(pair[1])
            else:
                yield from _pairs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _pairs(v)


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def _set_key(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        hits = [p for p in _pairs(meta["state"]) if p[0] == key]
        assert hits, key
        for p in hits:
            p[1] = value
    return change


def _hashes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_round_trips_and_records_a_checksum(trained: Path) -> None:
    meta = json.loads(trained.read_text())
    assert meta["version"] == VERSION == 2 and meta["checksum"] == json_checksum(meta)
    ck = CheckpointManager.load(trained)
    assert ck.step == meta["step"] and "model" in ck.state


@pytest.mark.parametrize("change", [
    _set_key("lr", 10.0),  # the optimizer's learning rate
    _set_key("epoch", 0),  # the loop's position
    lambda m: m.update(step=m["step"] + 1),
    lambda m: m["fingerprint"].update({"extra": [[1], "float32"]}),
    lambda m: m.update(sha256="0" * 64),  # would point the hash at another tensor file
], ids=["lr", "epoch", "step", "fingerprint", "tensor-hash"])
def test_an_edit_that_still_parses_is_refused_before_any_state_changes(trained: Path, change) -> None:
    run = trained.parents[1]
    _edit(trained, change)
    tr = _trainer(run)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    files = _hashes(run)
    with pytest.raises(CheckpointError) as info:
        tr.resume(trained)
    msg = str(info.value)
    assert str(trained) in msg and "was changed after it was written" in msg and "Delete it" in msg
    assert all(torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())
    assert _hashes(run) == files


def test_reformatted_json_is_still_accepted(trained: Path) -> None:
    _edit(trained, lambda m: None)  # same content, other whitespace: nothing the run reads changed
    CheckpointManager.load(trained)


def test_removed_checksum_and_edited_tensors_are_refused(trained: Path) -> None:
    blob = trained.with_suffix(".safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{blob.name} is corrupt: its SHA-256 does not match"):
        CheckpointManager.load(trained)
    _edit(trained, lambda m: m.pop("checksum"))
    with pytest.raises(CheckpointError, match="has no checksum"):
        CheckpointManager.load(trained)


def test_version_1_checkpoints_resume_with_a_warning(trained: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Decision: a checkpoint written before the checksum (version 1) is still resumed, its tensor file verified,
    and the log says its JSON could not be; any other version is refused."""

    def to_v1(m: dict[str, Any]) -> None:
        m.pop("checksum")
        m["version"] = 1

    _edit(trained, to_v1)
    with caplog.at_level(logging.WARNING, logger="edgetune.train.checkpoint"):
        tr = _trainer(trained.parents[1])
        assert tr.resume(trained)
    assert any("format version 1" in r.getMessage() and str(trained) in r.getMessage() for r in caplog.records)
    blob = trained.with_suffix(".safetensors")
    blob.write_bytes(blob.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="corrupt"):  # its tensors are still verified
        CheckpointManager.load(trained)
    _edit(trained, lambda m: m.update(version=3))
    with pytest.raises(CheckpointError, match=r"format version 3; this edgetune reads versions 1, 2"):
        CheckpointManager.load(trained)


def test_int_keys_and_non_finite_floats_hash_the_same_after_a_round_trip(tmp_path: Path) -> None:
    ck = CheckpointManager(tmp_path)
    state = {"opt": {0: {"lr": 0.1}, 2: {"lr": 1e-300}, 10: {"x": float("inf")}}, "t": torch.arange(3)}
    path = ck.save(7, state, {"t": [[3], "int64"]})
    loaded = CheckpointManager.load(path)
    assert loaded.step == 7 and torch.equal(loaded.state["t"], torch.arange(3))


def _kill_during_write(folder: Path, target: str) -> None:
    """A process SIGKILLed between writing a temp file and renaming it (as during a checkpoint write)."""
    code = textwrap.dedent(f"""
        import os, signal
        from edgetune.core import state
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        state.atomic_write_bytes({str(folder / target)!r}, b"x" * 1000)
    """)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, check=False, timeout=120)
    assert proc.returncode == -9


def test_opening_the_folder_removes_what_a_killed_write_left(trained: Path) -> None:
    folder = trained.parent
    _kill_during_write(folder, "step-000000099.safetensors")
    temps = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".step-000000099.safetensors.")
    (folder / ".step-000000099.json.k2j4h5g6.tmp").write_text("{")  # the JSON's temp file
    (folder / "step-000000099.safetensors").write_bytes(b"tensors, but their JSON was never written")
    (folder / ".notes.txt.abcd1234.tmp").write_text("not a checkpoint's: left alone")
    (folder / "mine.tmp").write_text("not the writer's pattern: left alone")
    kept = {p.name: p.read_bytes() for p in folder.iterdir() if p.name.startswith("step-") and p.suffix == ".json"}
    kept |= {n.replace(".json", ".safetensors"): (folder / n.replace(".json", ".safetensors")).read_bytes()
             for n in list(kept)}

    ck = CheckpointManager(folder)
    names = {p.name for p in folder.iterdir()}
    assert names == set(kept) | {".notes.txt.abcd1234.tmp", "mine.tmp"}
    assert all((folder / n).read_bytes() == b for n, b in kept.items())
    assert ck.latest() == trained and CheckpointManager.load(trained).step > 0


def test_a_resumed_trainer_cleans_its_checkpoint_folder(trained: Path) -> None:
    (trained.parent / f".{trained.name}.0a1b2c3d.tmp").write_text("{")
    tr = _trainer(trained.parents[1])
    assert not list(trained.parent.glob("*.tmp"))
    assert tr.resume()


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path: Path, umask: Callable[[int], None], mask: int) -> None:
    umask(mask)
    expected = 0o666 & ~mask
    atomic_write_bytes(tmp_path / "results.csv", b"a,b\n")
    atomic_write_json(tmp_path / "summary.json", {"a": 1})
    save_tensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    path = CheckpointManager(tmp_path / "checkpoints").save(1, {"w": torch.zeros(2)}, {"w": [[2], "float32"]})
    for p in [tmp_path / "results.csv", tmp_path / "summary.json", tmp_path / "model.safetensors", path,
              path.with_suffix(".safetensors")]:
        assert p.stat().st_mode & 0o777 == expected, p
    (tmp_path / "results.csv").chmod(0o600)  # a rewrite creates a new file: the umask again, like open()
    atomic_write_bytes(tmp_path / "results.csv", b"a,b\n1,2\n")
    assert (tmp_path / "results.csv").stat().st_mode & 0o777 == expected


def test_a_failed_write_leaves_no_temp_file_and_the_old_content(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})

    def fail(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and json.loads(target.read_text()) == {"v": 1}
    assert remove_temp_files(tmp_path / "missing") == []
