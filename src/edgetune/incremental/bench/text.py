"""``incremental-text`` suite: HOP against its ablations and fine-tuning in sequence on continual text sequences.

Every method learns the same problems in the same order from the same texts with the same steps, batch and
learning rates, on the same frozen pretrained encoder (MiniLM by default), and is tested on every problem
learned so far after each problem (the accuracy matrix ``R[i, j]``):

- ``hop``: an adapter and a head per problem, moment pooling (orders 1, 2) without [CLS];
- ``hop-mean`` / ``hop-cls``: the same with mean pooling (order 1) / the [CLS] vector (ablations of pooling);
- ``seq-ft``: fine-tuning in sequence: one shared adapter trained problem after problem, moment pooling, a head
  per problem (task-incremental) or one shared head (domain-incremental): the forgetting baseline;
- ``joint``: one shared adapter trained on all problems at once (same steps in all), the multitask upper bound;
- ``seq-ft-full`` (only when asked for): the whole encoder fine-tuned in sequence (learning rate 5e-5).

Task-incremental sequences name the problem at test. Domain-incremental ones do not: the HOP variants pick the
problem by ``select`` (default: the most confident adapter and head), and are also scored with the problem given
(method name ``... (problem given)``). Figures (:mod:`edgetune.incremental.continual_metrics`): average accuracy,
average incremental accuracy, forgetting, backward transfer, GEM forward transfer against chance ``1 / C``
(domain-incremental only: a head per problem cannot answer before its problem) and knowledge transfer against
each problem learned alone (the diagonal of the per-problem run with the problem given: HOP's adapters start
afresh, so its KT is 0 by construction where the problem is given).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from edgetune.bench.harness import DEFAULT_RESULTS_DIR, BenchContext, register_suite
from edgetune.bench.plots import pyplot, save_figure
from edgetune.core.errors import ConfigError
from edgetune.incremental.continual_metrics import summarize_matrix
from edgetune.incremental.hop import HopConfig, HopModel
from edgetune.incremental.text_sequences import Problem, SequenceConfig, TextSequence, build_sequence

__all__ = ["DEFAULT_METHODS", "METHODS", "accuracy_matrix", "plot_sequences", "run_method", "text_table"]

log = logging.getLogger(__name__)

#: method -> HopConfig fields over the suite's common ones (heads shared in domain-incremental for seq-ft/joint)
METHODS: dict[str, dict[str, Any]] = {
    "hop": {},
    "hop-mean": {"orders": [1]},
    "hop-cls": {"pool": "cls"},
    "seq-ft": {"adapters": "shared"},
    "joint": {"adapters": "shared"},
    "seq-ft-full": {"adapters": "full", "lr": 5e-5},  # not in the default run: ~1.5x the time of seq-ft
}
DEFAULT_METHODS = ("hop", "hop-mean", "hop-cls", "seq-ft", "joint")
FULL = {"sequences": ["brown-genres", "spam-domains"], "steps": 20, "max_length": 48, "train_per_class": 64,
        "test_per_class": 24, "problems": None}
QUICK = {"sequences": ["brown-genres", "spam-domains"], "steps": 4, "max_length": 32, "train_per_class": 8,
         "test_per_class": 6, "problems": 2}


def _accuracy(model: HopModel, p: Problem, given: bool) -> float:
    pred = model.predict(p.test.texts, p.name if given else None)
    return float((pred == p.test.labels).float().mean())


def accuracy_matrix(model: HopModel, seq: TextSequence, *, given: bool, ahead: bool = False,
                    after_each: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Learn ``seq`` problem by problem; ``R (T, T)`` of test accuracies (NaN where not measured).

    given: name the problem at test (task-incremental; the reference in domain-incremental). ahead: also test
    problem ``i + 1`` before learning it (``R[i, i + 1]``, for forward transfer; needs ``given=False``).
    after_each: ``fn(i, model)`` called after problem ``i`` is learned and tested.
    """
    t = len(seq)
    r = torch.full((t, t), math.nan, dtype=torch.float64)
    train_s = eval_s = 0.0
    trainable = 0
    for i, p in enumerate(seq):
        info = model.learn_problem(p.name, p.train.texts, p.train.labels, p.classes)
        train_s += info["seconds"]
        trainable = max(trainable, info["trainable"])
        t0 = time.perf_counter()
        for j in range(min(t, i + 2 if ahead else i + 1)):
            r[i, j] = _accuracy(model, seq.problems[j], given)
        eval_s += time.perf_counter() - t0
        if after_each is not None:
            after_each(i, model)
    return r, {"train_s": train_s, "eval_s": eval_s, "trainable": trainable}


