"""Link-prediction micro-benchmark (spec ``research/cht-spec.md`` §5.3): edgetune's CH predictors on
seeded random (Erdős-Rényi) layer masks.

``predictor_rows`` returns one row per (size, method): median seconds of ``repeats`` calls after one
warm-up (CUDA-synchronised) and, with ``quality=True``, how the method's top-k regrowth choice (k = 30% of
the links, the CHT ζ) agrees with exact CH3-L3 computed in float64. Given the official C++ extension
(:mod:`.official_cht`, built from a checkout of the official repository), the exact predictors are also
timed with it on the same masks in the same run; no figure measured elsewhere is ever used.

The ``sparse-predictors`` suite runs the exact predictors from 1024² to 16384²; ``official_src=FOLDER``
adds the official code. Run: ``edgetune bench sparse-predictors official_src=/path/to/checkout``, or
``python -m edgetune.sparse.bench.predictors official_src=...``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from edgetune.bench.harness import BenchContext, last_run_rows, register_suite
from edgetune.sparse.bench.official_cht import (
    OFFICIAL_MODEL_INDEX,
    load_official,
    official_scores,
    official_threads,
)
from edgetune.sparse.predictors import link_scores
from edgetune.sparse.predictors_exact import choose_algorithm

__all__ = [
    "DEFAULT_SIZES",
    "EXACT_SIZES",
    "count_paths",
    "predictor_rows",
    "predictors_table",
    "random_mask",
    "topk_agreement",
]

log = logging.getLogger(__name__)

DEFAULT_SIZES: tuple[tuple[int, int, float], ...] = (
    (1024, 1024, 0.05),
    (2048, 2048, 0.01),
    (2048, 2048, 0.05),
    (4096, 4096, 0.01),
    (4096, 4096, 0.05),
)
# the ``sparse-predictors`` suite: exact predictors from 1024² to 16384², side by side with the official code
EXACT_SIZES: tuple[tuple[int, int, float], ...] = (
    (1024, 1024, 0.01),
    (1024, 1024, 0.05),
    (2048, 2048, 0.01),
    (2048, 2048, 0.05),
    (4096, 4096, 0.01),
    (4096, 4096, 0.05),
    (16384, 16384, 0.001),
)
QUICK_EXACT_SIZES: tuple[tuple[int, int, float], ...] = ((256, 256, 0.05), (512, 512, 0.01))
# the official code is run where it ends in minutes: it allocates two dense (O+I)² float64 matrices and
# loops over all (O+I)² node pairs, and its path enumeration grows with the paths (4096² at 5%: > 300 s)
OFFICIAL_MAX_NODES = 8192
OFFICIAL_MAX_PATHS = 5e9


def random_mask(n_out: int, n_in: int, density: float, seed: int) -> torch.Tensor:
    """Seeded Erdős-Rényi mask ``(n_out, n_in)`` on the CPU with exactly ``round(density·out·in)`` links."""
    g = torch.Generator().manual_seed(seed)
    total = n_out * n_in
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=g)[: round(density * total)]] = True
    return mask.view(n_out, n_in)


def topk_agreement(
    scores: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[float, float]:
    """Compare the top-``k`` candidates of ``scores`` with those of ``reference`` (both ``(O, I)``).

    Returns ``(overlap, valid)``: ``overlap`` = shared fraction of the two top-k sets (ties broken by
    ``torch.topk``); ``valid`` = fraction of the ``scores`` top-k whose reference score reaches the
    reference's k-th largest value (1.0 means it is *a* correct top-k of the reference, up to ties).
    """
    neg = float("-inf")
    a = torch.topk(scores.double().masked_fill(mask, neg).view(-1), k).indices
    ref = reference.double().masked_fill(mask, neg).view(-1)
    top_ref = torch.topk(ref, k)
    overlap = torch.isin(a, top_ref.indices).double().mean().item()
    kth = top_ref.values[-1].item()
    valid = (ref[a] >= kth - 1e-9 * max(abs(kth), 1.0)).double().mean().item()
    return overlap, valid


def _time(fn: Any, repeats: int, device: torch.device, min_seconds: float = 0.0) -> float:
    """Median seconds of at least ``repeats`` calls after a warm-up, more (at most 100) until
    ``min_seconds`` are spent: on a shared machine the median of many fast calls resists a burst."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    sync()
    times: list[float] = []
    while len(times) < max(1, repeats) or (sum(times) < min_seconds and len(times) < 100):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_paths(mask: torch.Tensor) -> int:
    """Number of length-3 paths ``a - i - b - k`` (``a != b``, ``i != k``) of a mask, existing links included:
    ``Σ_{links (b, i)} (deg(i) - 1)(deg(b) - 1)``."""
    m = mask.bool()
    deg_out, deg_in = m.sum(1), m.sum(0)
    rows, cols = m.nonzero(as_tuple=True)
    return int(((deg_in[cols] - 1) * (deg_out[rows] - 1)).sum())


