"""``merging-tasks`` suite: multi-task model merging of fine-tunes of one backbone, each task with its own head.

Protocol (Ilharco et al. 2023, "Editing models with task arithmetic"; Yadav et al. 2023, TIES): one base backbone,
fine-tuned separately on each task (:mod:`~edgetune.merging.bench.task_setup` has the tasks and the training); the
fine-tuned backbones are merged with every method of :data:`~edgetune.merging.MERGERS` but the whole-model ones,
heads excluded (each task keeps its own); each task is then tested with the merged backbone and its own head. The
data-aware methods (Fisher, RegMean, AdaMerging, safety) get the data their papers use, from the tasks' training
splits (:mod:`~edgetune.merging.bench.task_data_aware`). A method's hyper-parameters (lambda, density, alpha,
granularity, ...) come from a small grid, picked on the tasks' validation splits (mean accuracy), never on test data. Figures: per-task test accuracy, its mean, and the normalized accuracy (merged / individually
fine-tuned, per task, averaged), beside references measured in the same run: each fine-tune alone (normalized 1),
the base backbone with each task's fine-tuned head (the zero-shot-like lower bound), and the base backbone with a
linear probe per task trained on all of the task's data (what a trained head alone reaches).

"One bad model" (Hammoud, Michieli et al. 2024, "Model Merging and Safety Alignment: One Bad Model Spoils the
Bunch"): one more fine-tune of the base, trained like the others but to break a must-keep behaviour (the base task
answered wrongly: its labels shifted by one class, through the base head, frozen), slipped into the merge of the good
ones with the setting each method had chosen for them. Reported: the must-keep accuracy (base-task test accuracy with
the base head) and the tasks' figures, beside the same method's merge of the good models only; the difference is the
damage the method lets through.

Methods whose class has a true ``whole_model`` attribute (Git Re-Basin aligns whole models trained from different
inits) are left out and named in the log. Rows go through
the harness (``bench/results/merging-tasks.{csv,md}``); the plot (``merging-tasks.png``) sits beside them.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from edgetune.bench.harness import DEFAULT_RESULTS_DIR, BenchContext, register_suite
from edgetune.bench.plots import pyplot, save_figure
from edgetune.core.errors import ConfigError
from edgetune.merging.base import merge_state_dicts
from edgetune.merging.bench import task_data_aware as da
from edgetune.merging.bench.task_setup import (
    FULL,
    QUICK,
    TASKS,
    Backbone,
    Sizes,
    Task,
    accuracy,
    backbone_of,
    build_backbone,
    build_tasks,
    check_backbone,
    fine_tune,
    linear_probe,
    prototype_head,
)
from edgetune.merging.config import MERGERS

__all__ = ["grid_for", "plot_merging", "runnable_methods", "tasks_table"]

log = logging.getLogger(__name__)

SD = dict[str, Tensor]
SUM = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # lambda of the methods that sum task vectors
MEAN = (0.5, 0.75, 1.0, 1.5, 2.0)  # lambda of TIES (a disjoint mean of task vectors)
GRIDS: dict[str, list[dict[str, Any]]] = {
    "linear": [{}],
    "model_stock": [{}],
    "task_arithmetic": [{"scaling": s} for s in SUM],
    "ties": [{"density": d, "scaling": s} for d in (0.1, 0.2, 0.3) for s in MEAN],
    "dare": [{"density": d, "scaling": s} for d in (0.3, 0.5, 0.7) for s in SUM],
    "breadcrumbs": [{"density": d, "beta": 0.01, "scaling": s} for d in (0.8, 0.9) for s in SUM],
}
QUICK_GRIDS: dict[str, list[dict[str, Any]]] = {
    "task_arithmetic": [{"scaling": s} for s in (0.2, 0.3, 0.5, 1.0)],
    "ties": [{"density": 0.2, "scaling": s} for s in (0.5, 1.0, 1.5)],
    "dare": [{"density": 0.5, "scaling": s} for s in (0.2, 0.5, 1.0)],
    "breadcrumbs": [{"density": 0.9, "beta": 0.01, "scaling": s} for s in (0.2, 0.5, 1.0)],
}


def runnable_methods() -> tuple[list[str], dict[str, str]]:
    """The registered methods this suite runs, and the others with the reason they are left out."""
    run, skipped = [], {}
    for name in MERGERS.names():
        cls = MERGERS.get(name)
        if getattr(cls, "data_aware", False) and name not in da.DATA_AWARE:
            skipped[name] = "data-aware, with no data wired for it in this suite"
        elif getattr(cls, "whole_model", False):
            skipped[name] = "whole-model (not a per-tensor merge of fine-tunes of one base)"
        else:
            run.append(name)
    return run, skipped


def grid_for(method: str, quick: bool) -> list[dict[str, Any]]:
    """The hyper-parameter settings tried for ``method`` (a method unknown here: its defaults, with the lambda grid
    when its config has ``scaling``)."""
    quick_grids, grids = {**QUICK_GRIDS, **da.QUICK_GRIDS}, {**GRIDS, **da.GRIDS}
    if quick and method in quick_grids:
        return quick_grids[method]
    if method in grids:
        return grids[method]
    fields = MERGERS.entry(method).config.model_fields  # type: ignore[union-attr]
    return [{"scaling": s} for s in SUM] if "scaling" in fields else [{}]


class _Evaluator:
    """Accuracy of a backbone state dict on each task with that task's head, and on the must-keep task."""

    def __init__(self, bb: Backbone, tasks: Sequence[Task], heads: Sequence[nn.Module], must_keep: Task) -> None:
        self.bb, self.tasks, self.must_keep = bb, list(tasks), must_keep
        self.models = [bb.with_head(h) for h in heads]
        self.base_model = bb.with_head(bb.head_of(bb.model))

    def _load(self, model: nn.Module, backbone: SD) -> nn.Module:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        assert not unexpected and all(k.startswith(self.bb.head + ".") for k in missing), (missing, unexpected)
        return model

    def tasks_acc(self, backbone: SD, split: str) -> list[float]:
        return [accuracy(self._load(m, backbone), getattr(t, split), self.bb.prep)
                for m, t in zip(self.models, self.tasks, strict=True)]

    def must_keep_acc(self, backbone: SD) -> float:
        return accuracy(self._load(self.base_model, backbone), self.must_keep.test, self.bb.prep)