def run_method(method: str, seq: TextSequence, encoder: torch.nn.Module, tokenizer: Any, base: HopConfig
               ) -> list[dict[str, Any]]:
    """Rows of one method on one sequence: ``matrix`` (JSON), the figures, times; two rows for a HOP variant on
    a domain-incremental sequence (problem chosen by ``select``, and problem given)."""
    if method not in METHODS:
        raise ConfigError(f"incremental-text: unknown method {method!r}; choose from {list(METHODS)}")
    fields = dict(METHODS[method])
    if seq.setting == "domain" and method in ("seq-ft", "joint", "seq-ft-full"):
        fields["heads"] = "shared"
    cfg = base.replace(**fields)
    model = HopModel(copy.deepcopy(encoder), tokenizer, cfg)
    common = {"sequence": seq.name, "setting": seq.setting, "problems": len(seq),
              "problem_names": [p.name for p in seq], "steps": cfg.steps, "batch_size": cfg.batch_size,
              "max_length": cfg.max_length, "lr": cfg.lr, "head_lr": cfg.head_lr, "rank": cfg.rank,
              "train_per_problem": [len(p.train) for p in seq], "test_per_problem": [len(p.test) for p in seq]}
    chance = [1.0 / len(p.classes) for p in seq]
    if method == "joint":
        t0 = time.perf_counter()
        info = model.learn_jointly([(p.name, p.train.texts, p.train.labels, p.classes) for p in seq],
                                   steps=cfg.steps * len(seq))
        accs = [_accuracy(model, p, seq.setting == "task") for p in seq]
        secs = time.perf_counter() - t0
        return [{**common, "method": method, "selection": "given" if seq.setting == "task" else "shared head",
                 "avg_acc": sum(accs) / len(accs), "final_acc": accs, "matrix": None,
                 "train_s": info["seconds"], "eval_s": secs - info["seconds"], "trainable": info["trainable"]}]
    per_problem = cfg.adapters == "per_problem"
    if seq.setting == "task" or not per_problem:
        r, info = accuracy_matrix(model, seq, given=seq.setting == "task", ahead=seq.setting == "domain")
        alone = r.diagonal().tolist() if per_problem else None  # each problem learned alone: KT 0 by construction
        return [_row(common, method, "given" if seq.setting == "task" else "shared head", r, info, chance, alone)]
    # domain-incremental HOP: one training, scored with the problem chosen by cfg.select and with it given
    given = torch.full((len(seq), len(seq)), math.nan, dtype=torch.float64)

    def also_given(i: int, m: HopModel) -> None:
        for j in range(i + 1):
            given[i, j] = _accuracy(m, seq.problems[j], True)

    r, info = accuracy_matrix(model, seq, given=False, ahead=True, after_each=also_given)
    alone = given.diagonal().tolist()
    return [_row(common, method, cfg.select, r, info, chance, alone=alone),
            _row(common, f"{method} (problem given)", "given", given, info, chance, alone=alone)]


def _lists(r: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else round(v, 4) for v in row] for row in r.tolist()]


def _row(common: dict[str, Any], method: str, selection: str, r: torch.Tensor, info: dict[str, Any],
         chance: list[float], alone: list[float] | None = None) -> dict[str, Any]:
    lower = r.clone()
    lower[torch.triu(torch.ones_like(r, dtype=torch.bool), diagonal=1)] = math.nan
    has_ahead = r.shape[0] > 1 and not math.isnan(float(r[0, 1]))
    figures = summarize_matrix(lower, alone=alone, initial=chance)
    if has_ahead:  # GEM forward transfer needs R[i-1, i], measured before problem i is learned
        figures["fwt"] = float(sum(r[j - 1, j] - chance[j] for j in range(1, r.shape[0])) / (r.shape[0] - 1))
    return {**common, "method": method, "selection": selection, **figures, "matrix": json.dumps(_lists(r)),
            "final_acc": [round(float(v), 4) for v in r[-1, : r.shape[0]]],
            "just_learned_acc": [round(float(r[i, i]), 4) for i in range(r.shape[0])], **info}


