"""Sub-commands: each parses its arguments, validates through the library, and calls it."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from edgetune.core.errors import ConfigError

log = logging.getLogger("edgetune.cli")


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    """``[RECIPE] [key=value ...]``: the first argument without '=' is the recipe."""
    if args and "=" not in args[0]:
        rest = args[1:]
        bad = [a for a in rest if "=" not in a]
        if bad:
            raise ConfigError(f"unexpected argument {bad[0]!r}: after the recipe only key=value overrides may follow")
        return args[0], rest
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}: give one recipe, then key=value overrides")
    return None, args


# ------------------------------------------------------------------------------------------ run
def _run(args: argparse.Namespace) -> int:
    from edgetune import runner
    from edgetune.recipe import DEFAULT_RECIPE, load_recipe

    recipe, overrides = _split_recipe(args.args)
    command = "edgetune " + shlex.join(sys.argv[1:])
    if args.resume:
        if recipe:
            raise ConfigError("--resume takes the run folder; do not also give a recipe")
        result = runner.resume(args.resume, tuple(overrides), command=command)
    else:
        cfg = load_recipe(recipe or DEFAULT_RECIPE, overrides)
        if recipe is None:
            log.info("no recipe given: running the default recipe %r", DEFAULT_RECIPE)
        result = runner.run(cfg, args.run_dir, command=command)
    s = result.summary
    if s.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    for name, st in (s.get("stages") or {"": s}).items():
        label = f"{name}: " if name else ""
        took = f"after {st.get('steps', 0)} steps ({st.get('wall_time_s', 0):.0f} s)"
        if "test_ppl" in st:
            print(f"{label}test perplexity {st['test_ppl']:.2f}, next-token accuracy {st['test_acc']:.4f} {took}")
        elif "test_acc" in st:
            print(f"{label}test accuracy {st['test_acc']:.4f} {took}")
    print(f"report: {result.report or result.run_dir}")
    failed = [k for k, e in s.get("expect", {}).items() if not e["ok"]]
    if failed:
        log.warning("expected figures not reached: %s", ", ".join(failed))
        return 1 if args.check else 0
    return 0


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe (default: the default recipe) and write a run folder")
    p.add_argument("args", nargs="*", metavar="[RECIPE] [key=value]",
                   help="recipe file or shipped name (edgetune ls recipes), then dotted overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    p.add_argument("--run-dir", type=Path, help="write the run here instead of <output_dir>/<name>-<time>")
    p.add_argument("--check", action="store_true", help="exit 1 when the recipe's expected figures are missed")
    p.set_defaults(func=_run)


# ------------------------------------------------------------------------------------------- ls
def _ls(args: argparse.Namespace) -> int:
    from edgetune.core.registry import Registry
    from edgetune.recipe import list_recipes, recipe_schema

    recipe_schema()  # imports families so their registries fill
    from edgetune.core.plugins import load_families

    load_families()
    what = args.what
    if what == "models":
        return _ls_models()
    if what == "recipes":
        for name, path in list_recipes():
            print(f"{name:32s} {_first_comment(path)}")
        return 0
    kinds = {"datasets": ["dataset"], "suites": ["bench suite"], "tasks": ["task"], "exports": ["export format"],
             "steps": ["stage step"]}
    registries = Registry.all()
    if what == "methods":
        names = [k for k in registries if k.endswith("method") or k in ("recipe section", "novelty gate")]
    else:
        names = kinds[what]
    for kind in names:
        reg = registries.get(kind)
        if reg is None:
            continue
        if len(names) > 1:
            print(f"[{kind}s]")
        for e in reg.entries():
            print(f"{e.name:24s} {e.summary}")
    return 0


def _ls_models() -> int:
    from edgetune.models.base import MODELS
    from edgetune.models.pretrained import pretrained_status

    print("[architectures]  (model.name; trained from scratch, or from model.weights)")
    for e in MODELS.entries():
        print(f"  {e.name:22s} {e.summary}")
    print("[pretrained]  (model.name; installed by `make models`)")
    for st in pretrained_status():
        state = "installed" if st.installed else "not installed"
        print(f"  {st.name:22s} {state:14s} {st.summary} ({st.package}, {st.size_mb:.0f} MB)")
    print("Also: model.hf=FOLDER (a local Hugging Face model), model.from=RUN_DIR or stage:NAME")
    return 0


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def add_ls(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list methods, models, datasets, recipes or bench suites")
    p.add_argument("what", nargs="?", default="methods", choices=["methods", "models", "datasets", "recipes", "suites", "tasks", "exports", "steps"])
    p.set_defaults(func=_ls)


# ------------------------------------------------------------------------------------- validate
def _validate(args: argparse.Namespace) -> int:
    from edgetune.core.errors import EdgetuneError
    from edgetune.recipe import load_recipe

    if len(args.recipes) == 1:  # one recipe: its error is the one paragraph main() prints
        load_recipe(args.recipes[0], args.overrides)
        print(f"{args.recipes[0]}: ok")
        return 0
    failed = []
    for recipe in args.recipes:  # every recipe is checked; each failure is reported
        try:
            load_recipe(recipe, args.overrides)
        except EdgetuneError as err:
            failed.append(recipe)
            print(f"edgetune: error: {recipe}: {err}", file=sys.stderr)
        else:
            print(f"{recipe}: ok")
    if failed:
        print(f"edgetune: {len(failed)} of {len(args.recipes)} recipes failed: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


def add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check recipes without running them")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    p.set_defaults(func=_validate)


# --------------------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    from edgetune.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="(re)write report.md and plots of a finished run folder")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.set_defaults(func=_report)


# ---------------------------------------------------------------------------------------- bench
def _bench(args: argparse.Namespace) -> int:
    from edgetune.bench import run_suite
    from edgetune.core.config import parse_override

    options = {}
    for text in args.options:
        keys, value = parse_override(text)
        options[".".join(keys)] = value
    out = args.out or Path("bench/results") / f"{args.suite}.csv"
    rows = run_suite(args.suite, out_csv=out, quick=args.quick, device=args.device, options=options,
                     out_dir=args.work_dir)
    print(f"{len(rows)} rows appended to {out}")
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite and append its rows to a CSV (edgetune ls suites)")
    p.add_argument("suite")
    p.add_argument("options", nargs="*", metavar="key=value")
    p.add_argument("--quick", action="store_true", help="reduced sizes (what CI runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="CSV to append to (default bench/results/<suite>.csv)")
    p.add_argument("--work-dir", type=Path, help="keep the suite's files (runs, checkpoints) here instead of a "
                   "temporary folder; sparse-quality resumes an interrupted run found there")
    p.set_defaults(func=_bench)


# --------------------------------------------------------------------------------------- export
def _export(args: argparse.Namespace) -> int:
    from edgetune.core.plugins import EXPORTS, load_families
    from edgetune.runner import load_run_model

    load_families()
    run = load_run_model(args.run_dir, with_data=True)
    if args.format:
        name = args.format
        EXPORTS.entry(name)  # unknown: ConfigError listing the formats
    else:
        fits = [e.name for e in EXPORTS.entries() if e.obj.applies(run.cfg)]
        if not fits:
            known = ", ".join(EXPORTS.names()) or "(none)"
            raise ConfigError(f"no export format applies to the run in {args.run_dir} (its recipe uses no method with "
                              f"an export format); pass --format NAME, one of: {known}")
        name = fits[0]
    rep = EXPORTS.get(name).export(run, run.run_dir, args.out)  # a staged run: its last finished stage
    print(f"exported ({name}) to {rep.get('out_dir', args.out)}: {rep.get('message', '')}".rstrip(": "))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a deployable model of a finished run in a family's export format")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/export)")
    p.add_argument("--format", help="export format (default: the one the run's methods provide; edgetune ls exports)")
    p.set_defaults(func=_export)


ALL = [add_run, add_ls, add_validate, add_report, add_bench, add_export]