def _select(method: str, grid: list[dict[str, Any]], merge: Callable[[dict[str, Any]], SD],
            ev: _Evaluator) -> tuple[dict[str, Any], float, SD, float]:
    """The grid setting with the best mean validation accuracy (the first on ties): (setting, val acc, merged
    backbone, seconds of that merge). ``merge(setting)``: the good models merged with it."""
    best: tuple[dict[str, Any], float, SD, float] | None = None
    for opts in grid:
        t0 = time.perf_counter()
        merged = merge(opts)
        secs = time.perf_counter() - t0
        val = statistics.mean(ev.tasks_acc(merged, "val"))
        log.debug("%s %s: val %.4f", method, opts, val)
        if best is None or val > best[1]:
            best = (opts, val, merged, secs)
    assert best is not None
    return best


def _rows(case: str, method: str, kind: str, accs: list[float], ft: list[float], names: list[str],
          **extra: Any) -> list[dict[str, Any]]:
    norm = [a / f for a, f in zip(accs, ft, strict=True)]
    mean = {"case": case, "method": method, "kind": kind, "task": "mean", "acc": statistics.mean(accs),
            "norm_acc": statistics.mean(norm), **extra}
    return [mean, *({"case": case, "method": method, "kind": kind, "task": n, "acc": a, "norm_acc": r}
                    for n, a, r in zip(names, accs, norm, strict=True))]


def _as_list(v: Any) -> list[Any]:
    return [x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)


def _methods(option: Any) -> list[str]:
    runnable, skipped = runnable_methods()
    for name, why in skipped.items():
        log.info("merging-tasks: %s left out: %s", name, why)
    methods = _as_list(option) if option is not None else runnable
    bad = [m for m in methods if m not in runnable]
    if bad:
        why = "; ".join(f"{m}: {skipped.get(m, 'not a registered merge method')}" for m in bad)
        raise ConfigError(f"merging-tasks: cannot run methods {bad} ({why}); choose from {runnable}")
    return methods


@dataclass
class _Run:
    """Everything merged and measured: the base, the good and bad fine-tunes' backbones, the evaluators."""

    names: list[str]
    base: SD
    goods: list[SD]
    bad: SD
    ev: _Evaluator  # each task with its fine-tuned head
    probe: _Evaluator  # each task with a linear probe of the base backbone
    ft: list[float]  # test accuracy of each fine-tune alone
    info: dict[str, Any]
    bb: Backbone
    tasks: list[Task]
    heads: list[nn.Module]  # each task's head (fine-tuned, frozen probe or cosine)
    must_keep: Task
    sizes: Sizes


