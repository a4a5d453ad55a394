"""Bench suite ``incremental``: the few-shot class-incremental protocols of the research notes, measured side by
side on one backbone per seed.

Protocols (``protocols`` option): ``digits`` (P1: 6 base digits, then 4 sessions of 1-way 5-shot, an MLP),
``synglyph`` (P2: 60 base glyph classes, then 8 sessions of 5-way 5-shot, a small CNN), ``fashion-mnist`` (6 base
classes + 4 x 1-way 5-shot, a small CNN trained on the base classes) and ``fashion-mnist-mobilenet`` (the same
sessions on frozen ImageNet MobileNetV2 features, nothing trained). Learners on the same features: NCM cosine
prototypes, + TEEN calibration, mean+std and mean+std+skewness moment pooling of the last feature map, NCM on a
backbone trained with a fixed ETF head, and naive fine-tuning of the whole network on each session's shots (the
cautionary baseline). Each row is one (protocol, learner, seed), averaged over ``draws`` shot draws.
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.bench.harness import (
    DEFAULT_RESULTS_DIR,
    BenchContext,
    last_run_rows,
    register_suite,
    run_header,
)
from edgetune.data import DataConfig, class_incremental_split, load_dataset
from edgetune.data.batches import take, to_device
from edgetune.data.splits import IncrementalSplit
from edgetune.incremental.bench.backbones import fit_backbone
from edgetune.incremental.features import Backbone
from edgetune.incremental.heads import CosineHead
from edgetune.incremental.learner import IncrementalLearner, LearnerConfig
from edgetune.incremental.plots import plot_sessions
from edgetune.incremental.sessions import run_sessions, summarize_sessions

__all__ = ["PROTOCOLS", "finetune_sessions", "merge_options"]

log = logging.getLogger(__name__)

#: protocol -> data, base classes, sessions (ways, count), shots, model and training
PROTOCOLS: dict[str, dict[str, Any]] = {
    "digits": {"data": {"name": "digits", "val_fraction": 0.1}, "base": 6, "sessions": (1, 4), "shots": 5,
               "model": ("mlp", {"widths": [128, 64], "batch_norm": True}), "layer": None,
               "train": {"epochs": 40, "batch_size": 128, "optimizer": {"name": "adam", "lr": 1e-3,
                                                                         "weight_decay": 5e-4}}},
    "synglyph": {"data": {"name": "synglyph", "val_fraction": 0.0667}, "base": 60, "sessions": (5, 8), "shots": 5,
                 "model": ("convnet", {}), "layer": "blocks",
                 "train": {"epochs": 5, "batch_size": 128, "optimizer": {"name": "adam", "lr": 2e-3,
                                                                          "weight_decay": 5e-4}}},
    "fashion-mnist": {"data": {"name": "fashion-mnist", "val_fraction": 0.05}, "base": 6, "sessions": (1, 4),
                      "shots": 5, "model": ("convnet", {}), "layer": "blocks",
                      "train": {"epochs": 3, "batch_size": 128, "optimizer": {"name": "adam", "lr": 2e-3,
                                                                               "weight_decay": 5e-4}}},
    "fashion-mnist-mobilenet": {"data": {"name": "fashion-mnist", "val_fraction": 0.05, "limit_train": 12000,
                                         "limit_test": 3000},
                                "base": 6, "sessions": (1, 4), "shots": 5, "pretrained": "mobilenet-v2",
                                "image_size": 64, "layer": "features"},
}
QUICK = {"digits": {"train": {"epochs": 15}}, "synglyph": {"data": {"options": {"train_per_class": 60,
                                                                                  "test_per_class": 30}},
                                                              "train": {"epochs": 2}},
         "fashion-mnist": {"data": {"limit_train": 6000, "limit_test": 2000}, "train": {"epochs": 1}},
         "fashion-mnist-mobilenet": {"data": {"limit_train": 1200, "limit_test": 600}}}
_STATS = ("acc_first", "acc_last", "acc_avg", "performance_drop", "last_base_acc", "last_novel_acc", "last_hm")


def merge_options(p: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(p)
    for k, v in over.items():
        out[k] = merge_options(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _sessions(learner: IncrementalLearner, feats: tuple[Any, Any], splits: list[IncrementalSplit]
              ) -> list[dict[str, Any]]:
    """Replay every shot draw on a fresh copy of ``learner``'s config; the records averaged over draws."""
    runs = [run_sessions(IncrementalLearner(None, learner.config), feats[0], feats[1], s) for s in splits]
    return [{k: (statistics.fmean(r[k] for r in recs) if isinstance(recs[0][k], float) else recs[0][k])
             for k in recs[0] if recs[0][k] is not None} for recs in zip(*runs, strict=True)]


