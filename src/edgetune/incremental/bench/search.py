"""Bench suite ``incremental-search``: training-free one-shot personal object search (Swiss DINO style) on frozen
ImageNet MobileNetV2 patch grids, on cluttered scenes composed from real photos (:mod:`edgetune.data.scenes`).

Per setting (MobileNetV2 output stride 16 or 32, input 224 or 448 px): the search with mask supports, with box
supports (k-means split), with box supports taken whole (no split: the ablation), and a naive baseline measured in the same run on the same features: identification
by the cosine of the global-average-pooled query grid to the support image's pooled grid, localisation by the
support's box pasted at the centre of the query. Each row: class-averaged patch mIoU, box mIoU, AP and accuracy
over one episode (``personal`` objects, their queries and negative queries), and the latency of one query image
(feature extraction + search over every support) on the bench device, median after warm-up.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
from edgetune.core.errors import ConfigError
from edgetune.data.scenes import ScenesConfig, SearchEpisode, search_episode
from edgetune.incremental.object_search import (
    PersonalObjectSearch,
    box_iou,
    box_to_grid,
    mask_iou,
    mask_to_grid,
    search_metrics,
)
from edgetune.incremental.patch_features import mobilenet_v2_patches
from edgetune.measure.latency import measure_latency

__all__ = ["SETTINGS", "baseline_rows", "episode_rows", "table", "write_plot"]

log = logging.getLogger(__name__)

#: (stride, input side) of the MobileNetV2 settings; the first is the quick one
SETTINGS: tuple[tuple[int, int], ...] = ((16, 224), (32, 224), (16, 448), (32, 448))
GT_THRESHOLD = 0.5  # a patch is ground-truth object when at least half of it is covered
METRICS = ("miou", "box_miou", "ap", "accuracy")


def _tensor(image: np.ndarray) -> Tensor:
    return torch.tensor(image).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


@torch.no_grad()
def _grids(extractor: nn.Module, images: Sequence[np.ndarray], batch: int = 8) -> Tensor:
    """``(N, D, h, w)`` patch grids of ``N`` scenes."""
    out = [extractor(torch.stack([_tensor(a) for a in images[i:i + batch]])).cpu()
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def _gt_grid(mask: np.ndarray, grid: tuple[int, int]) -> Tensor:
    return mask_to_grid(torch.tensor(mask), grid, GT_THRESHOLD)


def episode_rows(ep: SearchEpisode, extractor: nn.Module, sup: Tensor, qry: Tensor, support: str,
                 device: torch.device, repeats: int, box_split: str = "kmeans") -> dict[str, Any]:
    """Metrics of the search with ``support`` ("mask" or "box") annotations on precomputed grids ``sup (S, D, h, w)``
    and ``qry (Q, D, h, w)``, and the latency of one query (extraction + search). ``box_split``: see
    :class:`~edgetune.incremental.object_search.SearchConfig`."""
    search = PersonalObjectSearch(extractor, box_split=box_split)
    t0 = time.perf_counter()
    for name, scene, g in zip(ep.names, ep.supports, sup, strict=True):
        obj = scene.object(name)
        kw = {"mask": obj.mask} if support == "mask" else {"box": obj.box}
        search.add_features(name, g, scene.image.shape[:2], **kw)
    add_s = (time.perf_counter() - t0) / len(ep.names)
    logits, mious, bious = [], [], []
    for scene, label, g in zip(ep.queries, ep.labels, qry, strict=True):
        hits = search.search_features(g, scene.image.shape[:2])
        logits.append([h.score for h in hits])
        if label >= 0:
            obj, hit = scene.object(ep.names[label]), hits[label]
            mious.append(mask_iou(hit.mask, _gt_grid(obj.mask, tuple(g.shape[-2:]))))
            bious.append(box_iou(hit.box, obj.box))
        else:
            mious.append(0.0)
            bious.append(0.0)
    m = search_metrics(torch.tensor(logits), torch.tensor(ep.labels), torch.tensor(mious), torch.tensor(bious))
    fg_iou = statistics.fmean(mask_iou(s.mask, _gt_grid(sc.object(n).mask, tuple(s.mask.shape)))
                              for n, sc, s in zip(ep.names, ep.supports, search.supports.values(), strict=True))
    query = ep.queries[0]
    lat = measure_latency(lambda: search.search(query.image), warmup=1, repeats=repeats, device=device)
    return {**m, "support_fg_iou": fg_iou, "add_ms": add_s * 1e3, **lat.as_row("query")}


def baseline_rows(ep: SearchEpisode, extractor: nn.Module, sup: Tensor, qry: Tensor, device: torch.device,
                  repeats: int) -> dict[str, Any]:
    """The naive baseline: global-pooled cosine for identification, the support box at the query's centre for
    localisation (its patches as the mask)."""
    ps = F.normalize(sup.mean((-2, -1)), dim=1)  # (S, D)
    pq = F.normalize(qry.mean((-2, -1)), dim=1)  # (Q, D)
    logits = pq @ ps.T
    mious, bious = [], []
    for scene, label, g in zip(ep.queries, ep.labels, qry, strict=True):
        if label < 0:
            mious.append(0.0)
            bious.append(0.0)
            continue
        name = ep.names[label]
        sx0, sy0, sx1, sy1 = ep.supports[label].object(name).box
        hh, ww = scene.image.shape[:2]
        bw, bh = sx1 - sx0, sy1 - sy0
        box = ((ww - bw) / 2, (hh - bh) / 2, (ww + bw) / 2, (hh + bh) / 2)
        r0, r1, c0, c1 = box_to_grid(box, (hh, ww), tuple(g.shape[-2:]))
        pred = torch.zeros(g.shape[-2:], dtype=torch.bool)
        pred[r0:r1, c0:c1] = True
        obj = scene.object(name)
        mious.append(mask_iou(pred, _gt_grid(obj.mask, tuple(g.shape[-2:]))))
        bious.append(box_iou(box, obj.box))
    m = search_metrics(logits, torch.tensor(ep.labels), torch.tensor(mious), torch.tensor(bious))
    query = _tensor(ep.queries[0].image)[None]

    def one() -> Tensor:
        return F.normalize(extractor(query).mean((-2, -1)), dim=1).cpu() @ ps.T

    lat = measure_latency(one, warmup=1, repeats=repeats, device=device)
    return {**m, **lat.as_row("query")}


def write_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Bars of mIoU, box mIoU, AP and accuracy per setting and method."""
    plt = pyplot()
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), sharey=True)
    width = 0.8 / len(methods)
    for ax, key in zip(axes, METRICS, strict=True):
        for j, meth in enumerate(methods):
            vals = [next((float(r[key]) for r in rows if r["setting"] == s and r["method"] == meth), np.nan)
                    for s in settings]
            ax.bar(np.arange(len(settings)) + (j - (len(methods) - 1) / 2) * width, vals, width, label=meth)
        ax.set_xticks(np.arange(len(settings)), settings, rotation=20, fontsize=8)
        ax.set_title(key)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "one-shot personal object search on generated scenes (MobileNetV2 patch grids)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def table(csv_path: Path) -> str:
    """Markdown of the last run in the CSV: one line per (setting, method)."""
    run = last_run_rows(csv_path)
    if not run:
        return ""
    r0 = run[0]
    head = (f"{run_header(r0)}: {r0['personal']} personal objects, "
            f"{int(float(r0['queries']))} query scenes ({int(float(r0['positives']))} with a personal object), "
            f"seed {r0['seed']}. Class-averaged; latency = one query image (features + search over all supports), "
            "median.")
    lines = [head, "",
             "| setting | method | patch mIoU | box mIoU | AP | accuracy | support fg IoU | query ms |",
             "|---|---|---|---|---|---|---|---|"]
    def f(r: dict[str, str], key: str) -> str:
        v = r.get(key)
        return "" if v in (None, "") else f"{100 * float(v):.1f}"

    for r in run:
        ms = r.get("query_median_ms")
        lines.append(f"| {r['setting']} | {r['method']} | {f(r, 'miou')} | {f(r, 'box_miou')} | {f(r, 'ap')} | "
                     f"{f(r, 'accuracy')} | {f(r, 'support_fg_iou')} | {'' if not ms else f'{float(ms):.0f}'} |")
    return "\n".join(lines) + "\n"