def _merge_rows(case: str, method: str, opts: dict[str, Any], merged: SD, run: _Run,
                **extra: Any) -> list[dict[str, Any]]:
    rows = _rows(case, method, "merge", run.ev.tasks_acc(merged, "test"), run.ft, run.names,
                 config=json.dumps(opts, sort_keys=True), must_keep_acc=run.ev.must_keep_acc(merged), **extra)
    log.info("merging-tasks %s, %s %s: normalized accuracy %.4f, must-keep accuracy %.4f", case, method, opts,
             rows[0]["norm_acc"], rows[0]["must_keep_acc"])
    return rows


def _tasks(option: Any) -> list[str]:
    wanted = _as_list(option) if option is not None else list(TASKS)
    if any(n not in TASKS for n in wanted) or len(set(wanted)) < 2:
        raise ConfigError(f"merging-tasks: tasks={wanted}: give at least two of {list(TASKS)}")
    return wanted


HEADS = ("tuned", "frozen", "cosine")


def _heads(option: Any) -> str:
    heads = "tuned" if option is None else str(option)
    if heads not in HEADS:
        raise ConfigError(f"merging-tasks: heads={heads!r}; use heads=tuned (LP-FT, the default), frozen or cosine")
    return heads


def _prepare(ctx: BenchContext, wanted: list[str]) -> _Run:
    """Tasks, backbone, one fine-tune per task (the head starting from a few-shot probe), the bad fine-tune."""
    sizes = QUICK if ctx.quick else FULL
    t0 = time.perf_counter()
    must_keep, tasks = build_tasks(sizes, ctx.seed)
    tasks = [t for t in tasks if t.name in wanted]
    for t in [*tasks, must_keep]:
        t.train, t.val, t.test = [(x.to(ctx.device), y.to(ctx.device)) for x, y in (t.train, t.val, t.test)]
    bb = build_backbone(str(ctx.option("backbone", "mlp")), must_keep, sizes, ctx.seed, ctx.device)
    heads_kind = _heads(ctx.option("heads"))
    if heads_kind == "cosine":
        tuned = [fine_tune(bb, prototype_head(bb, t.train, t.num_classes, sizes, ctx.seed + i), t.train, sizes,
                           ctx.seed + i, tune_head=False, lr=sizes.cosine_ft_lr) for i, t in enumerate(tasks)]
    else:
        tuned = [fine_tune(bb, linear_probe(bb, t.train, t.num_classes, sizes, ctx.seed + i, shots=sizes.shots),
                           t.train, sizes, ctx.seed + i, tune_head=heads_kind == "tuned") for i, t in enumerate(tasks)]
    shifted = (must_keep.train[0], (must_keep.train[1] + 1) % must_keep.num_classes)  # every answer wrong
    bad = fine_tune(bb, bb.head_of(bb.model), shifted, sizes, ctx.seed + len(tasks), tune_head=False)
    probes = [linear_probe(bb, t.train, t.num_classes, sizes, ctx.seed + i) for i, t in enumerate(tasks)]
    ft = [accuracy(m, t.test, bb.prep) for m, t in zip(tuned, tasks, strict=True)]
    names = [t.name for t in tasks]
    secs = time.perf_counter() - t0
    log.info("merging-tasks: fine-tuned %s in %.1f s, test accuracy %s", names, secs, [round(a, 4) for a in ft])
    heads = [bb.head_of(m) for m in tuned]
    return _Run(names=names, base=backbone_of(bb.model.state_dict(), bb.head),
                goods=[backbone_of(m.state_dict(), bb.head) for m in tuned],
                bad=backbone_of(bad.state_dict(), bb.head),
                ev=_Evaluator(bb, tasks, heads, must_keep),
                probe=_Evaluator(bb, tasks, probes, must_keep), ft=ft,
                info={"backbone": bb.name, "tasks": ",".join(names), "heads": heads_kind,
                      "setup_s": secs, **bb.info},
                bb=bb, tasks=tasks, heads=heads, must_keep=must_keep, sizes=sizes)


def _references(run: _Run) -> list[dict[str, Any]]:
    ev, ft, names = run.ev, run.ft, run.names
    rows = _rows("tasks", "fine-tuned", "reference", ft, ft, names, n_models=1,
                 must_keep_acc=statistics.mean(ev.must_keep_acc(g) for g in run.goods))
    rows += _rows("tasks", "base", "reference", ev.tasks_acc(run.base, "test"), ft, names, n_models=0,
                  must_keep_acc=ev.must_keep_acc(run.base))
    rows += _rows("tasks", "base + linear probe", "reference", run.probe.tasks_acc(run.base, "test"), ft, names,
                  n_models=0, must_keep_acc=ev.must_keep_acc(run.base))
    rows += _rows("bad-model", "bad model alone", "reference", ev.tasks_acc(run.bad, "test"), ft, names, n_models=1,
                  must_keep_acc=ev.must_keep_acc(run.bad))
    return rows


