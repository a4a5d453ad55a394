"""Bench suite ``incremental-etf``: does a backbone trained against a fixed simplex-ETF classifier transfer better?

Claim tested (Tiomoko Ali, Michieli, Moon, Kim, Ozay, ICASSP 2024, arXiv 2402.18614): training with the last layer
frozen to a simplex ETF removes class-covariance information from the features, and such backbones transfer
better, above all out of domain. Protocol, per source domain and backbone seed:

1. Train the same network (``convnet``) on the source's base classes with four heads (:func:`fit_backbone`,
   epoch chosen on held-out base training data): ``cosine`` (learnable cosine head), ``etf`` (fixed ETF over the
   base classes), ``etf-all`` (fixed ETF with slots pre-allocated for every class of the source, NC-FSCIL style),
   ``linear`` (the plain ``nn.Linear`` head).
2. Freeze it; its head's input ``(N, D)`` is the feature. Target images are resized to the source's resolution
   (``resize=source``, as the paper resizes every set to the pretraining size) or kept as they are (``native``).
3. Classify with cosine nearest prototypes (mean of L2-normalized features) on each target: the source's own
   novel classes (in domain) and other data sets (out of domain): N-way K-shot episodes (5-way 1- and 5-shot,
   15 queries, from the target's test split; mean and 95% CI over episodes; the same episodes for every head),
   and all-class NCM with K shots per class from the target's train split (``ncm-K``; ``ncm-all`` uses it all).
4. Neural-collapse diagnostics of the source's base training features (:func:`collapse_stats`) and of the
   frozen ETF frame after training (geometry error, change from the frame it was built with).

Rows: ``kind=transfer`` (source, head, backbone_seed, target, domain, protocol, acc, ci95, ...) and
``kind=collapse`` (one per trained backbone). ``edgetune bench incremental-etf`` writes the CSV, a Markdown table
(mean +/- std over seeds, and ETF minus cosine paired by seed) and a bar plot.
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.bench.harness import DEFAULT_RESULTS_DIR, BenchContext, register_suite, run_header
from edgetune.bench.plots import pyplot, save_figure
from edgetune.core.errors import ConfigError
from edgetune.data import DataConfig, load_dataset
from edgetune.data.batches import compose
from edgetune.data.splits import few_shot_episode
from edgetune.incremental.bench.backbones import fit_backbone
from edgetune.incremental.bench.fscil import merge_options
from edgetune.incremental.etf import etf_geometry_error, simplex_etf
from edgetune.incremental.features import Backbone
from edgetune.incremental.heads import ETFHead
from edgetune.incremental.transfer_metrics import (
    collapse_stats,
    effective_rank,
    episode_accuracy,
    mean_ci95,
    ncm_accuracy,
)

__all__ = ["HEADS", "SOURCES", "last_run", "plot_transfer"]

log = logging.getLogger(__name__)

HEADS = ("cosine", "etf", "etf-all", "linear")
_TRAIN = {"batch_size": 64, "optimizer": {"name": "adam", "lr": 3e-3, "weight_decay": 5e-4}}
#: source -> data, base classes, model, training and targets (name -> data; ``novel``: the source's other classes)
SOURCES: dict[str, dict[str, Any]] = {
    "synglyph": {"data": {"name": "synglyph", "val_fraction": 0.0667,
                          "options": {"train_per_class": 60, "test_per_class": 50}},
                 "base": 60, "model": ("convnet", {"widths": [16, 32, 128]}),
                 "train": {"epochs": 5, **_TRAIN},
                 "targets": {"synglyph-novel": "novel",
                             "fashion-mnist": {"name": "fashion-mnist", "limit_train": 2000, "limit_test": 2000},
                             "digits": {"name": "digits"}}},
    "fashion-mnist": {"data": {"name": "fashion-mnist", "val_fraction": 0.05, "limit_train": 6000,
                               "limit_test": 2000},
                      "base": 6, "model": ("convnet", {"widths": [16, 32, 128]}), "train": {"epochs": 4, **_TRAIN},
                      "targets": {"fashion-mnist-novel": "novel",
                                  "synglyph": {"name": "synglyph", "options": {"train_per_class": 20,
                                                                                "test_per_class": 20}},
                                  "digits": {"name": "digits"}}},
}
QUICK: dict[str, dict[str, Any]] = {
    "synglyph": {"data": {"options": {"num_classes": 30, "train_per_class": 30, "test_per_class": 20}}, "base": 20,
                 "model": ("convnet", {"widths": [16, 32, 32]}),
                 "train": {"epochs": 6, "batch_size": 32, "optimizer": {"name": "adam", "lr": 5e-3}},
                 "targets": {"synglyph-novel": "novel",
                             "fashion-mnist": {"name": "fashion-mnist", "limit_train": 600, "limit_test": 400},
                             "digits": {"name": "digits"}}},
    "fashion-mnist": {"data": {"limit_train": 3000, "limit_test": 1000}, "train": {"epochs": 3},
                      "targets": {"fashion-mnist-novel": "novel",
                                  "synglyph": {"name": "synglyph", "options": {"train_per_class": 10,
                                                                                "test_per_class": 20}},
                                  "digits": {"name": "digits"}}},
}
_WAYS, _QUERIES = 5, 15


# ------------------------------------------------------------------------------------------------ plumbing
class _Resize:
    """Batch transform: images ``(B, C, H, W)`` of a list batch resized (bilinear, antialiased) to ``size``."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, batch: Any) -> Any:
        x = batch[0]
        if tuple(x.shape[-2:]) == self.size:
            return batch
        x = F.interpolate(x.float(), size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return [x, *batch[1:]]


def _episodes(labels: Tensor, classes: list[int], shots: int, count: int, seed: int) -> tuple[Tensor, Tensor]:
    eps = [few_shot_episode(labels, min(_WAYS, len(classes)), shots, _QUERIES, seed=seed + i, classes=classes)
           for i in range(count)]
    return torch.stack([e.support for e in eps]), torch.stack([e.query for e in eps])


def _load_targets(src: dict[str, Any], resize: str) -> dict[str, dict[str, Any]]:
    """Each target's bundle, classes, domain, transform and the episodes every head is tested on."""
    out = {}
    size = None
    for name, spec in src["targets"].items():
        if spec == "novel":
            data = {k: v for k, v in src["data"].items() if k != "val_fraction"}
            bundle = load_dataset(DataConfig(**data, seed=0))
            classes, domain = list(range(src["base"], bundle.num_classes)), "in"
            size = tuple(bundle.input_shape[-2:])
        else:
            bundle = load_dataset(DataConfig(**spec, seed=0))
            classes, domain = list(range(bundle.num_classes)), "out"
        out[name] = {"bundle": bundle, "classes": classes, "domain": domain}
    for t in out.values():
        b = t["bundle"]
        if b.input_shape[0] != next(iter(out.values()))["bundle"].input_shape[0]:
            raise ConfigError(f"target {b.name} has {b.input_shape[0]} channels, the source another number; "
                              "pick targets with the source's channels")
        t["transform"] = compose(b.transform, _Resize(size)) if resize == "source" and size else b.transform
    return out


def _features(net: nn.Module, target: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    bb = Backbone(net, transform=target["transform"], device=device)
    (ztr, ytr), (zte, yte) = bb.extract(target["bundle"].train), bb.extract(target["bundle"].test)
    keep_tr = torch.isin(ytr, torch.tensor(target["classes"]))
    keep_te = torch.isin(yte, torch.tensor(target["classes"]))
    return {"ztr": ztr[keep_tr], "ytr": ytr[keep_tr], "zte": zte[keep_te], "yte": yte[keep_te], "all_te": zte,
            "all_yte": yte}


def _transfer_rows(f: dict[str, Tensor], target: dict[str, Any], eps: dict[int, tuple[Tensor, Tensor]],
                   draws: int, seed: int) -> Iterable[dict[str, Any]]:
    base = {"domain": target["domain"], "feature_dim": int(f["zte"].shape[1]),
            "feature_eff_rank": effective_rank(f["zte"])}
    ways = min(_WAYS, len(target["classes"]))
    for shots, (sup, qry) in eps.items():
        acc, ci = mean_ci95(episode_accuracy(f["all_te"], sup, qry, shots, _QUERIES))
        yield {**base, "protocol": f"{ways}w{shots}s", "acc": acc, "ci95": ci, "n": len(sup),
               "chance": 1.0 / ways}
    for shots in (1, 5, None):
        accs = [ncm_accuracy(f["ztr"], f["ytr"], f["zte"], f["yte"], target["classes"], shots, seed=1000 * seed + d)
                for d in range(draws if shots is not None else 1)]
        acc, ci = mean_ci95(accs)
        yield {**base, "protocol": f"ncm-{shots or 'all'}", "acc": acc, "ci95": ci, "n": len(accs),
               "chance": 1.0 / len(target["classes"])}


def _collapse_row(net: nn.Module, bundle: Any, device: torch.device) -> dict[str, Any]:
    z, y = Backbone(net, transform=bundle.transform, device=device).extract(bundle.train)
    head = net.get_submodule("head")
    vectors = head.class_vectors if hasattr(head, "class_vectors") else head.weight.detach()
    row: dict[str, Any] = collapse_stats(z, y, vectors.cpu())
    if isinstance(head, ETFHead):
        fresh = simplex_etf(head.total_classes, head.in_features, seed=head.seed, dtype=head.etf.dtype)
        row["head_geometry_error"] = etf_geometry_error(head.etf)
        row["head_frame_change"] = float((head.etf.cpu() - fresh).abs().max())
        row["head_slots"] = head.total_classes
    return row


def _source_rows(name: str, src: dict[str, Any], heads: Sequence[str], seeds: range, episodes: int, draws: int,
                 resize: str, ctx: BenchContext) -> Iterable[dict[str, Any]]:
    targets = _load_targets(src, resize)
    for t in targets.values():
        labels = t["bundle"].test.tensors[1]
        t["episodes"] = {s: _episodes(labels, t["classes"], s, episodes, seed=10_000 * (s + 1)) for s in (1, 5)}
    total = next(t["bundle"].num_classes for t in targets.values() if t["domain"] == "in")
    data = DataConfig(**src["data"], classes=list(range(src["base"])), seed=0)
    model, opts = src["model"]
    for seed in seeds:
        for head in heads:
            net, bundle, summary = fit_backbone(data, model, opts, src["train"], head=head.split("-")[0],
                                                total_classes=total if head == "etf-all" else None, seed=seed,
                                                device=ctx.device)
            common = {"source": name, "head": head, "backbone_seed": seed, "source_test_acc": summary.get("test_acc")}
            yield {"kind": "collapse", **common, **_collapse_row(net, bundle, ctx.device)}
            for tname, t in targets.items():
                f = _features(net, t, ctx.device)
                for row in _transfer_rows(f, t, t["episodes"], draws, seed):
                    yield {"kind": "transfer", **common, "target": tname, **row}


def _split_option(ctx: BenchContext, name: str, default: Sequence[str], allowed: Sequence[str]) -> list[str]:
    value = ctx.option(name, ",".join(default))
    names = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigError(f"incremental-etf: unknown {name} {bad}; choose from {', '.join(allowed)}")
    return names


# --------------------------------------------------------------------------------------------- table, plot
def last_run(csv_path: Path) -> list[dict[str, str]]:
    """The rows of the latest run of each (source, backbone seed) in the CSV (runs of the last row's ``quick``
    kind), so sources and seeds measured by separate runs (``sources=...``, ``first_seed=...``) are read together."""
    import csv

    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    quick = rows[-1]["quick"]
    latest: dict[tuple[str, str], str] = {}
    for r in rows:
        if r["quick"] == quick:
            latest[(r["source"], r["backbone_seed"])] = r["timestamp_utc"]
    return [r for r in rows if r["quick"] == quick and latest[(r["source"], r["backbone_seed"])] == r["timestamp_utc"]]


def _pm(vals: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{scale * vals[0]:.{digits}f}"
    return f"{scale * statistics.fmean(vals):.{digits}f} ± {scale * statistics.stdev(vals):.{digits}f}"


def table(csv_path: Path) -> str:
    """Markdown of the last run in the CSV: transfer accuracy per (source, target, protocol) and head, mean ± std
    over backbone seeds, with ETF − cosine paired by seed; then the collapse diagnostics per (source, head)."""
    run = last_run(csv_path)
    if not run:
        return ""
    heads = [h for h in HEADS if any(r["head"] == h for r in run)]
    r0 = run[0]
    stamps = ", ".join(sorted({r["timestamp_utc"] for r in run}))
    lines = [(f"{run_header(r0, stamps)}; backbone seeds "
             f"{sorted({int(r['backbone_seed']) for r in run})}. Accuracy in %, mean ± std over seeds; episodes: "
             "N-way K-shot, 15 queries, the same episodes for every head; ncm-K: all target classes, K shots each."),
             "", "| source | target | domain | protocol | " + " | ".join(heads)
             + " | etf − cosine | etf-all − cosine |", "|---" * (len(heads) + 6) + "|"]
    tr = [r for r in run if r["kind"] == "transfer"]
    keys = list(dict.fromkeys((r["source"], r["target"], r["domain"], r["protocol"]) for r in tr))
    for key in keys:
        by = {(r["head"], r["backbone_seed"]): float(r["acc"]) for r in tr
              if (r["source"], r["target"], r["domain"], r["protocol"]) == key}
        cells = [_pm([v for (h, _), v in by.items() if h == head]) for head in heads]
        for other in ("etf", "etf-all"):
            diffs = [v - by[("cosine", s)] for (h, s), v in by.items() if h == other and ("cosine", s) in by]
            cells.append(_pm(diffs))
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
    stats = ("source_test_acc", "nc1", "within_between", "cos_mean", "cos_std", "cos_etf", "equinorm", "self_duality",
             "eff_rank", "within_eff_rank", "head_geometry_error")
    lines += ["", ("Neural-collapse diagnostics of the base training features (mean ± std over seeds; source test "
                   "accuracy in %; head_geometry_error: the ETF frame after training)."), "",
              "| source | head | " + " | ".join(stats) + " |", "|---" * (len(stats) + 2) + "|"]
    co = [r for r in run if r["kind"] == "collapse"]
    for key in dict.fromkeys((r["source"], r["head"]) for r in co):
        rs = [r for r in co if (r["source"], r["head"]) == key]
        cells = []
        for s in stats:
            vals = [float(r[s]) for r in rs if r.get(s) not in (None, "")]
            if s == "head_geometry_error":
                cells.append(f"{max(vals):.1e}" if vals else "")
            else:
                cells.append(_pm(vals, 100.0 if s == "source_test_acc" else 1.0, 1 if s == "source_test_acc" else 3))
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_transfer(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per (source, target): accuracy per protocol, a bar per head (mean over seeds, std as error)."""
    plt = pyplot()
    tr = [r for r in rows if r.get("kind") == "transfer"]
    panels = list(dict.fromkeys((r["source"], r["target"], r["domain"]) for r in tr))
    heads = [h for h in HEADS if any(r["head"] == h for r in tr)]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, (src, tgt, dom) in zip(axes.flat, panels, strict=False):
        sel = [r for r in tr if (r["source"], r["target"]) == (src, tgt)]
        protos = list(dict.fromkeys(r["protocol"] for r in sel))
        here = [h for h in heads if any(r["head"] == h for r in sel)]
        width = 0.8 / len(here)
        for i, head in enumerate(here):
            means, errs = [], []
            for p in protos:
                v = [float(r["acc"]) for r in sel if r["head"] == head and r["protocol"] == p]
                means.append(statistics.fmean(v))
                errs.append(statistics.stdev(v) if len(v) > 1 else 0.0)
            ax.bar([j + (i - (len(here) - 1) / 2) * width for j in range(len(protos))], means, width, yerr=errs,
                   label=head, capsize=2)
        ax.set_xticks(range(len(protos)), protos, fontsize=8)
        ax.set_title(f"{src} -> {tgt} ({dom} domain)", fontsize=9)
        ax.set_ylabel("accuracy")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


@register_suite("incremental-etf", "fixed simplex-ETF vs cosine / linear heads: transfer of the frozen backbone "
                "to novel in-domain classes and other data sets (NCM episodes, all-class NCM), collapse diagnostics",
                options={"sources": "comma-separated subset of synglyph,fashion-mnist (default both; quick: synglyph)",
                         "heads": "comma-separated subset of cosine,etf,etf-all,linear (default all)",
                         "seeds": "number of backbone seeds (default 3; 1 when quick)",
                         "first_seed": "first backbone seed (default 0): add seeds to a CSV by separate runs",
                         "episodes": "episodes per N-way K-shot protocol (default 600; 40 when quick)",
                         "draws": "shot draws of the all-class ncm-1 / ncm-5 protocols (default 10; 2 when quick)",
                         "epochs": "training epochs of every source backbone (default: the source's, 5 / 4)",
                         "resize": "source (default: target images resized to the source's size) or native",
                         "plot_dir": "where the plot goes (default bench/results; quick: the scratch folder)"},
                table=table)
def incremental_etf_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    sources = _split_option(ctx, "sources", ["synglyph"] if ctx.quick else list(SOURCES), list(SOURCES))
    heads = _split_option(ctx, "heads", HEADS, HEADS)
    resize = str(ctx.option("resize", "source"))
    if resize not in ("source", "native"):
        raise ConfigError(f"incremental-etf: resize={resize!r}; use source or native")
    first = int(ctx.option("first_seed", 0))
    seeds = range(first, first + int(ctx.option("seeds", 1 if ctx.quick else 3)))
    episodes = int(ctx.option("episodes", 40 if ctx.quick else 600))
    draws = int(ctx.option("draws", 2 if ctx.quick else 10))
    rows: list[dict[str, Any]] = []
    for name in sources:
        src = merge_options(SOURCES[name], QUICK[name]) if ctx.quick else copy.deepcopy(SOURCES[name])
        if ctx.quick:
            src["targets"] = QUICK[name]["targets"]
        if ctx.option("epochs") is not None:
            src["train"]["epochs"] = int(ctx.option("epochs"))
        for row in _source_rows(name, src, heads, seeds, episodes, draws, resize, ctx):
            rows.append(row)
            yield row
    plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if ctx.quick else DEFAULT_RESULTS_DIR))
    plot_transfer(rows, plot_dir / "incremental-etf.png",
                  f"frozen backbones, cosine NCM on other classes / data sets (seeds {list(seeds)}, resize={resize})")
