"""Link-prediction micro-benchmark (spec ``research/cht-spec.md`` §5.3): edgetune's CH predictors on
seeded random (Erdős-Rényi) layer masks, timed beside the official code's figures.

``predictor_rows`` returns one row per (size, method): median seconds of ``repeats`` calls after one
warm-up (CUDA-synchronised), the official figure for the same layer where the spec measured one, and,
with ``quality=True``, how the method's top-k regrowth choice (k = 30% of the links, the CHT ζ) agrees
with exact CH3-L3 computed in float64.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from edgetune.sparse.predictors import link_scores

__all__ = ["DEFAULT_SIZES", "OFFICIAL_SECONDS", "predictor_rows", "random_mask", "topk_agreement"]

log = logging.getLogger(__name__)

DEFAULT_SIZES: tuple[tuple[int, int, float], ...] = (
    (1024, 1024, 0.05),
    (2048, 2048, 0.01),
    (2048, 2048, 0.05),
    (4096, 4096, 0.01),
    (4096, 4096, 0.05),
)

# Official figures in seconds (spec §2.3, medians on the same kind of random masks).
# ("l3p", "cpu"): C++/OpenMP CH_scores extension on a 2-core machine like the CI box (CH3 and CH2
# enumerate the same paths); 4096² at 5% ran > 300 s and has no figure.
# ("l3n", "cpu"): the official dense formula in numpy on 2 cores;
# ("l3n", "cuda"): the official torch code in fp32 on an H100.
OFFICIAL_SECONDS: dict[tuple[str, str], dict[tuple[int, int, float], float]] = {
    ("l3p", "cpu"): {
        (1024, 1024, 0.01): 0.66,
        (1024, 1024, 0.05): 10.5,
        (2048, 2048, 0.01): 6.1,
        (2048, 2048, 0.05): 152.0,
        (4096, 4096, 0.01): 72.6,
    },
    ("l3n", "cpu"): {
        (1024, 1024, 0.01): 0.06,
        (1024, 1024, 0.05): 0.18,
        (2048, 2048, 0.01): 0.71,
        (2048, 2048, 0.05): 0.72,
        (4096, 4096, 0.01): 4.3,
        (4096, 4096, 0.05): 4.2,
    },
    ("l3n", "cuda"): {
        (1024, 1024, 0.01): 0.59e-3,
        (1024, 1024, 0.05): 0.42e-3,
        (2048, 2048, 0.01): 1.8e-3,
        (2048, 2048, 0.05): 1.7e-3,
        (4096, 4096, 0.01): 11.9e-3,
        (4096, 4096, 0.05): 12.0e-3,
        (11008, 4096, 0.05): 58e-3,
    },
}


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


def _time(fn: Any, repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
) -> list[dict[str, Any]]:
    """Time each predictor on a seeded random mask of each size ``(n_out, n_in, density)``.

    Returns rows ``{method, n_out, n_in, density, device, dtype, threads, median_s, official_s,
    speedup_vs_official}`` (``official_s`` None where the spec has no figure), plus ``topk_overlap`` and
    ``topk_valid`` against float64 exact CH3-L3 when ``quality`` (costs one extra exact run per size).
    ``num_threads`` sets torch's CPU threads for the run (restored afterwards): on a shared machine,
    2 OpenMP threads competing with other processes can run ~5x slower than 1 thread.
    """
    device = torch.device(device)
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _rows(sizes, methods, repeats, device, seed, dtype, quality)
    finally:
        torch.set_num_threads(threads_before)


def _rows(
    sizes: Sequence[tuple[int, int, float]],
    methods: Sequence[str],
    repeats: int,
    device: torch.device,
    seed: int,
    dtype: torch.dtype,
    quality: bool,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n_out, n_in, density in sizes:
        mask = random_mask(n_out, n_in, density, seed).to(device)
        k = max(1, round(0.3 * int(mask.sum())))
        reference = link_scores(mask, "ch3_l3", dtype=torch.float64) if quality else None
        for method in methods:
            seconds = _time(lambda m=method, x=mask: link_scores(x, m, dtype=dtype), repeats, device)
            family = "l3n" if method.endswith("n") else "l3p"
            official = OFFICIAL_SECONDS.get((family, device.type), {}).get((n_out, n_in, density))
            row: dict[str, Any] = {
                "method": method,
                "n_out": n_out,
                "n_in": n_in,
                "density": density,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "median_s": seconds,
                "official_s": official,
                "speedup_vs_official": None if official is None else official / seconds,
            }
            if reference is not None:
                row["topk_overlap"], row["topk_valid"] = topk_agreement(
                    link_scores(mask, method, dtype=dtype), reference, mask, k
                )
            log.info("%s %dx%d @%.3g on %s: %.4g s", method, n_out, n_in, density, device, seconds)
            rows.append(row)
    return rows
