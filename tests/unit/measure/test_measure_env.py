"""Environment description: keys, JSON-safe, no hostname, git SHA tolerant of missing git."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import torch

from edgetune.measure import environment, git_sha, hardware_string
from edgetune.measure.env import cpu_model


def test_environment_fields_and_json() -> None:
    env = environment()
    for key in ("cpu_model", "cpu_count", "torch_threads", "python", "torch", "numpy", "git_sha",
                "timestamp_utc", "gpu", "hardware"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["timestamp_utc"].endswith("+00:00")
    assert env["hardware"] == hardware_string(env)
    text = json.dumps(env)
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in text
    assert cpu_model() and env["cpu_model"] == cpu_model()


def test_git_sha_without_git(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_sha(tmp_path) == (None, None)  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert git_sha(tmp_path) == (None, None)


def test_git_sha_of_a_repository(tmp_path) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    try:
        subprocess.run([*git, "init", "-q", str(tmp_path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=tmp_path, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout
    assert git_sha(tmp_path) == (head.strip(), False)
    (tmp_path / "f.txt").write_text("b")
    assert git_sha(tmp_path) == (head.strip(), True)
