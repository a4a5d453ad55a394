"""Family plug-ins: discovery, CLI verbs, export formats picked by the run's recipe, `edgetune ls models`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

from edgetune import runner
from edgetune.cli.main import build_parser, main
from edgetune.core.config import Config
from edgetune.core.plugins import COMMANDS, EXPORTS, SAVERS, load_families
from edgetune.core.sections import SECTIONS, register_section
from edgetune.recipe import load_recipe

HELLO: list[str] = []


def _hello(args: argparse.Namespace) -> int:
    HELLO.append(args.who)
    print(f"hello {args.who}")
    return 0


def _add_hello(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zz-plugin-hello", help="test only: a fake family's verb")
    p.add_argument("--who", default="world")
    p.set_defaults(func=_hello)


if "zz-plugin-hello" not in COMMANDS:
    COMMANDS.add("zz-plugin-hello", _add_hello, summary="test only")


@pytest.fixture(autouse=True)
def restore_logging():
    lg = logging.getLogger("edgetune")
    saved = (list(lg.handlers), lg.level, lg.propagate)
    yield
    lg.handlers[:], lg.level, lg.propagate = saved[0], saved[1], saved[2]


def test_load_families_finds_sparse_and_its_parts():
    fams = load_families()
    assert "sparse" in fams
    from edgetune.core.sections import SECTIONS

    assert "sparse" in SECTIONS and "sparse-compact" in EXPORTS
    assert load_families() is fams  # imported once


def test_a_family_verb_appears_in_the_parser_and_runs(capsys):
    parser = build_parser()
    args = parser.parse_args(["zz-plugin-hello", "--who", "plug"])
    assert args.func is _hello and args.who == "plug"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "zz-plugin-hello" in sub.choices and "run" in sub.choices
    HELLO.clear()
    assert main(["-q", "zz-plugin-hello", "--who", "there"]) == 0
    assert HELLO == ["there"] and "hello there" in capsys.readouterr().out


def _digits(tmp_path: Path, name: str, **extra) -> Path:
    cfg = load_recipe({"name": name, "seed": 0, "output_dir": str(tmp_path), "data": {"name": "digits"},
                       "model": {"name": "mlp", "widths": [32]},
                       "train": {"epochs": 1, "batch_size": 64, "progress": False,
                                 "optimizer": {"name": "adam", "lr": 0.01}}, **extra})
    return runner.run(cfg, tmp_path / name, write_report=False).run_dir


def test_export_picks_the_format_the_run_needs(tmp_path, capsys):
    sparse = _digits(tmp_path, "sparse", sparse={"method": "set", "density": 0.3})
    assert main(["-q", "export", str(sparse)]) == 0
    out = capsys.readouterr().out
    assert "exported (sparse-compact)" in out
    rep = json.loads((sparse / "export" / "export_report.json").read_text())
    assert rep["test_acc_after"] == pytest.approx(rep["test_acc_before"])  # the export predicts like the run

    dense = _digits(tmp_path, "dense")
    assert main(["-q", "export", str(dense)]) == 2
    err = capsys.readouterr().err
    assert "--format" in err and "sparse-compact" in err and "Traceback" not in err
    assert not (dense / "export").exists()
    assert main(["-q", "export", str(dense), "--format", "no-such-format"]) == 2
    assert "sparse-compact" in capsys.readouterr().err


def test_ls_models_lists_architectures_and_pretrained_networks(capsys):
    from edgetune.models.base import MODELS
    from edgetune.models.pretrained import pretrained_status

    assert main(["ls", "models"]) == 0
    out = capsys.readouterr().out
    assert "[architectures]" in out and "[pretrained]" in out
    arch, pre = out.split("[pretrained]", 1)
    for name in MODELS.names():
        assert f"  {name} " in arch, name
    assert "mlp" in arch
    status = {s.name: s.installed for s in pretrained_status()}
    assert set(status) == {"minilm", "smollm2-135m", "mobilenet-v2"}
    for name, installed in status.items():
        line = next(x for x in pre.splitlines() if x.strip().startswith(name + " "))
        assert ("not installed" in line) == (not installed), line
        assert "installed" in line


def test_export_of_a_staged_run_exports_its_last_stage(tmp_path, capsys):
    cfg = load_recipe({"name": "s", "seed": 0, "output_dir": str(tmp_path), "data": {"name": "digits"},
                       "model": {"name": "mlp", "widths": [32]},
                       "train": {"epochs": 1, "batch_size": 64, "progress": False},
                       "stages": [{"name": "dense"}, {"name": "sp", "sparse": {"method": "set", "density": 0.1}}]})
    run = runner.run(cfg, tmp_path / "run", write_report=False).run_dir
    assert main(["-q", "export", str(run)]) == 0, capsys.readouterr().err
    assert "exported (sparse-compact)" in capsys.readouterr().out


class _HeadOnlyCfg(Config):
    pass


if "zz_plugins_headonly" not in SECTIONS:
    @register_section("zz_plugins_headonly", config=_HeadOnlyCfg, summary="test only: a family that saves its own tensors")
    def _headonly(model, cfg, ctx):
        return []

    def _save_head(model, cfg, folder):
        from safetensors.torch import save_file

        path = folder / "head-only.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("head.")}, str(path))
        return [path]

    SAVERS.add("zz_plugins_headonly", _save_head, summary="test only")


def test_a_family_save_format_writes_its_own_tensors_beside_the_model(tmp_path):
    from safetensors.torch import load_file

    from edgetune.runner import run

    cfg = load_recipe({"name": "h", "seed": 0, "output_dir": str(tmp_path), "data": {"name": "digits"},
                       "model": {"name": "mlp", "widths": [16]},
                       "train": {"epochs": 1, "progress": False}, "zz_plugins_headonly": {}})
    res = run(cfg, tmp_path / "run", write_report=False, command="test")
    assert res.summary["family_files"] == ["head-only.safetensors"]
    own = load_file(str(tmp_path / "run" / "head-only.safetensors"))
    full = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert set(own) == {"head.weight", "head.bias"} and torch.equal(own["head.weight"], full["head.weight"])
