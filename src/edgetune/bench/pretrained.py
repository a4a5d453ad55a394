"""``pretrained`` suite: adapting a pretrained network vs training it whole vs training from scratch.

Two groups of rows, each compared at the same seed, data subset, batch size and number of optimizer steps:

- ``minilm`` on SpamAssassin (binary): a linear probe (frozen encoder, only the new head trains) vs full
  fine-tuning;
- ``mobilenet-v2`` on Fashion-MNIST resized to ``image_size`` px: linear probe vs full fine-tuning vs the same
  MobileNetV2 from random weights (``init: random``: same size, same preprocessing), beside ``resnet20`` trained
  from scratch on the same images at their native 28 px (0.27 M parameters; a small from-scratch baseline).

Every variant runs through the recipe pipeline (:func:`edgetune.run`). The linear probe is written as
``train.trainable: [head]`` on the default task, which freezes everything but the head exactly as
``model.task: features`` does. Learning rates differ per variant (a head alone takes a larger step than a
whole network) and are written in each row.

- ``smollm2-135m`` on Brown text (``task: lm``, 128-token windows of its own tokenizer): zero-shot perplexity vs
  its last two transformer blocks and final norm trained for the same data.

Figures per row: test accuracy (and perplexity for the LM) after the steps; median time per optimizer step (from the loop's per-step
``time_s`` in ``metrics.jsonl``, logging every step, the first ``WARMUP_STEPS`` dropped); load time of the
pretrained network (a fresh process: read + sha256 check + build, before training); peak RSS of the whole
process that ran the variant (``ru_maxrss``; torch and transformers imports included); trainable parameters.
With ``isolate=true`` (default outside ``--quick``) each variant runs in its own Python process so peak RSS
is its own; in-process runs report the process-wide high-water mark and say so in ``rss_scope``.
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.bench.harness import BenchContext, register_suite

__all__ = ["VARIANTS", "Variant", "pretrained_table", "step_times_s"]

log = logging.getLogger(__name__)
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Variant:
    """One row: a model section, which parameters train, and the learning rate."""

    group: str  # minilm | mobilenet-v2 (the comparison this row belongs to)
    model: str
    variant: str  # probe | full | scratch
    dataset: str
    model_section: dict[str, Any]
    lr: float
    trainable: tuple[str, ...] | None = None
    data_options: dict[str, Any] | None = None  # e.g. {"task": "lm"} for language modelling
    step: str = "train"  # or "evaluate" (zero-shot)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.variant}"


def _variants(image_size: int, max_length: int) -> list[Variant]:
    text = {"name": "minilm", "max_length": max_length}
    image = {"name": "mobilenet-v2", "image_size": image_size}
    lm = {"name": "smollm2-135m", "max_length": 2 * max_length}
    return [
        Variant("minilm", "minilm", "probe", "spamassassin", text, 1e-2, ("head",)),
        Variant("minilm", "minilm", "full", "spamassassin", text, 1e-4),
        Variant("mobilenet-v2", "mobilenet-v2", "probe", "fashion-mnist", image, 1e-2, ("head",)),
        Variant("mobilenet-v2", "mobilenet-v2", "full", "fashion-mnist", image, 1e-3),
        Variant("mobilenet-v2", "mobilenet-v2-random", "scratch", "fashion-mnist", {**image, "init": "random"}, 1e-3),
        Variant("mobilenet-v2", "resnet20", "scratch", "fashion-mnist", {"name": "resnet20"}, 1e-3),
        Variant("smollm2", "smollm2-135m", "zero-shot", "brown", lm, 1e-4, None, {"task": "lm"}, "evaluate"),
        Variant("smollm2", "smollm2-135m", "last-2-blocks", "brown", lm, 1e-4, LM_TRAINABLE, {"task": "lm"}),
    ]


#: the last two transformer blocks and the final norm of SmolLM2 (about 7% of its parameters)
LM_TRAINABLE = ("model.layers.28.*", "model.layers.29.*", "model.norm.*")
VARIANTS = tuple(v.key for v in _variants(64, 64))

# (steps, batch, test examples) per group; train examples = steps * batch (one epoch, each example seen once)
FULL = {"minilm": (60, 16, 400), "mobilenet-v2": (100, 32, 1000), "smollm2": (16, 4, 24)}
QUICK = {"minilm": (3, 8, 32), "mobilenet-v2": (3, 16, 64), "smollm2": (2, 2, 4)}


def recipe_for(v: Variant, steps: int, batch: int, test: int, seed: int, threads: int) -> dict[str, Any]:
    """The recipe of one variant: one epoch over ``steps * batch`` examples, linear LR decay, no checkpoints."""
    train: dict[str, Any] = {
        "epochs": 1, "batch_size": batch, "eval_batch_size": 128, "max_steps": steps, "num_threads": threads,
        "optimizer": {"name": "adamw", "lr": v.lr, "weight_decay": 0.0},
        "schedule": {"name": "linear", "warmup_steps": max(0, steps // 20)},
        "log_every_steps": 1, "progress": False, "checkpoint": {"every_epochs": None},
    }
    if v.trainable:
        train["trainable"] = list(v.trainable)
    data: dict[str, Any] = {"name": v.dataset, "limit_train": steps * batch, "limit_test": test}
    if v.data_options:
        data["options"] = dict(v.data_options)
    return {"name": f"bench-{v.model}-{v.variant}", "seed": seed, "step": v.step, "data": data,
            "model": dict(v.model_section), "train": train}


def step_times_s(metrics_path: str | Path, warmup: int = WARMUP_STEPS) -> list[float]:
    """Seconds per optimizer step from a run's ``metrics.jsonl`` logged every step (first ``warmup`` dropped)."""
    if not Path(metrics_path).exists():  # an evaluate-only run trains no step
        return []
    recs = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    times = [(r["step"], r["time_s"]) for r in recs if r.get("kind") == "train" and "time_s" in r]
    times.sort()
    per = [t1 - t0 for (s0, t0), (s1, t1) in itertools.pairwise(times) if s1 == s0 + 1]
    if times and times[0][0] == 1:
        per.insert(0, times[0][1])
    return per[warmup:] if len(per) > warmup else per