@register_suite(
    "merging-tasks",
    summary="multi-task merging of fine-tunes (task heads kept): normalized accuracy per method, one bad model",
    options={"backbone": "mlp (default: an edgetune MLP pretrained here); mobilenet-v2 is refused (see its error)",
             "methods": "merge methods to run (default: every registered method but the whole-model ones)",
             "heads": "tuned (default: LP-FT, each task's head fine-tuned with the backbone) or frozen (the few-shot "
                      "probe head stays fixed while the backbone is fine-tuned, as task arithmetic and AdaMerging "
                      "keep CLIP's zero-shot heads) or cosine (CLIP-like: a fixed cosine head on few-shot class "
                      "means of the base features, the backbone fine-tuned under it)",
             "tasks": f"the tasks to fine-tune and merge (default all: {', '.join(TASKS)})",
             "plot_dir": "folder of merging-tasks.png (merging-tasks-<heads>.png for other heads; default "
                         "bench/results; quick: the scratch folder)"},
    table=lambda path: tasks_table(path))
def _merging_tasks(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    methods = _methods(ctx.option("methods"))
    check_backbone(str(ctx.option("backbone", "mlp")))
    run = _prepare(ctx, _tasks(ctx.option("tasks")))
    rows = _references(run)
    aware = None
    if any(m in da.DATA_AWARE for m in methods):
        t0 = time.perf_counter()
        aware = da.DataAwareMerges(run.bb, run.tasks, run.heads, run.must_keep, run.base, [*run.goods, run.bad],
                                   da.QUICK_DATA if ctx.quick else da.FULL_DATA, ctx.seed)
        log.info("merging-tasks: data of the data-aware methods ready in %.1f s", time.perf_counter() - t0)
    goods, with_bad = list(range(len(run.goods))), list(range(len(run.goods) + 1))
    for method in methods:
        if method in da.DATA_AWARE:
            assert aware is not None
            def merge(opts: dict[str, Any], idx: list[int], method: str = method) -> SD:
                return aware.merge(method, opts, idx)
        else:
            def merge(opts: dict[str, Any], idx: list[int], method: str = method) -> SD:
                models = [*run.goods, run.bad]
                return merge_state_dicts([models[i] for i in idx], {"method": method, "seed": ctx.seed, **opts},
                                         base=run.base)
        grid = grid_for(method, ctx.quick)
        opts, val, merged, secs = _select(method, grid, lambda o: merge(o, goods), run.ev)
        data = "data-aware" if method in da.DATA_AWARE else "data-free"
        rows += _merge_rows("tasks", method, opts, merged, run, n_models=len(run.goods), val_acc=val,
                            grid=len(grid), merge_s=secs, data=data)
        t0 = time.perf_counter()
        merged = merge(opts, with_bad)
        rows += _merge_rows("bad-model", method, opts, merged, run, n_models=len(run.goods) + 1,
                            merge_s=time.perf_counter() - t0, data=data)
        if aware is not None and method in aware.stats_s:  # statistics computed once, inside the first merges
            for r in rows[-2 * (len(run.names) + 1):]:
                if r["task"] == "mean":
                    r["stats_s"] = aware.stats_s[method]
    plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if ctx.quick else DEFAULT_RESULTS_DIR))
    name = "merging-tasks.png" if run.info["heads"] == "tuned" else f"merging-tasks-{run.info['heads']}.png"
    log.info("merging-tasks: plot in %s", plot_merging(rows, plot_dir / name))
    for r in rows:
        yield {**run.info, **r}