def _with_kt(rows: list[dict[str, Any]]) -> None:
    """KT of a method sharing its adapter: its diagonal against HOP's with the problem given (learned alone)."""
    alone = {(r["sequence"]): r["just_learned_acc"] for r in rows
             if r["method"] in ("hop", "hop (problem given)") and r["selection"] == "given"}
    for r in rows:
        ref = alone.get(r["sequence"])
        if r["method"] in ("seq-ft", "seq-ft-full") and ref is not None:
            r["kt"] = sum(a - b for a, b in zip(r["just_learned_acc"], ref, strict=True)) / len(ref)


# ------------------------------------------------------------------------------------------ the suite
def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _load_encoder(name: str) -> tuple[torch.nn.Module, Any]:
    from edgetune.models.pretrained import load_pretrained

    if name != "minilm":
        raise ConfigError(f"incremental-text: model {name!r} is not supported; use minilm")
    loaded = load_pretrained("minilm", task="features")
    return loaded.model, loaded.tokenizer


@register_suite(
    "incremental-text",
    summary="HOP vs mean/CLS pooling vs fine-tuning in sequence vs joint: continual text, accuracy matrix",
    options={"sequences": "sequences (default brown-genres, spam-domains)",
             "methods": f"methods (default {', '.join(DEFAULT_METHODS)}; also seq-ft-full)",
             "steps": "Adam steps per problem (default 20; quick 4)",
             "max_length": "tokens per text (default 48; quick 32)",
             "train_per_class": "training texts per class and problem (default 64; quick 8)",
             "test_per_class": "test texts per class and problem (default 24; quick 6)",
             "problems": "keep the first N problems of each sequence (default all; quick 2)",
             "lr": "adapter learning rate (default 1e-3)", "head_lr": "head learning rate (default 1e-3)",
             "select": "domain-incremental choice of the problem: confidence (default), entropy, average",
             "model": "encoder (minilm)",
             "plot_dir": "folder of incremental-text.png (default bench/results; quick: the scratch folder)"},
    table=lambda path: text_table(path))
def _incremental_text(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    sizes = QUICK if ctx.quick else FULL
    opt = {k: ctx.option(k, v) for k, v in sizes.items()}
    methods = [str(m) for m in _as_list(ctx.option("methods", list(DEFAULT_METHODS)))]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"incremental-text: unknown methods {unknown}; choose from {list(METHODS)}")
    torch.manual_seed(ctx.seed)
    encoder, tokenizer = _load_encoder(str(ctx.option("model", "minilm")))
    encoder.to(ctx.device)
    base = HopConfig(steps=int(opt["steps"]), max_length=int(opt["max_length"]), seed=ctx.seed,
                     lr=float(ctx.option("lr", 1e-3)), head_lr=float(ctx.option("head_lr", 1e-3)),
                     select=str(ctx.option("select", "confidence")))
    rows: list[dict[str, Any]] = []
    for name in _as_list(opt["sequences"]):
        seq = build_sequence(SequenceConfig(name=str(name), train_per_class=opt["train_per_class"],
                                            test_per_class=opt["test_per_class"], problems=opt["problems"],
                                            seed=ctx.seed))
        for method in methods:
            t0 = time.perf_counter()
            got = run_method(method, seq, encoder, tokenizer, base)
            for r in got:
                log.info("incremental-text %s %s: avg acc %.4f, forgetting %s (%.0f s)", seq.name, r["method"],
                         r["avg_acc"], r.get("forgetting"), time.perf_counter() - t0)
            rows += got
    _with_kt(rows)
    plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if ctx.quick else DEFAULT_RESULTS_DIR))
    plot_sequences(rows, plot_dir / "incremental-text.png")
    yield from rows


# ------------------------------------------------------------------------------------------ plot and table
def _matrix(row: dict[str, Any]) -> list[list[float | None]] | None:
    m = row.get("matrix")
    if isinstance(m, str) and m:
        return json.loads(m)
    return m if isinstance(m, list) else None