def _settings(option: Any, quick: bool) -> list[tuple[int, int]]:
    if option is None:
        return [SETTINGS[0]] if quick else list(SETTINGS)
    out = []
    for item in str(option).split(","):
        try:
            stride, size = (int(v) for v in item.strip().split("@"))
        except ValueError as e:
            raise ConfigError(f"setting {item!r}: write STRIDE@SIZE, e.g. 16@448 (comma-separated)") from e
        out.append((stride, size))
    return out


@register_suite("incremental-search", "one-shot personal object search (Swiss DINO style, training-free) on "
                "generated scenes with MobileNetV2 patch grids: mask / box supports vs a global-pooling baseline",
                options={"settings": "comma-separated STRIDE@SIZE MobileNetV2 grids (default 16@224,32@224,16@448,"
                                     "32@448; quick: 16@224)",
                         "personal": "personal objects of the episode (default 10; quick 5)",
                         "queries_per_object": "query scenes per personal object (default 5; quick 2)",
                         "negatives": "query scenes without a personal object (default 20; quick 4)",
                         "repeats": "timed repeats of the one-query latency (default 10; quick 3)",
                         "plot_dir": "folder of incremental-search.png (default bench/results; quick: scratch)"},
                table=table)
def search_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    q = ctx.quick
    cfg = ScenesConfig(personal=int(ctx.option("personal", 5 if q else 10)),
                       queries_per_object=int(ctx.option("queries_per_object", 2 if q else 5)),
                       negatives=int(ctx.option("negatives", 4 if q else 20)), seed=ctx.seed)
    repeats = int(ctx.option("repeats", 3 if q else 10))
    t0 = time.perf_counter()
    ep = search_episode(cfg)
    log.info("episode: %d personal objects, %d queries (%.1f s)", len(ep.names), len(ep.queries),
             time.perf_counter() - t0)
    common = {"personal": len(ep.names), "queries": len(ep.queries), "scene_size": cfg.size}
    rows: list[dict[str, Any]] = []
    from edgetune.models.pretrained import load_pretrained

    net = load_pretrained("mobilenet-v2").model
    for stride, size in _settings(ctx.option("settings"), q):
        ext = mobilenet_v2_patches(stride, size, model=net).to(ctx.device)
        t1 = time.perf_counter()
        sup = _grids(ext, [s.image for s in ep.supports])
        qry = _grids(ext, [s.image for s in ep.queries])
        feat_s = time.perf_counter() - t1
        setting = f"s{stride}@{size} ({size // stride}x{size // stride}, D={sup.shape[1]})"
        base = {**common, "setting": setting, "stride": stride, "image_size": size, "grid": size // stride,
                "feature_dim": int(sup.shape[1]), "features_s": feat_s}
        for support, split, label in (("mask", "kmeans", "mask support"), ("box", "kmeans", "box support"),
                                      ("box", "none", "box support, no split")):
            row = {**base, "method": f"swiss-dino ({label})", "support": support, "box_split": split,
                   **episode_rows(ep, ext, sup, qry, support, ctx.device, repeats, split)}
            rows.append(row)
            yield row
        row = {**base, "method": "baseline (global pool, centre box)", "support": "box",
               **baseline_rows(ep, ext, sup, qry, ctx.device, repeats)}
        rows.append(row)
        yield row
    plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if q else DEFAULT_RESULTS_DIR))
    write_plot(rows, plot_dir / "incremental-search.png",
               f"personal object search, {len(ep.names)} objects, {len(ep.queries)} queries (seed {ctx.seed})")
