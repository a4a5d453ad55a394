"""Bench harness: rows stamped with the environment, CSV append-only (old rows survive header changes)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetune.bench import harness
from edgetune.bench.harness import BenchContext, append_rows_csv, register_suite, run_suite
from edgetune.core.errors import ConfigError
from edgetune.core.registry import Registry

ENV = {"timestamp_utc": "2030-01-01T00:00:00+00:00", "git_sha": "abc123", "hardware": "Test CPU x2",
       "torch": "9.9"}


@pytest.fixture
def suites(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A fresh registry so test suites do not leak into the real one (keeps the built-ins visible)."""
    fresh: Registry = Registry("bench suite")
    for e in harness.SUITES.entries():
        fresh.add(e.name, e.obj, summary=e.summary, **e.meta)
    monkeypatch.setattr(harness, "SUITES", fresh)
    return fresh


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_run_suite_appends_rows_and_stamps_env(suites: Registry, tmp_path: Path) -> None:
    seen: list[BenchContext] = []

    @register_suite("toy", "two rows", options={"scale": "multiplier"})
    def toy(ctx: BenchContext) -> Iterator[dict[str, Any]]:
        seen.append(ctx)
        assert ctx.out_dir.is_dir()
        for i in range(2):
            yield {"i": i, "value": i * ctx.option("scale", 1)}

    out = tmp_path / "res" / "toy.csv"
    rows = run_suite("toy", out_csv=out, quick=True, device="cpu", options={"scale": 10}, seed=3, env=ENV)
    assert [r["value"] for r in rows] == [0, 10]
    assert seen[0].quick and seen[0].seed == 3 and seen[0].device.type == "cpu"
    assert not seen[0].out_dir.exists()  # scratch folder removed after the run
    run_suite("TOY", out_csv=out, quick=False, device="cpu", env={**ENV, "git_sha": "def456"})
    header, got = _read(out)
    assert header[: len(harness.ENV_COLUMNS)] == list(harness.ENV_COLUMNS)
    assert header[len(harness.ENV_COLUMNS):] == ["i", "value"]
    assert [(r["git_sha"], r["i"], r["value"], r["quick"]) for r in got] == [
        ("abc123", "0", "0", "True"), ("abc123", "1", "10", "True"),
        ("def456", "0", "0", "False"), ("def456", "1", "1", "False")]
    assert {r["suite"] for r in got} == {"toy"} and {r["hardware"] for r in got} == {"Test CPU x2"}
    last = json.loads((tmp_path / "res" / "toy.last.json").read_text())
    assert [r["value"] for r in last["rows"]] == [0, 1]  # this run only
    assert last["environment"]["git_sha"] == "def456"
    newest = harness.last_run_rows(out)
    assert [(r["git_sha"], r["i"]) for r in newest] == [("def456", "0"), ("def456", "1")]  # the last run only
    head = harness.run_header(newest[0])
    assert head.startswith(f"Run {newest[0]['timestamp_utc']} (Test CPU x2, cpu, torch ")
    assert "git def456, quick=False)" in head and " threads, " in head
    assert harness.run_header(newest[0], "t1, t2").startswith("Run t1, t2 (")


def test_header_change_keeps_old_rows(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    append_rows_csv(out, [{"a": 1, "b": "x,y"}, {"a": 2, "b": None}])
    append_rows_csv(out, [{"c": 3.5, "a": 3}])  # new column c: rewrite with the union
    append_rows_csv(out, [{"b": "z"}])  # subset of the header: plain append
    header, got = _read(out)
    assert header == ["a", "b", "c"]
    assert got == [{"a": "1", "b": "x,y", "c": ""}, {"a": "2", "b": "", "c": ""},
                   {"a": "3", "b": "", "c": "3.5"}, {"a": "", "b": "z", "c": ""}]


def test_append_to_file_without_trailing_newline(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    out.write_text("a,b\n1,2")  # written by hand, no final newline
    append_rows_csv(out, [{"a": 3, "b": 4}])
    assert _read(out)[1] == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]


def test_unknown_option_failing_suite_and_unknown_suite(suites: Registry, tmp_path: Path) -> None:
    @register_suite("strict", options={"width": "layer width"})
    def strict(ctx: BenchContext) -> Iterator[dict[str, Any]]:
        yield {"w": ctx.option("width", 4)}

    @register_suite("broken")
    def broken(ctx: BenchContext) -> Iterator[dict[str, Any]]:
        yield {"x": 1}
        raise RuntimeError("boom")

    out = tmp_path / "r.csv"
    with pytest.raises(ConfigError, match='no option .widht.* Did you mean "width"'):
        run_suite("strict", out_csv=out, device="cpu", options={"widht": 8}, env=ENV)
    with pytest.raises(RuntimeError, match="boom"):
        run_suite("broken", out_csv=out, device="cpu", env=ENV)
    assert not out.exists()  # nothing written by a failed suite
    with pytest.raises(ConfigError, match="unknown bench suite"):
        run_suite("nope", out_csv=out, device="cpu", env=ENV)


def test_threads_set_for_the_run_and_restored(suites: Registry, tmp_path: Path) -> None:
    import torch

    @register_suite("threads")
    def threads(ctx: BenchContext) -> Iterator[dict[str, Any]]:
        yield {"inside": torch.get_num_threads()}

    before = torch.get_num_threads()
    (row,) = run_suite("threads", out_csv=tmp_path / "t.csv", device="cpu", env=ENV, threads=1)
    assert row["inside"] == 1 == row["torch_threads"]
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        run_suite("threads", out_csv=tmp_path / "t.csv", device="cpu", env=ENV, threads=0)


def test_measure_selftest_quick(tmp_path: Path) -> None:
    rows = run_suite("measure-selftest", out_csv=tmp_path / "m.csv", quick=True, device="cpu", env=ENV,
                     options={"batch": 8})
    dense, sparse = rows
    params = (64 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    assert dense["variant"] == "dense" and dense["parameters"] == params == dense["nonzeros"]
    weights_kept = round(0.1 * 64 * 128) + round(0.1 * 128 * 128) + round(0.1 * 128 * 10)
    assert sparse["nonzeros"] == weights_kept + 128 + 128 + 10 == sparse["nonzeros_coo"]
    assert dense["state_bytes"] == 4 * params and sparse["state_bytes_coo"] < dense["state_bytes"] / 1.5
    assert dense["disk_bytes"] > dense["state_bytes"]  # safetensors header on top of the raw tensors
    assert dense["output_rel_err"] == 0.0 < sparse["output_rel_err"]
    assert 0 < dense["fwd_p10_ms"] <= dense["fwd_median_ms"] <= dense["fwd_p90_ms"]
    assert dense["batch"] == 8 and dense["fwdbwd_peak_cuda_mb"] is None
    assert len(_read(tmp_path / "m.csv")[1]) == 2