def plot_sequences(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Per sequence: the average accuracy over the problems seen so far after each problem (one line per
    method, joint as a dashed level), and each method's forgetting."""
    plt = pyplot()
    seqs = list(dict.fromkeys(r["sequence"] for r in rows))
    fig, axes = plt.subplots(2, len(seqs), figsize=(6.2 * len(seqs), 7.5), squeeze=False)
    for c, name in enumerate(seqs):
        mine = [r for r in rows if r["sequence"] == name]
        colour = {r["method"]: f"C{k}" for k, r in enumerate(mine)}
        ax = axes[0][c]
        for r in mine:
            m = _matrix(r)
            label = r["method"] + ("" if r["selection"] in ("given", "shared head") else f" ({r['selection']})")
            if r["method"] == "joint":
                ax.axhline(r["avg_acc"], ls="--", color="black", lw=1.2, label="joint (upper bound)")
            elif m is not None and all(m[i][j] is not None for i in range(len(m)) for j in range(i + 1)):
                acc = [sum(m[i][: i + 1]) / (i + 1) for i in range(len(m))]  # type: ignore[arg-type]
                ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=4, color=colour[r["method"]], label=label,
                        ls=":" if "given" in r["method"] else "-")
        ax.set(xlabel="problems learned", ylabel="mean test accuracy over problems seen",
               title=f"{name} ({mine[0]['setting']}-incremental, {mine[0]['steps']} steps per problem)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        bars = [r for r in mine if isinstance(r.get("forgetting"), float) and not math.isnan(r["forgetting"])]
        ax2 = axes[1][c]
        ax2.bar(range(len(bars)), [r["forgetting"] for r in bars], color=[colour[r["method"]] for r in bars])
        for i, r in enumerate(bars):
            ax2.annotate(f"{r['forgetting']:.3f}", (i, r["forgetting"]), ha="center", va="bottom", fontsize=7)
        ax2.set_xticks(range(len(bars)), [r["method"] for r in bars], rotation=25, ha="right", fontsize=8)
        ax2.axhline(0, color="black", lw=0.8)
        ax2.set(ylabel="forgetting (max earlier - final accuracy)", title=f"{name}: forgetting of old problems")
        ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _f(v: Any, digits: int = 3) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def text_table(csv_path: str | Path) -> str:
    """Markdown: per run (newest first) and sequence, each method's figures, then its final accuracy per problem
    with the accuracy just after learning that problem in brackets."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    runs = list(dict.fromkeys((r["timestamp_utc"], r["quick"], r["seed"]) for r in rows))
    lines: list[str] = []
    for run in reversed(runs):
        mine = [r for r in rows if (r["timestamp_utc"], r["quick"], r["seed"]) == run]
        lines += [(f"**{run[0]}** (quick={run[1]}, seed {run[2]}, {mine[0]['hardware']}, torch {mine[0]['torch']}, "
                   f"{mine[0]['torch_threads']} threads)"), ""]
        for name in dict.fromkeys(r["sequence"] for r in mine):
            seq = [r for r in mine if r["sequence"] == name]
            names = json.loads(seq[0]["problem_names"])
            s0 = seq[0]
            lines += [(f"`{name}` ({s0['setting']}-incremental, {s0['problems']} problems, {s0['steps']} steps x "
                       f"batch {s0['batch_size']} per problem, {s0['max_length']} tokens, LoRA rank {s0['rank']}, "
                       f"train/test texts per problem {s0['train_per_problem']} / {s0['test_per_problem']})"), "",
                      ("| method | problem at test | avg acc | avg inc acc | forgetting | BWT | FWT | KT | train s | "
                       "trained params |"), "|---|" + "---|" * 9]
            for r in seq:
                lines.append(f"| {r['method']} | {r['selection']} | {_f(r.get('avg_acc'))} | "
                             f"{_f(r.get('avg_inc_acc'))} | {_f(r.get('forgetting'))} | {_f(r.get('bwt'))} | "
                             f"{_f(r.get('fwt'))} | {_f(r.get('kt'))} | {_f(r.get('train_s'), 0)} | "
                             f"{r.get('trainable') or '–'} |")
            lines += ["", "Final accuracy per problem (just after learning it):", "",
                      "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for r in seq:
                final = json.loads(r["final_acc"]) if r.get("final_acc") else []
                just = json.loads(r["just_learned_acc"]) if r.get("just_learned_acc") else [None] * len(final)
                cells = [f"{_f(a)} ({_f(b)})" if b is not None else _f(a) for a, b in zip(final, just, strict=False)]
                lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)
