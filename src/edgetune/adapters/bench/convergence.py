"""``adapters-convergence`` suite: does a low-rank method reach the full fine-tuning (FPFT) solution?

The claim of RAC-LoRA (Malinovsky, Michieli et al. 2024): with the same rank, steps and optimizer, RAC-LoRA's
distance to the FPFT optimum keeps shrinking as links accrue, while plain LoRA (and asymmetric LoRA) stall at a
rank-``r``-limited value; COLA has no such guarantee. Two problems, every method trained full-batch from the same
start through edgetune's adapters and :class:`~edgetune.integrations.MethodStepper`:

- ``least-squares``: ``min_W 0.5 * mean ||x W^T - y||^2`` with ``W*`` known in closed form (``lstsq``), started
  from ``W0 = W* + E`` with ``E`` full rank, so only a full-rank update reaches ``W*``. Figure: the relative
  distance ``||W - W*||_F / ||W0 - W*||_F`` of the effective weight (base + the adapter's whole update). The
  best any rank-``r`` update can do (closed form, :func:`rank_limited_distance`) is a row of its own.
- ``mlp``: teacher-student regression; the student is the teacher with every weight perturbed at full rank, the
  adapters sit on every ``Linear``. The FPFT optimum ``L*`` is estimated by full fine-tuning for ``ref_factor``
  times the budget with the learning rate annealed to zero (a row of its own; the teacher makes the true optimum
  0, which it approaches); figure: the relative loss gap ``(L - L*) / (L0 - L*)``.

One row per (problem, method, link boundary) -- every ``steps_per_link`` steps (every few links when there are
many), also for the methods without links -- with ``final`` marking each curve's last point, and a plot (log-y
figure against steps, one line per method). Short links suit RAC-LoRA: each is a few gradient steps in a fresh
random subspace.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import edgetune.adapters.asymmetric
import edgetune.adapters.chain
import edgetune.adapters.rac_lora  # noqa: F401  (the three register their methods)
from edgetune.adapters.config import AdapterConfig
from edgetune.adapters.layer import AdapterLayer
from edgetune.adapters.model import add_adapter_
from edgetune.bench.harness import DEFAULT_RESULTS_DIR, BenchContext, register_suite
from edgetune.bench.plots import pyplot, save_figure

__all__ = ["METHODS", "convergence_table", "effective_weight", "least_squares_problem", "plot_convergence",
           "rank_limited_distance", "teacher_student_problem"]

log = logging.getLogger(__name__)
METHODS = ("full", "lora", "asymmetric", "chain", "rac_lora")
CHAINS = ("chain", "rac_lora")

# sizes: (least squares: in = out, samples, rank, links, steps per link), (mlp: in, hidden, out, samples, rank,
# links, steps per link)
QUICK = {"ls": (16, 64, 2, 80, 5), "mlp": (8, 16, 4, 128, 2, 30, 5)}
FULL = {"ls": (32, 128, 4, 150, 10), "mlp": (16, 32, 8, 512, 2, 200, 10)}
POINTS = 50  # about this many points per curve


# ------------------------------------------------------------------------------------------ problems (pure)
def least_squares_problem(n: int, samples: int, generator: torch.Generator, noise: float = 0.1
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X (N, n), Y (N, n), W0 (n, n), W* (n, n))``: ``W*`` the least-squares solution of ``X W^T = Y``, ``W0``
    at a full-rank Gaussian ``N(0, 1 / n)`` offset from it."""
    x = torch.randn(samples, n, generator=generator)
    w_true = torch.randn(n, n, generator=generator) / math.sqrt(n)
    y = x @ w_true.T + noise * torch.randn(samples, n, generator=generator)
    w_star = torch.linalg.lstsq(x, y).solution.T
    w0 = w_star + torch.randn(n, n, generator=generator) / math.sqrt(n)
    return x, y, w0, w_star


