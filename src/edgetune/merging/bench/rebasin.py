"""Loss barriers between two MLPs trained from different seeds, naive vs after Git Re-Basin weight matching
(Ainsworth, Hayase, Srinivasa 2023, Fig. 2-3 style), on a real offline dataset from edgetune's data registry.

:func:`barrier_curves` trains two edgetune :class:`~edgetune.models.MLP` s from two seeds (init and batch order),
aligns the second to the first, and evaluates the linear path ``(1 - a) theta_A + a theta_B`` with and without the
alignment; :func:`summarize` gives the barriers and midpoint accuracies; :func:`write_plot` draws the curves.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetune.bench.harness import BenchContext, register_suite
from edgetune.bench.plots import pyplot, save_figure
from edgetune.data import DataConfig, load_dataset
from edgetune.merging.barrier import interpolate_state_dicts
from edgetune.merging.rebasin import rebasin_align, spec_from_model
from edgetune.models import MLP

__all__ = ["barrier_curves", "summarize", "train_mlp", "write_plot"]  # and the merging-rebasin bench suite

log = logging.getLogger(__name__)

Row = dict[str, float]


def _arrays(dataset: str, limit_train: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Float train / test inputs ``(N, *input_shape)`` and labels ``(N,)`` of a registered dataset."""
    bundle = load_dataset(DataConfig(name=dataset, limit_train=limit_train))
    out = []
    for split in (bundle.train, bundle.test):
        x, y = split.tensors  # type: ignore[union-attr]
        if bundle.transform is not None:
            x = bundle.transform([x, y])[0]
        out += [x.float(), y.long()]
    return out[0], out[1], out[2], out[3], bundle.num_classes


def train_mlp(x: Tensor, y: Tensor, num_classes: int, widths: Sequence[int], seed: int, steps: int,
              lr: float = 1e-3, batch_size: int = 128, device: str = "cpu") -> MLP:
    """An MLP trained with Adam on ``(x (N, ...), y (N,))``; ``seed`` sets the init and the batch order."""
    torch.manual_seed(seed)
    model = MLP(math.prod(x.shape[1:]), num_classes, widths=tuple(widths), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    x, y = x.to(device), y.to(device)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g).to(device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _evaluate(model: MLP, x: Tensor, y: Tensor, batch: int = 4096) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)``."""
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        loss += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return loss / len(x), correct / len(x)


def barrier_curves(dataset: str = "digits", widths: Sequence[int] = (512, 512), steps: int = 1000,
                   seeds: tuple[int, int] = (0, 1), alphas: Sequence[float] | None = None, lr: float = 1e-3,
                   batch_size: int = 128, limit_train: int | None = None, device: str = "cpu") -> list[Row]:
    """Rows ``alpha, loss_naive, loss_rebasin, acc_naive, acc_rebasin`` on the test split along the linear path
    from model A (``seeds[0]``) to model B (``seeds[1]``), B as trained (naive) and B aligned to A (re-basin)."""
    alphas = [i / 20 for i in range(21)] if alphas is None else list(alphas)
    x, y, xt, yt, classes = _arrays(dataset, limit_train)
    a, b = (train_mlp(x, y, classes, widths, s, steps, lr, batch_size, device) for s in seeds)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    aligned = rebasin_align([sd_a, sd_b], spec_from_model(a))[1]
    probe = MLP(math.prod(x.shape[1:]), classes, widths=tuple(widths), device=device).eval()
    xt, yt = xt.to(device), yt.to(device)
    rows: list[Row] = []
    for alpha in alphas:
        row: Row = {"alpha": float(alpha)}
        for name, other in (("naive", sd_b), ("rebasin", aligned)):
            probe.load_state_dict(interpolate_state_dicts(sd_a, other, alpha))
            row[f"loss_{name}"], row[f"acc_{name}"] = _evaluate(probe, xt, yt)
        rows.append(row)
    log.info("barrier curves on %s: %s", dataset, summarize(rows))
    return rows


def summarize(rows: Sequence[Row]) -> dict[str, float]:
    """Barriers (``max_a loss(a) - ((1 - a) loss(0) + a loss(1))``; rows must hold alphas 0 and 1) and the
    accuracies at the end points and at the point nearest the midpoint."""
    by = {r["alpha"]: r for r in rows}
    if 0.0 not in by or 1.0 not in by:
        raise ValueError("the rows need alpha 0 and alpha 1 (the end points) to give a barrier")
    mid = min(rows, key=lambda r: abs(r["alpha"] - 0.5))
    out = {"acc_a": by[0.0]["acc_naive"], "acc_b": by[1.0]["acc_naive"]}
    for name in ("naive", "rebasin"):
        lo, hi = by[0.0][f"loss_{name}"], by[1.0][f"loss_{name}"]
        out[f"barrier_{name}"] = max(r[f"loss_{name}"] - ((1 - r["alpha"]) * lo + r["alpha"] * hi) for r in rows)
        out[f"mid_acc_{name}"] = mid[f"acc_{name}"]
    return out


def write_plot(rows: Sequence[Row], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy along the path, naive vs re-basin, as an image at ``path`` (matplotlib, Agg)."""
    plt = pyplot()

    alphas = [r["alpha"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, what in zip(axes, ("loss", "acc"), strict=True):
        for name, style in (("naive", "--"), ("rebasin", "-")):
            ax.plot(alphas, [r[f"{what}_{name}"] for r in rows], style, marker="o", ms=3, label=name)
        ax.set_xlabel("alpha (0: model A, 1: model B)")
        ax.set_ylabel("test loss" if what == "loss" else "test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "linear interpolation between two seeds: naive vs Git Re-Basin weight matching")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------ the bench suite
def _rebasin_suite(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    """Per dataset: the path rows (alpha, loss and accuracy naive / re-basin) and one summary row (barriers)."""
    from edgetune.bench.harness import DEFAULT_RESULTS_DIR

    default = ["digits"] if ctx.quick else ["digits", "fashion-mnist"]
    datasets = ctx.option("datasets", default)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    widths = (64, 64) if ctx.quick else (512, 512)
    steps = int(ctx.option("steps", 150 if ctx.quick else 2000))
    alphas = [i / 10 for i in range(11)] if ctx.quick else None
    plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if ctx.quick else DEFAULT_RESULTS_DIR))
    out: list[dict[str, Any]] = []
    for name in datasets:
        t0 = time.perf_counter()
        rows = barrier_curves(name, widths=widths, steps=steps, seeds=(ctx.seed, ctx.seed + 1), alphas=alphas,
                              limit_train=1000 if ctx.quick else None, device=str(ctx.device))
        s = summarize(rows)
        write_plot(rows, plot_dir / f"merging-rebasin-{name}.png",
                   title=f"{name}: two MLPs {widths} from seeds {ctx.seed}/{ctx.seed + 1}, naive vs re-basin")
        common = {"dataset": name, "widths": "x".join(map(str, widths)), "steps": steps}
        out += [{**common, "row": "path", **r} for r in rows]
        out.append({**common, "row": "summary", **s, "seconds": time.perf_counter() - t0})
    return out


register_suite("merging-rebasin", "loss barrier between two independently trained MLPs, naive vs Git Re-Basin",
               options={"datasets": "datasets (default digits, fashion-mnist; quick: digits)",
                        "steps": "training steps of each MLP (default 2000; quick 150)",
                        "plot_dir": "folder of the merging-rebasin-<dataset>.png plots (default bench/results)"},
               )(_rebasin_suite)