def _load_seconds(v: Variant, num_classes: int) -> float | None:
    """Wall time of loading the pretrained network (file read, checksum, build); None for from-scratch models."""
    from edgetune.models.pretrained import PRETRAINED, load_pretrained

    name = v.model_section["name"]
    if name not in PRETRAINED.names():
        return None
    opts = {k: val for k, val in v.model_section.items() if k not in ("name", "max_length", "image_size")}
    t0 = time.perf_counter()
    loaded = load_pretrained(name, num_classes=num_classes, image_size=v.model_section.get("image_size"), **opts)
    dt = time.perf_counter() - t0
    del loaded
    gc.collect()
    return dt


def run_variant(recipe: dict[str, Any], variant: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Load time, then the recipe's run: the figures of one row (runs in this process)."""
    import edgetune
    from edgetune.core.seed import seed_everything

    v = Variant(**{**variant, "trainable": tuple(variant["trainable"]) if variant.get("trainable") else None})
    lm = (v.data_options or {}).get("task") == "lm"
    num_classes = None if lm else 2 if v.dataset == "spamassassin" else 10
    load_s = _load_seconds(v, num_classes)
    seed_everything(int(recipe["seed"]))  # the load above drew from the global RNG (new head)
    cfg = edgetune.load_recipe(recipe, [])
    res = edgetune.run(cfg, run_dir, write_report=False, command=f"edgetune bench pretrained {v.key}")
    s = res.summary
    per = step_times_s(Path(run_dir) / "metrics.jsonl")
    return {
        "test_acc": s.get("test_acc"), "test_loss": s.get("test_loss"), "test_ppl": s.get("test_ppl"),
        "steps": s.get("steps"),
        "train_examples": s.get("train_examples"), "step_time_ms_median": statistics.median(per) * 1e3 if per else None,
        "step_time_ms_min": min(per) * 1e3 if per else None, "timed_steps": len(per), "load_s": load_s,
        "peak_rss_mb": s.get("peak_rss_mb"), "trainable_parameters": s.get("trainable_parameters"),
        "parameters": s.get("parameters"), "wall_time_s": s.get("wall_time_s"),
        "latency_ms_batch1": s.get("latency_ms_batch1"),
    }


def _child_main(argv: list[str]) -> None:
    """``python -c ...`` entry of an isolated variant: argv = [job.json, out.json]."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    job = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(int(job["threads"]))
    out = run_variant(job["recipe"], job["variant"], job["run_dir"])
    Path(argv[1]).write_text(json.dumps(out))


def _run_isolated(recipe: dict[str, Any], variant: dict[str, Any], run_dir: Path, threads: int) -> dict[str, Any]:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    job, out = run_dir.with_suffix(".job.json"), run_dir.with_suffix(".out.json")
    job.write_text(json.dumps({"recipe": recipe, "variant": variant, "run_dir": str(run_dir), "threads": threads}))
    code = "import sys; from edgetune.bench.pretrained import _child_main; _child_main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, str(job), str(out)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrained bench variant {variant['model']}/{variant['variant']} failed in its own "
                           f"process (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@register_suite(
    "pretrained",
    summary="MiniLM / MobileNetV2 / SmolLM2: probe vs fine-tune vs scratch (accuracy or ppl, step time, load, RSS)",
    options={"only": "variants to run, e.g. [minilm/probe, resnet20/scratch] (default all)",
             "image_size": "MobileNetV2 input side in px (default 64; quick 32)",
             "max_length": "MiniLM tokens per text (default 64; quick 32)",
             "steps": "optimizer steps per variant (default 60 text / 100 image)",
             "isolate": "run each variant in its own process, so peak RSS is its own (default: not quick)"},
    table=lambda path: pretrained_table(path),
)
def _pretrained_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    image_size = int(ctx.option("image_size", 32 if ctx.quick else 64))
    max_length = int(ctx.option("max_length", 32 if ctx.quick else 64))
    only = set(_as_list(ctx.option("only", list(VARIANTS))))
    unknown = only - set(VARIANTS)
    if unknown:
        from edgetune.core.errors import ConfigError

        raise ConfigError(f"pretrained suite: unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    isolate = bool(ctx.option("isolate", not ctx.quick))
    threads = torch.get_num_threads()
    sizes = QUICK if ctx.quick else FULL
    for v in _variants(image_size, max_length):
        if v.key not in only:
            continue
        steps, batch, test = sizes[v.group]
        if ctx.option("steps") is not None:
            steps = int(ctx.option("steps"))
        recipe = recipe_for(v, steps, batch, test, ctx.seed, threads)
        run_dir = Path(ctx.out_dir) / f"{v.model}-{v.variant}"
        variant = {"group": v.group, "model": v.model, "variant": v.variant, "dataset": v.dataset,
                   "model_section": v.model_section, "lr": v.lr, "trainable": list(v.trainable or []),
                   "data_options": v.data_options, "step": v.step}
        log.info("pretrained: %s on %s (%d steps x %d)%s", v.key, v.dataset, steps, batch,
                 " in its own process" if isolate else "")
        fig = _run_isolated(recipe, variant, run_dir, threads) if isolate else run_variant(recipe, variant, run_dir)
        yield {"group": v.group, "model": v.model, "variant": v.variant, "dataset": v.dataset,
               "input": f"{v.model_section['max_length']} tokens" if "max_length" in v.model_section else
               f"{v.model_section.get('image_size') or 28} px",
               "batch_size": batch, "lr": v.lr, "test_examples": test, **fig,
               "rss_scope": "own process" if isolate else "process-wide high-water mark",
               "torch_threads": threads}


def _f(x: str | None, fmt: str) -> str:
    try:
        return format(float(x), fmt) if x not in (None, "") else "–"
    except ValueError:
        return str(x)


def pretrained_table(csv_path: str | Path) -> str:
    """Markdown of the newest full (non-quick) run of each (model, variant, input), quick rows when none."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    full = [r for r in rows if r.get("quick") in ("False", "false", "0")]
    rows = full or rows
    latest: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:  # later rows win
        latest[(r.get("group", ""), r["model"], r["variant"], r.get("input", ""))] = r
    order = {"probe": 0, "full": 1, "scratch": 2, "zero-shot": 0, "last-2-blocks": 1}
    lines = [("| group | model | variant | data | input | train ex. | steps | batch | lr | test acc | test ppl | "
              "step (ms, median / min) | load (s) | peak RSS (MB) | trainable params | threads | git | date |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (_g, _m, _v, _i), r in sorted(latest.items(), key=lambda kv: (kv[0][0], order.get(kv[0][2], 9))):
        lines.append(
            f"| {r.get('group', '')} | {r['model']} | {r['variant']} | {r['dataset']} | {r.get('input', '')} | "
            f"{r.get('train_examples', '')} | {r.get('steps', '')} | {r.get('batch_size', '')} | {r.get('lr', '')} | "
            f"{_f(r.get('test_acc'), '.4f')} | {_f(r.get('test_ppl'), '.1f')} | {_f(r.get('step_time_ms_median'), '.0f')} / {_f(r.get('step_time_ms_min'), '.0f')} | "
            f"{_f(r.get('load_s'), '.2f')} | "
            f"{_f(r.get('peak_rss_mb'), '.0f')} | {r.get('trainable_parameters', '')} | {r.get('torch_threads', '')} | "
            f"{(r.get('git_sha') or '')[:8]} | {(r.get('timestamp_utc') or '')[:16]} |")
    note = ("\nLinear probe = only the new head trains (`train.trainable: [head]`); full = every parameter; "
            "scratch = random init (MobileNetV2 at the same size and input; resnet20 at 28 px); SmolLM2: causal LM on Brown "
            "text in 128-token windows, zero-shot vs its last two blocks trained (test acc = next-token accuracy). Same seed, data subset, batch and steps within a group. "
            "Step time: median (and fastest) over the run's steps after the first two (per-step `time_s` of "
            "metrics.jsonl); a median far above the minimum means the shared machine was busy. "
            "Load: read + sha256 + build in a fresh process. Peak RSS: the variant's own process when "
            "`rss_scope` is 'own process'. Timings on a shared machine: compare within one run.\n")
    return "\n".join(lines) + "\n" + note