def rank_limited_distance(x: Tensor, w0: Tensor, w_star: Tensor, rank: int) -> float:
    """``||W - W*|| / ||W0 - W*||`` at the best ``W = W0 + D`` with ``rank(D) <= rank`` for the loss
    ``||X W^T - Y||^2`` (Eckart-Young in the metric ``S = (X^T X)^(1/2)``: ``D S`` is the truncated SVD of
    ``(W* - W0) S``)."""
    evals, evecs = torch.linalg.eigh(x.T.double() @ x.double())
    s = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    s_inv = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    e = (w_star - w0).double()
    u, sv, vh = torch.linalg.svd(e @ s)
    d = (u[:, :rank] * sv[:rank]) @ vh[:rank] @ s_inv
    return float((d - e).norm() / e.norm())


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, d_out))


def teacher_student_problem(d_in: int, hidden: int, d_out: int, samples: int, generator: torch.Generator
                            ) -> tuple[nn.Module, Tensor, Tensor]:
    """``(student, X, Y)``: ``Y`` the outputs of a random tanh MLP (the teacher) on Gaussian ``X``; the student is
    the teacher with each weight moved by a full-rank Gaussian ``N(0, 1 / fan_in)`` offset (biases kept)."""
    teacher = _mlp(d_in, hidden, d_out)
    with torch.no_grad():
        for m in teacher:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 1.5 / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
        x = torch.randn(samples, d_in, generator=generator)
        y = teacher(x)
        for m in teacher:
            if isinstance(m, nn.Linear):
                m.weight.add_(torch.randn(m.weight.shape, generator=generator) / math.sqrt(m.in_features))
    return teacher, x, y


def effective_weight(layer: nn.Module) -> Tensor:
    """The weight a layer computes with: its own, or an adapted layer's base weight plus every active, unmerged
    adapter's update."""
    if not isinstance(layer, AdapterLayer):
        return layer.weight.detach()
    w = layer.base_layer.weight.detach().clone()
    for name in layer.active:
        if name not in layer.merged:
            w += layer.adapters[name].delta_weight(w).detach()
    return w


# ------------------------------------------------------------------------------------------ training
def _mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (model(x) - y).pow(2).sum(1).mean()


def _train(model: nn.Module, method: str, x: Tensor, y: Tensor, *, rank: int, links: int, spl: int, total: int,
           optimizer: str, lr: float, seed: int, probe: Callable[[nn.Module], float], anneal: bool = False
           ) -> tuple[list[tuple[int, float]], int, float]:
    """Train ``model`` full-batch with ``method`` (``full``: every parameter) for ``total`` steps at a constant
    ``lr`` (``anneal``: cosine-decayed to zero); return the ``(step, probe)`` pairs at step 0, at every
    ``k``-th link boundary (``k`` keeps about :data:`POINTS` points) and at the end, the trainable parameter count
    and the training time."""
    from edgetune.adapters.callbacks import adapter_callbacks
    from edgetune.integrations.stepper import MethodStepper

    callbacks = []
    if method != "full":
        fields: dict[str, Any] = {"method": method, "rank": rank, "alpha": float(rank)}  # scale 1 for every method
        if method in CHAINS:
            fields.update(links=links, steps_per_link=spl)
        add_adapter_(model, AdapterConfig.model_validate(fields), seed=seed)
        callbacks = adapter_callbacks(model, total_steps=total)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)) if anneal
                                              else 1.0)
    curve = [(0, probe(model))]
    every = spl * max(1, math.ceil(total / spl / POINTS))
    t0 = time.perf_counter()
    with MethodStepper(model, opt, callbacks, total_steps=total) as stepper:
        for step in range(1, total + 1):
            loss = _mse(model, x, y)
            loss.backward()
            opt.step()
            stepper.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % every == 0 or step == total:
                curve.append((step, probe(model)))
    return curve, sum(p.numel() for p in params), time.perf_counter() - t0


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@register_suite("adapters-convergence",
                summary="RAC-LoRA vs LoRA/asymmetric/COLA vs full fine-tuning: distance to the FPFT optimum",
                options={"methods": f"methods to run (default all: {', '.join(METHODS)})",
                         "problems": "least-squares and/or mlp (default both)",
                         "ls_optimizer": "sgd (default: full-batch GD, the paper's setting) or adam",
                         "ls_lr": "learning rate on least squares (default 0.3)",
                         "mlp_optimizer": "adam (default) or sgd", "mlp_lr": "learning rate on the MLP (default 0.01)",
                         "ref_factor": "FPFT reference budget on the MLP, in multiples of the steps (default 4)",
                         "plot_dir": "folder of adapters-convergence.png (default bench/results; quick: scratch)"},
                table=lambda path: convergence_table(path))
