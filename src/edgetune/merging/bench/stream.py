"""``merging-stream`` suite: merging N safetensors checkpoints streams; memory stays near one tensor per input.

Generates N checkpoints (and a base) of a transformer-like layout -- many 2-D weights and 1-D biases, ``size_mb``
each, float32, written with safetensors -- then merges them with :func:`~edgetune.merging.stream.stream_merge`,
one method after another, and reports per method: the merge's wall time, the time to read every input once (the
floor a streamed merge cannot beat; the files are in the page cache for both), and the process's resident-memory
rise above its level before the merge, against the inputs' total size and the output's. A merge that loaded whole
models would need about ``N x size`` of memory; streaming needs about ``(N + 2) x`` the largest tensor (the inputs'
tensors, the base's and the merged one: ``held_tensors`` is the peak in units of the largest tensor).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from edgetune.bench.harness import BenchContext, register_suite
from edgetune.merging.base import merger_for
from edgetune.merging.stream import read_once_seconds, stream_merge

__all__ = ["write_checkpoints"]

log = logging.getLogger(__name__)

METHODS = ({"method": "linear"}, {"method": "task_arithmetic", "scaling": 0.5}, {"method": "ties", "density": 0.2},
           {"method": "dare", "density": 0.5}, {"method": "breadcrumbs", "density": 0.9, "beta": 0.01})


def write_checkpoints(folder: Path, n: int, size_mb: float, width: int, seed: int = 0) -> tuple[list[Path], Path]:
    """``n`` fine-tune checkpoints and one base of about ``size_mb`` MiB each: ``layers.i.weight`` (width x width)
    and ``layers.i.bias``; the fine-tunes are the base plus small noise."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = max(1, math.ceil(size_mb * 2**20 / (4 * (width * width + width))))
    paths = [folder / f"model-{i}.safetensors" for i in range(n)]
    base_path = folder / "base.safetensors"
    for k, p in enumerate([base_path, *paths]):  # one file in memory at a time
        noise = 0.0 if k == 0 else 1e-3
        tensors = {}
        for i in range(layers):
            g = torch.Generator().manual_seed(seed * 100_003 + i)  # the base's layer i, the same in every file
            w, b = torch.randn(width, width, generator=g) * 0.02, torch.zeros(width)
            if noise:
                gk = torch.Generator().manual_seed(seed * 100_003 + 7919 * k + i + 1)
                w += noise * torch.randn(width, width, generator=gk)
                b += noise * torch.randn(width, generator=gk)
            tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"] = w, b
        save_file(tensors, str(p))
        del tensors
    return paths, base_path


def _suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    n = int(ctx.option("models", 4))
    size_mb = float(ctx.option("size_mb", 8 if ctx.quick else 640))
    width = int(ctx.option("width", 256 if ctx.quick else 4096))
    folder = ctx.out_dir / "merging-stream"
    t0 = time.perf_counter()
    paths, base = write_checkpoints(folder, n, size_mb, width, seed=ctx.seed)
    log.info("wrote %d checkpoints + base of %.0f MiB each in %.1f s", n, size_mb, time.perf_counter() - t0)
    inputs = sum(p.stat().st_size for p in paths)
    largest = 4 * width * width
    read_once_seconds([*paths, base])  # warm the page cache so every method sees the same state
    rows = []
    for cfg in METHODS:
        merger = merger_for(cfg)
        out = folder / f"merged-{cfg['method']}.safetensors"
        rep = stream_merge([str(p) for p in paths], merger, out, base=str(base) if merger.needs_base else None,
                           compare_read=True)
        rows.append({"method": cfg["method"], "models": n, "model_mib": round(size_mb, 1),
                     "inputs_mib": inputs / 2**20, "output_mib": rep.bytes_written / 2**20,
                     "largest_tensor_mib": largest / 2**20, "tensors": rep.tensors, "merge_s": rep.seconds,
                     "read_once_s": rep.read_once_seconds,
                     "merge_over_read": rep.seconds / rep.read_once_seconds if rep.read_once_seconds else None,
                     "peak_rss_delta_mib": rep.peak_rss_delta_bytes / 2**20,
                     "peak_over_inputs": rep.peak_rss_delta_bytes / inputs,
                     "held_tensors": rep.peak_rss_delta_bytes / largest, "rss_source": rep.rss_source})
        out.unlink()
    return rows


register_suite("merging-stream", "streamed merge of N generated safetensors checkpoints: time vs one read of the "
               "inputs, peak memory vs their size",
               options={"models": "number of checkpoints (default 4)",
                        "size_mb": "MiB per checkpoint (default 640, quick 8)",
                        "width": "weight matrices width x width (default 4096, quick 256)"})(_suite)