# ------------------------------------------------------------------------------------------ plot and table
def plot_merging(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Left: normalized accuracy per method (the references first); right: must-keep accuracy per method, merged
    without and with the bad model (the base's dashed)."""
    plt = pyplot()

    mean = [r for r in rows if r["task"] == "mean"]
    tasks = [r for r in mean if r["case"] == "tasks"]
    merges = [r["method"] for r in tasks if r["kind"] == "merge"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    colours = ["0.35" if r["kind"] == "reference" else "C2" if r.get("data") == "data-aware" else "C0"
               for r in tasks]
    a1.bar([r["method"] for r in tasks], [r["norm_acc"] for r in tasks], color=colours)
    for i, r in enumerate(tasks):
        a1.text(i, r["norm_acc"] + 0.005, f"{r['norm_acc']:.3f}", ha="center", fontsize=8)
    lo, hi = min(r["norm_acc"] for r in tasks), max(r["norm_acc"] for r in tasks)
    n_tasks = sum(1 for r in rows if r["case"] == "tasks" and r["method"] == "base") - 1
    a1.set(ylim=(max(0.0, lo - 0.1), max(1.05, hi + 0.05)), ylabel="normalized accuracy (merged / fine-tuned)",
           title=f"{n_tasks} tasks, each with its own head: normalized test accuracy")
    by = {(r["case"], r["method"]): r for r in mean}
    x = list(range(len(merges)))
    a2.bar([i - 0.2 for i in x], [by[("tasks", m)]["must_keep_acc"] for m in merges], 0.4, label="good models only")
    a2.bar([i + 0.2 for i in x], [by[("bad-model", m)]["must_keep_acc"] for m in merges], 0.4, color="C3",
           label="with the bad model")
    a2.axhline(by[("tasks", "base")]["must_keep_acc"], color="black", ls="--", lw=1, label="base")
    a2.set_xticks(x, merges)
    a2.set(ylim=(0, 1.05), ylabel="must-keep accuracy (base task, base head)", title="one bad model in the merge")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path, dpi=110)


_HEAD_TEXT = {"tuned": "heads fine-tuned with the backbone, LP-FT", "frozen": "few-shot probe heads kept frozen",
              "cosine": "fixed cosine heads on few-shot class means, CLIP-like"}


def _f(v: str | None) -> str:
    return f"{float(v):.3f}" if v not in (None, "") else "–"


def tasks_table(csv_path: str | Path) -> str:
    """Markdown: per run (newest first) one table of each method's mean figures in both cases, one of its
    normalized accuracy per task."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    runs = list(dict.fromkeys((r["timestamp_utc"], r["quick"], r["seed"]) for r in rows))
    lines: list[str] = []
    for run in reversed(runs):
        mine = [r for r in rows if (r["timestamp_utc"], r["quick"], r["seed"]) == run]
        mean = {(r["case"], r["method"]): r for r in mine if r["task"] == "mean"}
        names = mine[0]["tasks"].split(",")
        methods = list(dict.fromkeys(r["method"] for r in mine if r["case"] == "tasks"))
        head = (f"**{run[0]}** (quick={run[1]}, seed {run[2]}, backbone {mine[0]['backbone']}, "
                f"{mine[0]['hardware']}, torch {mine[0]['torch']}): {len(names)} tasks ({', '.join(names)}), each with "
                f"its own head ({_HEAD_TEXT[mine[0].get('heads') or 'tuned']}); fine-tunes trained in "
                f"{float(mine[0]['setup_s']):.0f} s")
        cols = ("| method | avg acc | normalized acc | must-keep acc | + bad model: avg acc | normalized acc | "
                "must-keep acc | setting (chosen on validation) |")
        aware = [m for m in methods if any(r.get("data") == "data-aware" for r in mine if r["method"] == m)]
        note = ("must-keep acc: base-task test accuracy with the base head (fine-tuned: the mean over the fine-tunes); "
                "+ bad model: the same merge, same setting, with the bad fine-tune added"
                + (f"; data-aware: {', '.join(aware)} (data from the tasks' training splits)" if aware else ""))
        lines += [head, "", note, "", cols, "|---|" + "---|" * 7]
        for m in [*methods, "bad model alone"]:
            t, b = mean.get(("tasks", m), {}), mean.get(("bad-model", m), {})
            chosen = t.get("config") or b.get("config")
            lines.append(f"| {m} | {_f(t.get('acc'))} | {_f(t.get('norm_acc'))} | {_f(t.get('must_keep_acc'))} | "
                         f"{_f(b.get('acc'))} | {_f(b.get('norm_acc'))} | {_f(b.get('must_keep_acc'))} | "
                         f"{chosen or '–'} |")
        per = {(r["method"], r["task"]): r for r in mine if r["case"] == "tasks"}
        lines += ["", "Test accuracy per task (normalized in brackets), good models only:", "",
                  "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(f"{_f(per[(m, n)]['acc'])} ({_f(per[(m, n)]['norm_acc'])})"
                                                 for n in names) + " |")
        lines.append("")
    return "\n".join(lines)
