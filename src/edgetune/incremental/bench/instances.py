"""Bench suite ``incremental-instances``: few-shot personal instance recognition with the object-conditioned bag
of instances (OBoI, Michieli et al., ICASSP 2024) on generated glyph instances
(:mod:`edgetune.data.glyph_instances`), protocol "1SAS" (one shot from every sequence of every instance, the
other frames are the test set).

Per backbone seed: the data set (seed), a :class:`~edgetune.models.convnet.ConvNet` trained on object-level base
classes disjoint from the test objects (box crops of :func:`~edgetune.data.glyph_instances.base_frames`), and,
when its weights are installed, frozen ImageNet MobileNetV2 (blocks 0-13, stride 16) on the box crops upscaled
4x. The detector is simulated by the frames' boxes (the region is cropped) and the object class comes from an
oracle or from the nearest object prototype. In the same run, on the same features, at 2, 3 and 5 instances per
object class: a linear head fine-tuned on the shots (a few SGD steps; and a converged one), nearest prototype over
all instances with global average pooling (SimpleShot-like, centred) and with mean + std, the bag with GAP,
with (1, 2) and (1, 2, 3) statistics, and the bag without centering.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
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
from edgetune.bench.plots import pyplot, save_figure
from edgetune.core.errors import ConfigError, DataError
from edgetune.data.glyph_instances import (
    GlyphInstances,
    GlyphInstancesConfig,
    base_frames,
    generate_glyph_instances,
    one_shot_all_sequences,
)
from edgetune.incremental.instances import BagOfInstances, crop_regions, region_moments
from edgetune.models.convnet import ConvNet

__all__ = ["METHODS", "finetune_accuracy", "method_rows", "table", "train_convnet", "write_plot"]

log = logging.getLogger(__name__)

#: (method label, orders, conditioned, centred); each bag method is run with an oracle and a predicted object class
METHODS: tuple[tuple[str, tuple[int, ...], bool, bool], ...] = (
    ("prototypes, all instances (GAP)", (1,), False, True),
    ("prototypes, all instances (1,2)", (1, 2), False, True),
    ("bag (GAP)", (1,), True, True),
    ("bag + moments (1,2)", (1, 2), True, True),
    ("bag + moments (1,2,3)", (1, 2, 3), True, True),
    ("bag + moments (1,2), no centering", (1, 2), True, False),
)
QUICK = {"objects": 4, "instances": 3, "sequences": 3, "frames": 4, "base_classes": 12, "base_per_class": 30}


def train_convnet(x: Tensor, y: Tensor, classes: int, *, epochs: int, seed: int, lr: float = 2e-3,
                  batch_size: int = 128, device: torch.device | str = "cpu") -> ConvNet:
    """A :class:`ConvNet` (32/64/128) trained with Adam and a cosine schedule on ``(x (N, 1, H, W), y (N,))``."""
    torch.manual_seed(seed)
    net = ConvNet(x.shape[1], classes, device=device)
    steps = max(1, epochs * (len(x) // batch_size))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, max(1, len(x) - batch_size + 1), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def _maps(trunk: Callable[[Tensor], Tensor], x: Tensor, device: torch.device, batch: int = 256) -> Tensor:
    return torch.cat([trunk(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def finetune_accuracy(z: Tensor, y: Tensor, zt: Tensor, yt: Tensor, classes: int, *, steps: int, lr: float,
                      seed: int) -> float:
    """Accuracy on ``(zt, yt)`` of a linear head trained on features ``z (N, D)``, labels ``y (N,)`` with
    ``steps`` full-batch SGD steps (momentum 0.9)."""
    torch.manual_seed(seed)
    head = nn.Linear(z.shape[1], classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(head(z), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(zt).argmax(1) == yt).float().mean())


def method_rows(maps: Tensor, base_maps: Tensor, data: GlyphInstances, support: Tensor, test: Tensor,
                per_object: int, seed: int, finetune_steps: Sequence[int] = (10, 300)) -> list[dict[str, Any]]:
    """Instance accuracy of every method on region maps ``(N, C, h, w)`` (one per frame of ``data``; the base
    maps ``(M, C, h, w)`` give the centre) with the first ``per_object`` instances of each object class."""
    n_inst = data.config.instances
    keep = data.instances % n_inst < per_object
    sup, tst = support[keep[support]], test[keep[test]]
    ys, yt = data.instances[sup], data.instances[tst]
    common = {"per_object": per_object, "instances": len(torch.unique(ys)), "support": len(sup),
              "test": len(tst)}
    rows: list[dict[str, Any]] = []
    gap = region_moments(maps, None, None, (1,), block_norm=False)
    labels = {int(i): k for k, i in enumerate(torch.unique(ys).tolist())}
    ys_idx = torch.tensor([labels[int(i)] for i in ys])
    yt_idx = torch.tensor([labels[int(i)] for i in yt])
    for steps in finetune_steps:
        acc = finetune_accuracy(gap[sup], ys_idx, gap[tst], yt_idx, len(labels), steps=steps, lr=0.1, seed=seed)
        rows.append({**common, "method": f"fine-tune linear head ({steps} SGD steps)", "orders": "1",
                     "object_source": "-", "accuracy": acc})
    feats: dict[tuple[int, ...], Tensor] = {}
    for label, orders, conditioned, centred in METHODS:
        if orders not in feats:
            feats[orders] = region_moments(maps, None, None, orders)
        z = feats[orders]
        bag = BagOfInstances(None, orders=orders, conditioned=conditioned, center=centred)
        if centred:
            bag.fit_center(region_moments(base_maps, None, None, orders))
        for i in torch.unique(ys).tolist():
            bag.add_instance(str(i), int(data.instance_object[i]), z[sup[ys == i]])
        names = torch.tensor([int(n) for n in bag.names])
        sources = ("oracle", "predicted") if conditioned else ("-",)
        for source in sources:
            given = [int(o) for o in data.objects[tst]] if source == "oracle" else None
            pred = bag.predict(z[tst], given)
            row = {**common, "method": label, "orders": ",".join(map(str, orders)), "object_source": source,
                   "centred": centred, "accuracy": float((names[pred.index] == yt).float().mean())}
            if source == "predicted":
                row["object_accuracy"] = float((torch.tensor(pred.objects) == data.objects[tst]).float().mean())
            rows.append(row)
    return rows


def _mobilenet(device: torch.device) -> tuple[Callable[[Tensor], Tensor], str] | None:
    from edgetune.models.pretrained import load_pretrained

    try:
        net = load_pretrained("mobilenet-v2").model.eval().to(device)
    except DataError as err:
        log.warning("MobileNetV2 skipped: %s", err)
        return None
    trunk = net.features[:14]  # blocks 0-13: stride 16, 96 channels
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    return (lambda x: trunk((x.expand(-1, 3, -1, -1) - mean) / std)), "mobilenet-v2 (ImageNet, blocks 0-13)"


def write_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Mean instance accuracy over seeds vs instances per object class, one line per method (oracle objects),
    one panel per backbone."""
    plt = pyplot()
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(backbones), figsize=(5 * len(backbones) + 3.2, 4.2), squeeze=False)
    for ax, bb in zip(axes[0], backbones, strict=True):
        run = [r for r in rows if r["backbone"] == bb]
        pts = sorted({int(r["per_object"]) for r in run})
        for key in dict.fromkeys((r["method"], r["object_source"]) for r in run):
            vals = [statistics.fmean(float(r["accuracy"]) for r in run if (r["method"], r["object_source"]) == key
                                     and int(r["per_object"]) == p) for p in pts]
            ax.plot(pts, [100 * v for v in vals], "--" if key[1] == "predicted" else "-", color=colours[key[0]],
                    marker="o", ms=4, label=key[0] + (f" [{key[1]} object]" if key[1] != "-" else ""))
        ax.set_xticks(pts)
        ax.set_xlabel("personal instances per object class")
        ax.set_ylabel("instance accuracy (%)")
        ax.set_title(bb, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle(title or "few-shot personal instance recognition (1SAS)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 3.2 / (5 * len(backbones) + 3.2), 1))
    return save_figure(fig, path, dpi=110)


def table(csv_path: Path) -> str:
    """Markdown of the last run in the CSV: mean +/- std over seeds per (backbone, instances per object, method)."""
    run = last_run_rows(csv_path)
    if not run:
        return ""
    seeds = sorted({int(r["backbone_seed"]) for r in run})
    r0 = run[0]
    lines = [(f"{run_header(r0)}; protocol 1SAS on glyph instances "
              f"({r0['objects']} object classes, {r0['sequences']} sequences x {r0['frames']} frames per instance); "
              f"instance accuracy in %, mean ± std over seeds {seeds} (data, backbone and shots); object accuracy "
              "of the nearest object prototype where the object class is predicted."), "",
             "| backbone | inst./object | method | object class | accuracy | object acc. |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str, str], list[dict[str, str]]] = {}
    for r in run:
        groups.setdefault((r["backbone"], r["per_object"], r["method"], r["object_source"]), []).append(r)

    def cell(rs: list[dict[str, str]], k: str) -> str:
        vals = [100 * float(r[k]) for r in rs if r.get(k) not in (None, "")]
        if not vals:
            return ""
        return f"{statistics.fmean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")

    for (bb, per, method, source), rs in groups.items():
        lines.append(f"| {bb} | {per} | {method} | {source} | {cell(rs, 'accuracy')} | {cell(rs, 'object_accuracy')} |")
    return "\n".join(lines) + "\n"


def _ints(option: Any, default: Sequence[int]) -> list[int]:
    if option is None:
        return list(default)
    try:
        return [int(v) for v in str(option).split(",")]
    except ValueError as e:
        raise ConfigError(f"expected comma-separated integers, got {option!r}") from e


@register_suite("incremental-instances", "few-shot personal instance recognition (OBoI): object-conditioned bag, "
                "multi-order statistics, fine-tuning and prototype baselines on generated glyph instances (1SAS)",
                options={"seeds": "number of seeds (data, backbone, shots; default 3, quick 1)",
                         "per_object": "comma-separated instances per object class (default 2,3,5; quick 2,3)",
                         "epochs": "ConvNet training epochs on the base classes (default 6; quick 2)",
                         "mobilenet": "also run frozen ImageNet MobileNetV2 (default true; quick false)",
                         "plot_dir": "folder of incremental-instances.png (default bench/results; quick: scratch)"},
                table=table)
def instances_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    q = ctx.quick
    seeds = int(ctx.option("seeds", 1 if q else 3))
    per_objects = _ints(ctx.option("per_object"), (2, 3) if q else (2, 3, 5))
    epochs = int(ctx.option("epochs", 2 if q else 6))
    use_mobilenet = str(ctx.option("mobilenet", not q)).lower() in ("1", "true", "yes")
    mobilenet = _mobilenet(ctx.device) if use_mobilenet else None
    rows: list[dict[str, Any]] = []
    for k in range(seeds):
        seed = ctx.seed + k
        cfg = GlyphInstancesConfig(seed=seed, **(QUICK if q else {}))
        if max(per_objects) > cfg.instances:
            raise ConfigError(f"per_object={max(per_objects)} but the data set has {cfg.instances} instances per "
                              "object class")
        t0 = time.perf_counter()
        data = generate_glyph_instances(cfg)
        bx, bb, by = base_frames(cfg)
        crops = crop_regions(data.images, data.boxes, cfg.glyph)  # the detector's box crops (N, 1, 16, 16)
        base = crop_regions(bx, bb, cfg.glyph)
        net = train_convnet(base, by, cfg.base_classes, epochs=epochs, seed=seed, device=ctx.device)
        with torch.no_grad():
            base_acc = float((net(base[-1000:].to(ctx.device)).argmax(1).cpu() == by[-1000:]).float().mean())
        log.info("seed %d: ConvNet on %d base classes, train accuracy %.3f (%.1f s)", seed, cfg.base_classes, base_acc,
                 time.perf_counter() - t0)
        backbones: list[tuple[str, Callable[[Tensor], Tensor], int, float | None]] = [
            (f"convnet (trained on {cfg.base_classes} base classes)", net.blocks, cfg.glyph, base_acc)]
        if mobilenet is not None:
            backbones.append((mobilenet[1], mobilenet[0], 4 * cfg.glyph, None))
        support, test = one_shot_all_sequences(data, seed)
        nb = min(len(base), 1000)
        pick = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))[:nb]
        for name, trunk, side, acc in backbones:
            t1 = time.perf_counter()
            up = (lambda x, s=side, g=cfg.glyph: x if s == g else F.interpolate(x, size=(s, s), mode="bilinear",
                                                                                 align_corners=False))
            maps = _maps(lambda x, t=trunk, u=up: t(u(x)), crops, ctx.device)
            base_maps = _maps(lambda x, t=trunk, u=up: t(u(x)), base[pick], ctx.device)
            feat_s = time.perf_counter() - t1
            for per in per_objects:
                for row in method_rows(maps, base_maps, data, support, test, per, seed):
                    row = {"backbone": name, "backbone_seed": seed, "input_px": side, "objects": cfg.objects,
                           "sequences": cfg.sequences, "frames": cfg.frames, "map": "x".join(map(str, maps.shape[1:])),
                           "backbone_base_acc": acc, "features_s": feat_s, **row}
                    rows.append(row)
                    yield row
    plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if q else DEFAULT_RESULTS_DIR))
    write_plot(rows, plot_dir / "incremental-instances.png",
               f"personal instance recognition (1SAS), mean of seeds {ctx.seed}..{ctx.seed + seeds - 1}; "
               "solid: oracle object class, dashed: predicted")
