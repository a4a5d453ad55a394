"""``sparse`` suite: link-prediction speed against the official CHT code, and sparse vs dense train steps.

Rows of two kinds (column ``part``): ``predictors`` (one row per predictor and layer size, with the
official C++/torch timings from the CHT spec beside ours) and ``train`` (the 784-1568-1568-1568-10 MLP,
dense and at ``density``, one Adam step, time and state memory side by side in one process; the sparse
layers on the ``auto`` backend, the native kernels on a CPU, and others with ``backends=[auto,csr]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from edgetune.bench.harness import BenchContext, register_suite

QUICK_SIZES = [(256, 256, 0.05), (512, 512, 0.01)]
FULL_SIZES = [(1024, 1024, 0.05), (2048, 2048, 0.01), (2048, 2048, 0.05), (4096, 4096, 0.01), (4096, 4096, 0.05)]
LLM_SIZES = [(11008, 4096, 0.05), (14336, 4096, 0.05)]


@register_suite("sparse", summary="CH link-prediction speed vs the official code; sparse vs dense MLP train step",
                options={"part": "predictors | train | all (default all)", "density": "train-step density (0.01)",
                         "batches": "train-step batch sizes (list)", "threads": "CPU threads for the train step",
                         "backends": "train step: sparse backends side by side (list; default [auto])",
                         "fused_relu": "train step: the sparse layers apply their ReLU (default true)",
                         "block": "train step: consecutive steps of one model between switches (default 5)",
                         "fused_adam": "train step: torch's fused Adam for both models (default false: torch's "
                                       "default Adam, what edgetune's loop builds)",
                         "llm": "also time the node-based predictors on LLM-size layers (default: on CUDA)"})
def _sparse_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    from edgetune.sparse.bench.predictors import predictor_rows
    from edgetune.sparse.bench.train_speed import train_step_rows

    part = ctx.option("part", "all")
    if part in ("predictors", "all"):
        sizes = QUICK_SIZES if ctx.quick else FULL_SIZES
        for row in predictor_rows(sizes, ("ch3_l3", "ch2_l3", "ch3_l3n", "ch2_l3n"), repeats=1 if ctx.quick else 3,
                                  device=ctx.device, seed=ctx.seed, quality=not ctx.quick,
                                  num_threads=ctx.option("threads")):
            yield {"part": "predictors", "torch_threads": ctx.option("threads") or torch.get_num_threads(), **row}
        if ctx.option("llm", ctx.device.type == "cuda"):
            for row in predictor_rows(LLM_SIZES, ("ch2_l3n", "ch3_l3n"), repeats=3, device=ctx.device, seed=ctx.seed):
                yield {"part": "predictors", **row}
    if part in ("train", "all"):
        density = float(ctx.option("density", 0.01))
        batches = ctx.option("batches", [32] if ctx.quick else [32, 128, 1024])
        widths = (256, 256, 256) if ctx.quick else (1568, 1568, 1568)
        backends = ctx.option("backends", ["auto"])
        for batch in batches if isinstance(batches, list) else [batches]:
            for row in train_step_rows(density, widths, batch=int(batch), repeats=2 if ctx.quick else 8,
                                       warmup=1 if ctx.quick else 2, block=int(ctx.option("block", 5)),
                                       fused_adam=_flag(ctx, "fused_adam", False),
                                       device=ctx.device, threads=ctx.option("threads", 2), seed=ctx.seed,
                                       backends=backends if isinstance(backends, list) else [backends],
                                       fused_relu=_flag(ctx, "fused_relu", True)):
                yield {"part": "train", "torch_threads": ctx.option("threads", 2), **row}


def _flag(ctx: BenchContext, name: str, default: bool) -> bool:
    """A yes/no option (YAML booleans from the command line; "false" / "0" / 0 given otherwise read as no)."""
    return ctx.option(name, default) not in (False, "false", "0", 0)