def predictor_rows(
    sizes: Sequence[tuple[int, int, float]] = DEFAULT_SIZES,
    methods: Sequence[str] = ("ch3_l3", "ch2_l3", "ch3_l3n", "ch2_l3n"),
    repeats: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    quality: bool = False,
    num_threads: int | None = None,
    official: ModuleType | None = None,
    official_repeats: int = 1,
    min_seconds: float = 0.0,
) -> list[dict[str, Any]]:
    """Time each predictor on a seeded random mask of each size ``(n_out, n_in, density)``.

    Returns rows ``{method, n_out, n_in, density, paths, algorithm, device, dtype, threads, median_s,
    official_s, speedup_vs_official}``, plus ``topk_overlap`` and ``topk_valid`` against float64 exact CH3-L3
    when ``quality`` (costs one extra exact run per size). ``num_threads`` sets torch's CPU threads for the
    run (restored afterwards): on a shared machine, 2 OpenMP threads competing with other processes can run
    ~5x slower than 1 thread.

    ``official``: the official ``CH_scores`` module (:func:`.official_cht.load_official`). Exact methods are
    then also timed with it on the same mask in the same process (median of ``official_repeats`` calls or more,
    as for edgetune until ``min_seconds`` are spent, no warm-up call), its
    OpenMP threads: ``official_threads``), with ``official_max_abs_diff`` = largest difference to edgetune's
    float64 scores; ``official_s`` stays None without it or where the official code would not end in
    minutes (``official_note`` says why).
    """
    device = torch.device(device)
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return [
            row
            for size in sizes
            for row in _size_rows(
                size, methods, repeats, device, seed, dtype, quality, official, official_repeats, min_seconds
            )
        ]
    finally:
        torch.set_num_threads(threads_before)


def _official_columns(
    official: ModuleType, mask: torch.Tensor, method: str, repeats: int, paths: int, min_seconds: float
) -> dict[str, Any]:
    n_out, n_in = mask.shape
    if n_out + n_in > OFFICIAL_MAX_NODES or paths > OFFICIAL_MAX_PATHS:
        return {
            "official_note": f"not run: over {OFFICIAL_MAX_NODES} nodes or {OFFICIAL_MAX_PATHS:.0e} paths"
        }
    torch_threads = torch.get_num_threads()
    # the extension loads torch's OpenMP runtime (same libgomp.so.1), whose thread count torch sets: give
    # it its own default (every core) for its calls, then restore edgetune's
    torch.set_num_threads(official_threads())
    try:
        times: list[float] = []
        while len(times) < max(1, repeats) or (sum(times) < min_seconds and len(times) < 100):
            start = time.perf_counter()
            theirs = official_scores(official, mask, method)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(torch_threads)
    ours = link_scores(mask.cpu(), method, dtype=torch.float64).numpy()  # type: ignore[arg-type]
    return {
        "official_s": statistics.median(times),
        "official_threads": official_threads(),
        "official_max_abs_diff": float(np.abs(theirs - ours).max()),
    }


def _size_rows(
    size: tuple[int, int, float],
    methods: Sequence[str],
    repeats: int,
    device: torch.device,
    seed: int,
    dtype: torch.dtype,
    quality: bool,
    official: ModuleType | None,
    official_repeats: int,
    min_seconds: float,
) -> list[dict[str, Any]]:
    n_out, n_in, density = size
    mask = random_mask(n_out, n_in, density, seed).to(device)
    paths = count_paths(mask)
    k = max(1, round(0.3 * int(mask.sum())))
    reference = link_scores(mask, "ch3_l3", dtype=torch.float64) if quality else None
    rows: list[dict[str, Any]] = []
    for method in methods:
        seconds = _time(lambda m=method, x=mask: link_scores(x, m, dtype=dtype), repeats, device, min_seconds)
        exact = method in OFFICIAL_MODEL_INDEX
        row: dict[str, Any] = {
            "method": method,
            "n_out": n_out,
            "n_in": n_in,
            "density": density,
            "paths": paths,
            "algorithm": choose_algorithm(mask) if exact else "node",
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "median_s": seconds,
            "official_s": None,
        }
        if official is not None and exact:
            row.update(_official_columns(official, mask, method, official_repeats, paths, min_seconds))
        row["speedup_vs_official"] = None if row["official_s"] is None else row["official_s"] / seconds
        if reference is not None:
            row["topk_overlap"], row["topk_valid"] = topk_agreement(
                link_scores(mask, method, dtype=dtype), reference, mask, k
            )
        log.info(
            "%s %dx%d @%.3g on %s: %.4g s (official: %s s)",
            method,
            n_out,
            n_in,
            density,
            device,
            seconds,
            row["official_s"],
        )
        rows.append(row)
    return rows


