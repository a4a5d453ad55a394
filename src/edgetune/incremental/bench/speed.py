"""Bench suite ``incremental-speed``: what personalization costs on a CPU. For 64-, 512- and 1280-dimensional
features (an MLP on 8x8 digits, a small CNN on 32x32 images, MobileNetV2 on 224x224 photos), with 100 classes
already known: milliseconds to add one new class from its shots (the backbone's forward over the shots plus the
learner's update) and to predict one image (forward plus the cosine scores over every prototype), each also
without the backbone (features given), as medians of repeats after warm-up."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.bench.harness import BenchContext, last_run_rows, register_suite, run_header
from edgetune.incremental.features import Backbone
from edgetune.incremental.learner import IncrementalLearner
from edgetune.models import MLP, ConvNet

__all__: list[str] = []


def _median_ms(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> float:
    """Median wall time in ms of ``fn(setup())`` (or ``fn()``) over ``repeats`` calls after 2 warm-up calls."""
    times = []
    for i in range(repeats + 2):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()  # type: ignore[call-arg]
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _backbones() -> list[tuple[str, nn.Module, tuple[int, ...], Any]]:
    out: list[tuple[str, nn.Module, tuple[int, ...], Any]] = [
        ("mlp-digits", MLP(64, 10, widths=(128, 64), batch_norm=True), (1, 8, 8), None),
        ("convnet-32px", ConvNet(3, 10, widths=(64, 128, 512)), (3, 32, 32), None),
    ]
    from edgetune.models.pretrained import is_installed, load_pretrained

    if is_installed("mobilenet-v2"):
        loaded = load_pretrained("mobilenet-v2")
        out.append(("mobilenet-v2-224px", loaded.model, (3, 224, 224), loaded.transform))
    return out


def table(csv_path: Path) -> str:
    run = last_run_rows(csv_path)
    if not run:
        return ""
    lines = [(f"{run_header(run[0])}; {run[0]['known_classes']} known classes, {run[0]['shots']}-shot new class, "
              "median "
              f"of {run[0]['repeats']} repeats."), "",
             ("| backbone | dim | add a class (ms) | of which learner (ms) | predict one image (ms) | of which learner "
              "(ms) | backbone forward (ms) |"), "|---|---|---|---|---|---|---|"]
    for r in run:
        lines.append(f"| {r['backbone']} | {r['feature_dim']} | {float(r['add_class_ms']):.2f} | "
                     f"{float(r['add_class_learner_only_ms']):.3f} | {float(r['predict_one_ms']):.2f} | "
                     f"{float(r['predict_one_learner_only_ms']):.3f} | {float(r['backbone_forward_one_ms']):.2f} |")
    return "\n".join(lines) + "\n"


def _measure(model: nn.Module, shape: tuple[int, ...], transform: Any, known: int, shots: int, repeats: int,
             g: torch.Generator, device: torch.device) -> dict[str, Any]:
    bb = Backbone(model, transform=transform, device=device)
    dim = int(bb(torch.rand(1, *shape, generator=g)).shape[1])
    learner = IncrementalLearner().fit_base_features(torch.randn(known * 5, dim, generator=g),
                                                     torch.arange(known).repeat_interleave(5))
    support = torch.rand(shots, *shape, generator=g).to(device)
    one = torch.rand(1, *shape, generator=g).to(device)
    new = torch.full((shots,), known, dtype=torch.int64)
    zs = bb(support)

    def fresh() -> IncrementalLearner:
        with_backbone = copy.deepcopy(learner)
        with_backbone.backbone = bb
        return with_backbone

    return {
        "feature_dim": dim,
        "add_class_ms": _median_ms(lambda lr: lr.add_classes((support, new)), repeats, fresh),
        "add_class_learner_only_ms": _median_ms(lambda lr: lr.add_classes_features(zs, new), repeats, fresh),
        "predict_one_ms": _median_ms(lambda: learner.predict_features(bb(one)), repeats),
        "predict_one_learner_only_ms": _median_ms(lambda: learner.predict_features(zs[:1]), repeats),
        "backbone_forward_one_ms": _median_ms(lambda: bb(one), repeats),
        "prototype_bytes": int(learner.sums.numel() * learner.sums.element_size()),
    }


@register_suite("incremental-speed", "CPU cost of adding a class and predicting one image (64/512/1280-d features)",
                options={"known_classes": "classes the learner already holds (default 100)",
                         "shots": "examples of the added class (default 5)",
                         "repeats": "timed repeats (default 30; 5 when quick)"}, table=table)
def speed_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    known = int(ctx.option("known_classes", 100))
    shots = int(ctx.option("shots", 5))
    repeats = int(ctx.option("repeats", 5 if ctx.quick else 30))
    g = torch.Generator().manual_seed(ctx.seed)
    for name, model, shape, transform in _backbones():
        yield {"backbone": name, "known_classes": known, "shots": shots, "repeats": repeats,
               **_measure(model.to(ctx.device).eval(), shape, transform, known, shots, repeats, g, ctx.device)}