def _convergence(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    sizes = QUICK if ctx.quick else FULL
    methods = [str(m) for m in _as_list(ctx.option("methods", list(METHODS)))]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"adapters-convergence: unknown methods {unknown}; choose from {list(METHODS)}")
    problems = [str(p) for p in _as_list(ctx.option("problems", ["least-squares", "mlp"]))]
    rows: list[dict[str, Any]] = []
    if "least-squares" in problems:
        rows += _least_squares(ctx, methods, sizes["ls"])
    if "mlp" in problems:
        rows += _teacher_student(ctx, methods, sizes["mlp"])
    plot_dir = Path(ctx.option("plot_dir", ctx.out_dir if ctx.quick else DEFAULT_RESULTS_DIR))
    path = plot_convergence(rows, plot_dir / "adapters-convergence.png")
    log.info("adapters-convergence: plot in %s", path)
    yield from rows


def _least_squares(ctx: BenchContext, methods: list[str], size: tuple[int, ...]) -> list[dict[str, Any]]:
    n, samples, rank, links, spl = size
    optimizer, lr = str(ctx.option("ls_optimizer", "sgd")), float(ctx.option("ls_lr", 0.3))
    x, y, w0, w_star = least_squares_problem(n, samples, torch.Generator().manual_seed(ctx.seed))
    d0 = float((w0 - w_star).norm())
    common = {"problem": "least-squares", "figure": "rel_distance", "rank": rank, "links": links,
              "steps_per_link": spl, "optimizer": optimizer, "lr": lr, "size": f"{n}x{n}, {samples} samples"}
    bound = rank_limited_distance(x, w0, w_star, rank)
    rows: list[dict[str, Any]] = [{**common, "method": f"rank-{rank} optimum", "step": None, "link": None,
                                   "value": bound, "final": True}]
    total = links * spl

    def probe(model: nn.Module) -> float:
        return float((effective_weight(model[0]) - w_star).norm()) / d0

    for method in methods:
        model = nn.Sequential(nn.Linear(n, n, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(w0)
        curve, trainable, secs = _train(model, method, x, y, rank=rank, links=links, spl=spl, total=total,
                                        optimizer=optimizer, lr=lr, seed=ctx.seed, probe=probe)
        rows += _curve_rows(common, method, curve, spl, trainable, secs)
        log.info("least-squares %s: relative distance %.4f (rank-%d optimum %.4f)", method, curve[-1][1], rank, bound)
    return rows


def _teacher_student(ctx: BenchContext, methods: list[str], size: tuple[int, ...]) -> list[dict[str, Any]]:
    d_in, hidden, d_out, samples, rank, links, spl = size
    optimizer, lr = str(ctx.option("mlp_optimizer", "adam")), float(ctx.option("mlp_lr", 0.01))
    student, x, y = teacher_student_problem(d_in, hidden, d_out, samples, torch.Generator().manual_seed(ctx.seed))
    total = links * spl
    common = {"problem": "mlp", "rank": rank, "links": links, "steps_per_link": spl, "optimizer": optimizer,
              "lr": lr, "size": f"{d_in}-{hidden}-{hidden}-{d_out}, {samples} samples"}

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(_mse(model, x, y))

    factor = int(ctx.option("ref_factor", 4))
    ref, _, _ = _train(copy.deepcopy(student), "full", x, y, rank=rank, links=links, spl=spl * factor,
                       total=total * factor, optimizer=optimizer, lr=lr, seed=ctx.seed, probe=loss, anneal=True)
    l0, l_star = ref[0][1], ref[-1][1]
    rows: list[dict[str, Any]] = [{**common, "figure": "loss", "method": f"fpft x{factor} steps (L*)", "step": None,
                                   "link": None, "value": l_star, "final": True}]
    for method in methods:
        curve, trainable, secs = _train(copy.deepcopy(student), method, x, y, rank=rank, links=links, spl=spl,
                                        total=total, optimizer=optimizer, lr=lr, seed=ctx.seed, probe=loss)
        gaps = [(s, (v - l_star) / (l0 - l_star)) for s, v in curve]
        rows += _curve_rows({**common, "figure": "rel_loss_gap"}, method, gaps, spl, trainable, secs,
                            losses=[v for _, v in curve])
        log.info("mlp %s: loss %.3e, relative gap to FPFT %.4f", method, curve[-1][1], gaps[-1][1])
    return rows


def _curve_rows(common: dict[str, Any], method: str, curve: list[tuple[int, float]], spl: int, trainable: int,
                secs: float, losses: list[float] | None = None) -> list[dict[str, Any]]:
    rows = []
    for i, (step, value) in enumerate(curve):
        rows.append({**common, "method": method, "step": step, "link": step // spl,
                     "value": value, "loss": losses[i] if losses else None, "final": i == len(curve) - 1,
                     "trainable_params": trainable, "train_time_s": secs})
    return rows


# ------------------------------------------------------------------------------------------ plot and table
def plot_convergence(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One panel per problem: each method's figure against steps (log y), the reference rows dashed."""
    plt = pyplot()

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4.2), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for ax, problem in zip(axes[0], problems, strict=True):
        mine = [r for r in rows if r["problem"] == problem]
        for method in dict.fromkeys(r["method"] for r in mine if r["step"] is not None):
            pts = [(r["step"], max(r["value"], 1e-9)) for r in mine if r["method"] == method]
            ax.plot(*zip(*pts, strict=True), color=colours.get(method), lw=1.5, label=method, zorder=2)
        for r in mine:
            if r["step"] is None and r["figure"] == "rel_distance":
                ax.axhline(r["value"], color="black", ls=":", lw=1.2, label=r["method"], zorder=3)
        first = mine[-1]
        ylabel = {"least-squares": "||W - W*|| / ||W0 - W*||", "mlp": "(L - L*) / (L0 - L*)"}.get(problem, "")
        ax.set(yscale="log", xlabel="optimizer step", ylabel=ylabel,
               title=f"{problem} ({first['size']}): rank {first['rank']}, {first['links']} links x "
                     f"{first['steps_per_link']} steps, {first['optimizer']} lr {first['lr']}")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def convergence_table(csv_path: str | Path) -> str:
    """Markdown table of each run's final figures (one column per problem), newest run first."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("final") == "True"]
    runs = list(dict.fromkeys((r["timestamp_utc"], r["quick"]) for r in rows))
    lines = []
    for stamp, quick in reversed(runs):
        mine = [r for r in rows if (r["timestamp_utc"], r["quick"]) == (stamp, quick)]
        problems = list(dict.fromkeys(r["problem"] for r in mine))
        lines += [f"**{stamp}** (quick={quick}): " + "; ".join(
                      f"{p}: {next(r['size'] for r in mine if r['problem'] == p)}, rank "
                      f"{next(r['rank'] for r in mine if r['problem'] == p)}" for p in problems), "",
                  "| method | " + " | ".join(f"{p} ({next(r['figure'] for r in mine if r['problem'] == p and r['step'])})"
                                            for p in problems) + " | trainable params |",
                  "|---|" + "---|" * (len(problems) + 1)]
        for method in dict.fromkeys(r["method"] for r in mine):
            vals = {r["problem"]: r for r in mine if r["method"] == method}
            cells = [f"{float(vals[p]['value']):.4g}" if p in vals else "–" for p in problems]
            params = "/".join(vals[p].get("trainable_params", "") for p in problems if p in vals and
                              vals[p].get("trainable_params"))
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {params or '–'} |")
        lines.append("")
    return "\n".join(lines)
