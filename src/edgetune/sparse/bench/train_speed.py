"""Train-step time and memory of the CHT MLP, dense vs truly sparse (``SparseLinear``).

The MLP of the CHT/CHTs papers, 784-1568-1568-1568-10: the three hidden layers sparse at a given
density (random links, uniform per layer), the classifier head dense. The sparse hidden layers apply their
ReLU themselves (``activation="relu"``, fused by the native kernels; ``--unfused`` keeps separate
``nn.ReLU`` modules) and pass their output to the next layer, the head included, in the batch-contiguous
layout (``transposed_output``). One train step = forward,
cross-entropy, backward, Adam step: torch's default Adam (what edgetune's training loop builds), or with
``fused_adam`` torch's fused Adam for both models (the default one spends ~9 ms a step on the dense model's
24.7 M parameters at 2 threads, the fused one ~2.5 ms; ~0.4 vs ~0.1 ms on the sparse model's 82 k). Each
step takes the next of 8 random batches: one batch repeated for a few hundred steps gets memorised, and the
dense step then ran 4-5x slower in trials (vanishing gradients; denormal floats, most likely). Dense and sparse are measured side by side in one
process, in alternating blocks of ``block`` consecutive steps (as training runs them: a step that follows the
other model's step finds the caches full of that model's 100 MB of state); the time is the median step
after warm-up. Memory = bytes of parameters + gradients + optimizer state (+ the sparse topology's index
structures, reported apart).

Run: ``PYTHONPATH=src python -m edgetune.sparse.bench.train_speed --density 0.01 --batch 128 1024``
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.sparse.layer import SparseLinear

__all__ = ["build_mlp", "main", "random_mask", "state_bytes", "train_step_rows"]


def random_mask(out_features: int, in_features: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bool ``(out, in)`` with exactly ``max(1, round(density * out * in))`` True entries, uniform."""
    total = out_features * in_features
    k = max(1, round(density * total))
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=generator)[:k]] = True
    return mask.view(out_features, in_features)