@torch.no_grad()
def _accuracy(model: nn.Module, split: Any, idx: Tensor, transform: Any, device: torch.device) -> float:
    correct = 0
    for i in range(0, len(idx), 512):
        batch = to_device(take(split, idx[i:i + 512]), device)
        batch = transform(batch) if transform is not None else batch
        correct += int((model(batch[0]).argmax(1) == batch[-1]).sum())
    return correct / max(1, len(idx))


def finetune_sessions(model: nn.Module, bundle: Any, split: IncrementalSplit, *, steps: int = 30, lr: float = 0.01,
                      device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Naive fine-tuning: after the base session, each session grows the cosine head by its new classes and trains
    the whole network for ``steps`` SGD steps on that session's shots alone (no replay), then tests all seen
    classes. The baseline whose collapse FSCIL methods avoid."""
    device = torch.device(device)
    net = copy.deepcopy(model).to(device)
    out = [{"session": 0, "acc": _accuracy(net.eval(), bundle.test, split.test[0], bundle.transform, device)}]
    for s in range(1, split.num_sessions):
        old = net.head
        seen = len(split.seen_classes(s))
        head = CosineHead(old.in_features, seen, scale=float(old.scale)).to(device)
        with torch.no_grad():
            head.weight[: old.num_classes] = old.weight
        net.head = head
        batch = to_device(take(bundle.train, split.train[s]), device)
        batch = bundle.transform(batch) if bundle.transform is not None else batch
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        net.train()
        for _ in range(steps):
            loss = F.cross_entropy(net(batch[0]), batch[-1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append({"session": s, "acc": _accuracy(net.eval(), bundle.test, split.test[s], bundle.transform, device)})
    return out


def _pretrained_backbone(p: dict[str, Any], device: torch.device) -> tuple[nn.Module, Any]:
    from edgetune.models.pretrained import load_pretrained

    loaded = load_pretrained(p["pretrained"], image_size=p["image_size"])
    return loaded.model.to(device).eval(), loaded.transform


def _protocol_rows(name: str, p: dict[str, Any], seed: int, draws: int, ctx: BenchContext
                   ) -> Iterable[dict[str, Any]]:
    from edgetune.data.batches import compose

    full = load_dataset(DataConfig(**p["data"], seed=0))
    base = list(range(p["base"]))
    ys = full.train.tensors[1], full.test.tensors[1]
    splits = [class_incremental_split(*ys, base, p["sessions"], p["shots"], seed=1000 * seed + d)
              for d in range(draws)]
    backbones: dict[str, tuple[nn.Module, Any, dict[str, Any]]] = {}
    if "pretrained" in p:
        net, tf = _pretrained_backbone(p, ctx.device)
        backbones["frozen"] = (net, compose(full.transform, tf), {})
    else:
        data = DataConfig(**p["data"], classes=base, seed=0)
        model, opts = p["model"]
        for head in (("cosine", "etf") if name != "fashion-mnist" else ("cosine",)):
            net, _, summary = fit_backbone(data, model, opts, p["train"], head=head,
                                           total_classes=full.num_classes if head == "etf" else None, seed=seed,
                                           device=ctx.device)
            backbones[head] = (net, full.transform, summary)
    curves: dict[str, list[dict[str, Any]]] = {}
    for head, (net, tf, summary) in backbones.items():
        variants: list[tuple[str, Backbone, LearnerConfig]] = [
            ("ncm" if head != "etf" else "etf-ncm", Backbone(net, transform=tf, device=ctx.device), LearnerConfig())]
        if head != "etf":
            variants.append(("teen", variants[0][1], LearnerConfig(calibration="teen")))
            if p.get("layer"):
                for orders in ((1, 2), (1, 2, 3)):
                    bb = Backbone(net, layer=p["layer"], orders=orders, transform=tf, device=ctx.device)
                    variants.append((f"moments{''.join(map(str, orders))}", bb, LearnerConfig()))
        feats: dict[int, tuple[Any, Any]] = {}
        for label, bb, cfg in variants:
            key = id(bb)
            if key not in feats:
                feats[key] = (bb.extract(full.train), bb.extract(full.test))
            recs = _sessions(IncrementalLearner(None, cfg), feats[key], splits)
            curves[label] = recs
            yield {"protocol": name, "learner": label, "backbone_seed": seed, "draws": draws,
                   "backbone_test_acc": summary.get("test_acc"), "feature_dim": int(feats[key][0][0].shape[1]),
                   **summarize_sessions(recs), "sessions": [round(r["acc"], 4) for r in recs]}
        if head == "cosine" and name in ("digits", "synglyph"):
            accs = [statistics.fmean(r["acc"] for r in rs) for rs in zip(*(finetune_sessions(net, full, s,
                                                                                               device=ctx.device)
                                                                              for s in splits), strict=True)]
            curves["naive fine-tuning"] = [{"session": i, "acc": a} for i, a in enumerate(accs)]
            yield {"protocol": name, "learner": "finetune", "backbone_seed": seed, "draws": draws,
                   "backbone_test_acc": summary.get("test_acc"), "acc_first": accs[0], "acc_last": accs[-1],
                   "acc_avg": statistics.fmean(accs), "performance_drop": accs[0] - accs[-1],
                   "sessions": [round(a, 4) for a in accs]}
    if seed == 0:
        plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if ctx.quick else DEFAULT_RESULTS_DIR))
        plot_sessions(curves, plot_dir / f"incremental-{name}.png",
                      f"{name}: accuracy per session (seed 0, {draws} draws)")


def table(csv_path: Path) -> str:
    """Markdown: one row per (protocol, learner), mean +/- std over seeds of the last run in the CSV."""
    run = last_run_rows(csv_path)
    if not run:
        return ""
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in run:
        groups.setdefault((r["protocol"], r["learner"]), []).append(r)
    lines = [(f"{run_header(run[0])}; mean over backbone seeds {sorted({r['backbone_seed'] for r in run})}, "
              f"each the mean of {run[0]['draws']} shot draws."), "",
             "| protocol | learner | s0 | last | avg | drop | last base | last novel | last hm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (proto, learner), rs in groups.items():
        cells = []
        for k in _STATS:
            vals = [float(r[k]) for r in rs if r.get(k) not in (None, "")]
            if not vals:
                cells.append("")
            elif len(vals) > 1:
                cells.append(f"{100 * statistics.fmean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}")
            else:
                cells.append(f"{100 * vals[0]:.1f}")
        lines.append(f"| {proto} | {learner} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@register_suite("incremental", "few-shot class-incremental protocols (digits, SynGlyph-100, Fashion-MNIST with an "
                "edgetune backbone and frozen MobileNetV2): NCM, TEEN, moments, ETF, naive fine-tuning",
                options={"protocols": "comma-separated subset of digits,synglyph,fashion-mnist,"
                                      "fashion-mnist-mobilenet (default all)",
                         "seeds": "number of backbone seeds (default 2; 1 when quick)",
                         "draws": "shot draws per seed (default 3; 1 when quick)",
                         "plot_dir": "where the per-protocol plots go (default bench/results; quick: the scratch folder)"},
                table=table)
def incremental_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    names = str(ctx.option("protocols", ",".join(PROTOCOLS))).split(",")
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        from edgetune.core.errors import ConfigError

        raise ConfigError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    seeds = int(ctx.option("seeds", 1 if ctx.quick else 2))
    draws = int(ctx.option("draws", 1 if ctx.quick else 3))
    for name in names:
        p = merge_options(PROTOCOLS[name], QUICK.get(name, {})) if ctx.quick else PROTOCOLS[name]
        for seed in range(seeds):
            yield from _protocol_rows(name, p, seed, draws, ctx)