def predictors_table(csv_path: str | Path) -> str:
    """Markdown table of the newest run in a ``sparse-predictors`` CSV."""
    rows = last_run_rows(csv_path)
    if not rows:
        return ""
    first = rows[0]
    header = (
        f"Run {first['timestamp_utc']} (git {first['git_sha']}), {first['hardware']}, torch {first['torch']}, "
        f"seed {first['seed']}; edgetune on {first['threads']} torch thread(s), the official C++/OpenMP code on "
        f"{first.get('official_threads') or '-'} thread(s), same masks, same process."
    )
    columns = (
        "| method | layer | density | length-3 paths | algorithm | edgetune (s) | official (s) | speed-up | "
        "max abs diff to official |"
    )
    lines = [header, "", columns, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        official = f"{float(r['official_s']):.3f}" if r.get("official_s") else (r.get("official_note") or "-")
        speedup = f"{float(r['speedup_vs_official']):.0f}x" if r.get("speedup_vs_official") else "-"
        diff = f"{float(r['official_max_abs_diff']):.1e}" if r.get("official_max_abs_diff") else "-"
        lines.append(
            f"| {r['method']} | {r['n_out']}x{r['n_in']} | {float(r['density']):g} | {int(r['paths']):.2e} | "
            f"{r['algorithm']} | {float(r['median_s']):.4f} | {official} | {speedup} | {diff} |"
        )
    return "\n".join(lines) + "\n"


@register_suite(
    "sparse-predictors",
    summary="exact CH3-L3/CH2-L3 speed from 1024² to 16384², side by side with the official C++ code when given",
    options={
        "official_src": "folder of the official CHT repository; built and timed on the same masks (default: none)",
        "sizes": "layers as [[out, in, density], ...] (default 1024²-4096² at 1%/5% and 16384² at 0.1%)",
        "methods": "predictors (default [ch3_l3])",
        "repeats": "timed calls of edgetune per layer (at least), median, after a warm-up (default 3)",
        "min_seconds": "more timed calls until this many seconds, for edgetune and the official code (default 2)",
        "official_repeats": "timed calls of the official code per layer (at least), median (default 1)",
        "threads": "torch CPU threads for edgetune (default: torch's)",
        "dtype": "float32 | float64 (default float32)",
    },
    table=predictors_table,
)
def _sparse_predictors_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    src = ctx.option("official_src")
    official = load_official(src) if src else None
    default = QUICK_EXACT_SIZES if ctx.quick else EXACT_SIZES
    sizes = [(int(o), int(i), float(d)) for o, i, d in ctx.option("sizes", default)]
    methods = ctx.option("methods", ["ch3_l3"])
    dtype = {"float32": torch.float32, "float64": torch.float64}[str(ctx.option("dtype", "float32"))]
    threads = ctx.option("threads")
    yield from predictor_rows(
        sizes, methods if isinstance(methods, list) else [methods], repeats=int(ctx.option("repeats", 3)),
        device=ctx.device, seed=ctx.seed, dtype=dtype, num_threads=None if threads is None else int(threads),
        official=official, official_repeats=int(ctx.option("official_repeats", 1)),
        min_seconds=float(ctx.option("min_seconds", 0.0 if ctx.quick else 2.0)),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgetune.sparse.bench.predictors [--quick] [key=value ...]``: run the ``sparse-predictors``
    suite (e.g. ``official_src=/path/to/Cannistraci-Hebb-training``) into bench/results/."""
    from edgetune.bench.harness import run_suite
    from edgetune.core.config import parse_override

    args = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in args
    options = {".".join(keys): value for keys, value in (parse_override(a) for a in args if a != "--quick")}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = run_suite("sparse-predictors", quick=quick, device="cpu", options=options)
    log.info("%d rows appended to bench/results/sparse-predictors.csv", len(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