def build_mlp(widths: Sequence[int], in_features: int, classes: int, density: float | None,
              backend: str = "auto", seed: int = 0, *, fused_relu: bool = True) -> nn.Sequential:
    """``in -> widths... -> classes`` ReLU MLP; with ``density`` its hidden layers are ``SparseLinear``
    (the ReLU inside them with ``fused_relu``, else as ``nn.ReLU`` modules). Same weights either way."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dims = [in_features, *widths]
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(dims):
        lin = nn.Linear(d_in, d_out)
        if density is not None:  # the batch-minor layout all the way (the dense head reads it as it is)
            lin = SparseLinear.from_dense(lin, random_mask(d_out, d_in, density, g), backend=backend,
                                          transposed_output=True, activation="relu" if fused_relu else None)
            if fused_relu:
                layers.append(lin)
                continue
        layers += [lin, nn.ReLU()]
    layers.append(nn.Linear(dims[-1], classes))
    return nn.Sequential(*layers)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state, and sparse index structures of ``model``."""
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    params = list(model.parameters())
    optim = sum(nbytes(v) for p in params for v in optimizer.state.get(p, {}).values()
                if isinstance(v, torch.Tensor))
    index = sum(m.index_bytes() for m in model.modules() if isinstance(m, SparseLinear))
    return {"param_bytes": sum(nbytes(p) for p in params),
            "grad_bytes": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optim_bytes": optim, "index_bytes": index}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_rows(density: float, widths: Sequence[int] = (1568, 1568, 1568), batch: int = 128,
                    repeats: int = 20, device: str | torch.device = "cpu", *, in_features: int = 784,
                    classes: int = 10, warmup: int = 3, backends: Sequence[str] = ("auto",),
                    threads: int | None = 2, seed: int = 0, fused_relu: bool = True,
                    block: int = 5, fused_adam: bool = False) -> list[dict[str, Any]]:
    """Time one Adam train step of the dense and the sparse MLP, in alternating blocks of ``block`` steps
    (``repeats`` blocks a model after ``warmup``); one row per model.

    One sparse model per entry of ``backends`` (same links), named "sparse" for "auto" and
    "sparse[<backend>]" otherwise. Rows: model, density, batch, backend (the one each sparse layer
    resolved to), step_ms (median), step_ms_min, the byte counts of
    :func:`state_bytes`, state_bytes (params + grads + optimizer), peak_bytes (CUDA only), speedup
    (dense step_ms / this step_ms) and memory_ratio (this state_bytes + index_bytes over dense state).
    ``threads`` sets ``torch.set_num_threads`` for the run (None leaves it); ``fused_relu``: see
    :func:`build_mlp` (column ``fused_relu``); ``fused_adam``: torch's fused Adam for both models (column
    ``fused_adam``: whether the optimizers were fused; where torch has none for the device, they are not).
    """
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        models = {"dense": build_mlp(widths, in_features, classes, None, seed=seed).to(device)}
        for be in backends:
            name = "sparse" if be == "auto" else f"sparse[{be}]"
            models[name] = build_mlp(widths, in_features, classes, density, be, seed,
                                     fused_relu=fused_relu).to(device)
        optims = {k: _adam(m, fused_adam) for k, m in models.items()}
        g = torch.Generator().manual_seed(seed + 1)
        xs = [torch.randn(batch, in_features, generator=g).to(device) for _ in range(_BATCHES)]
        ys = [torch.randint(0, classes, (batch,), generator=g).to(device) for _ in range(_BATCHES)]
        taken = dict.fromkeys(models, 0)

        def step(name: str) -> float:
            model, opt = models[name], optims[name]
            k = taken[name] % _BATCHES
            taken[name] += 1
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs[k]), ys[k]).backward()
            opt.step()
            _sync(device)
            return time.perf_counter() - t0

        names = list(models)
        times: dict[str, list[float]] = {k: [] for k in names}
        peaks: dict[str, int | None] = dict.fromkeys(names)
        for r in range(warmup + repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                if device.type == "cuda" and r == warmup:
                    torch.cuda.reset_peak_memory_stats(device)
                for _ in range(block):
                    t = step(name)
                    if r >= warmup:
                        times[name].append(t)
                if device.type == "cuda" and r == warmup:
                    peaks[name] = torch.cuda.max_memory_allocated(device)
    finally:
        torch.set_num_threads(old_threads)

    rows: list[dict[str, Any]] = []
    for name, model in models.items():
        mem = state_bytes(model, optims[name])
        rows.append({"suite": "sparse_train_speed", "model": name, "density": 1.0 if name == "dense" else density,
                     "widths": "-".join(str(w) for w in (in_features, *widths, classes)), "batch": batch,
                     "backend": "dense" if name == "dense" else _backends(model),
                     "fused_relu": name != "dense" and fused_relu, "block": block,
                     "fused_adam": bool(optims[name].defaults.get("fused")),
                     "step_ms": 1e3 * statistics.median(times[name]), "step_ms_min": 1e3 * min(times[name]),
                     **mem, "state_bytes": mem["param_bytes"] + mem["grad_bytes"] + mem["optim_bytes"],
                     "peak_bytes": peaks[name], "device": str(device), "threads": torch.get_num_threads()
                     if threads is None else threads, "torch": torch.__version__})
    dense = rows[0]
    for row in rows:
        row["speedup"] = dense["step_ms"] / row["step_ms"]
        row["memory_ratio"] = (row["state_bytes"] + row["index_bytes"]) / dense["state_bytes"]
    return rows


_BATCHES = 8  # distinct random batches the steps cycle through


def _adam(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """Adam; with ``fused`` torch's fused Adam where this torch has one for the device (CPU from 2.4, CUDA)."""
    if fused:
        try:
            return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype here
            pass
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _backends(model: nn.Module) -> str:
    return "+".join(sorted({m.resolved_backend() for m in model.modules() if isinstance(m, SparseLinear)}))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print the rows as CSV on stdout."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, nargs="+", default=[0.01])
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--widths", type=int, nargs="+", default=[1568, 1568, 1568])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", nargs="+", default=["auto"], help="auto, csr, gather, dense")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unfused", action="store_true", help="nn.ReLU modules instead of the layers' own ReLU")
    ap.add_argument("--block", type=int, default=5, help="consecutive steps of one model between switches")
    ap.add_argument("--fused-adam", action="store_true", help="torch's fused Adam for both models")
    args = ap.parse_args(argv)
    writer: csv.DictWriter[str] | None = None
    for density in args.density:
        for batch in args.batch:
            for row in train_step_rows(density, args.widths, batch, args.repeats, args.device,
                                       warmup=args.warmup, backends=args.backends, threads=args.threads,
                                       fused_relu=not args.unfused, block=args.block,
                                       fused_adam=args.fused_adam):
                if writer is None:
                    writer = csv.DictWriter(sys.stdout, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                sys.stdout.flush()


if __name__ == "__main__":
    main()
