"""``loop-overhead`` suite: time per step of edgetune's :class:`~edgetune.train.Trainer` against a bare PyTorch loop.

Both sides train the same model from the same initial weights on the same in-memory tensors (Fashion-MNIST
shaped: ``(N, 1, 28, 28)`` float inputs, 10 classes), with the same optimizer (AdamW, constant LR), batch size,
number of steps, thread count and data order (the bare loop draws the permutation the Trainer draws), so
their final losses must agree: ``final_loss_abs_diff`` is the quality check beside the timings.

What is timed, on both sides, is one full step cycle: the time between two consecutive returns from
``optimizer.step()`` (the Trainer's ``after_optimizer_step`` hook; a ``perf_counter`` after ``opt.step()`` in the
bare loop). For the Trainer this includes everything it does per step: LR schedule step (constant schedule),
batch indexing, task loss plus its accuracy/loss sums, hook dispatch, and the running-metrics log every
``log_every_steps`` (its default, 50; in memory, ``run_dir=None``). Excluded on the Trainer side: checkpoints
(off), progress bar (off), evaluation (no val/test split), and the one-off set-up of ``fit`` (reported apart as
``fit_setup_ms``). The first ``warmup`` steps of every repeat are dropped. Repeats alternate which side runs
first; the overhead is the ratio of the medians over all timed steps, minus one (target: <= 5%).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.bench.harness import BenchContext, register_suite
from edgetune.core.hooks import Callback, TrainState

__all__ = ["StepClock", "bare_loop", "edgetune_loop"]

log = logging.getLogger(__name__)

# model -> (architecture options, batch, steps per repeat, repeats); quick: fewer steps and repeats
CASES: dict[str, tuple[str, dict[str, Any], int, int, int]] = {
    "mlp": ("mlp", {"widths": [256, 256]}, 128, 200, 5),
    "resnet20": ("resnet20", {}, 64, 30, 3),
}
QUICK_CASES = {"mlp": ("mlp", {"widths": [64]}, 32, 12, 2), "resnet20": ("resnet20", {}, 8, 4, 1)}
WARMUP = 3
LR = 1e-3


class StepClock(Callback):
    """Records ``perf_counter`` after every optimizer step (a hook with nothing else to do)."""

    name = "step-clock"

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def after_optimizer_step(self, state: TrainState) -> None:
        self.stamps.append(time.perf_counter())


def _deltas(t_start: float, stamps: list[float], warmup: int) -> list[float]:
    times = [b - a for a, b in zip([t_start, *stamps[:-1]], stamps)]
    return times[warmup:]


def edgetune_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, threads: int,
                  seed: int, warmup: int = WARMUP) -> tuple[list[float], float, float]:
    """Train with edgetune's Trainer; (seconds per step after warm-up, final batch loss, fit set-up seconds)."""
    from torch.utils.data import TensorDataset

    from edgetune.train.config import TrainConfig
    from edgetune.train.loop import Trainer

    cfg = TrainConfig(epochs=1, batch_size=batch, max_steps=steps, num_threads=threads, progress=False,
                      optimizer={"name": "adamw", "lr": LR, "weight_decay": 0.0}, schedule={"name": "constant"},
                      checkpoint={"every_epochs": None})
    clock = StepClock()
    t0 = time.perf_counter()
    trainer = Trainer(model, TensorDataset(x, y), cfg, callbacks=[clock], seed=seed)
    t_fit = time.perf_counter()
    trainer.fit()
    trainer.close()
    setup = t_fit - t0
    loss = float(trainer.state.loss) if trainer.state.loss is not None else float("nan")
    return _deltas(t_fit, clock.stamps, warmup), loss, setup


def bare_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, threads: int,
              seed: int, warmup: int = WARMUP) -> tuple[list[float], float]:
    """The plain PyTorch loop (the Trainer's data order); (seconds per step after warm-up, final batch loss)."""
    torch.set_num_threads(threads)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed * 1_000_003)  # the Trainer's epoch-0 permutation
    perm = torch.randperm(len(x), generator=g)
    stamps: list[float] = []
    t_start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for b in range(steps):
        idx = perm[b * batch:(b + 1) * batch]
        xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return _deltas(t_start, stamps, warmup), float(loss.detach())


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@register_suite(
    "loop-overhead",
    summary="edgetune Trainer vs a bare PyTorch loop: median time per step and overhead ratio (MLP, resnet20)",
    options={"models": "list of mlp, resnet20 (default both)", "steps": "steps per repeat",
             "repeats": "interleaved repeats per side", "batch": "batch size", "threads": "torch threads (default: current)"},
)
def _loop_overhead(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    from edgetune.core.seed import seed_everything
    from edgetune.measure import count_parameters
    from edgetune.models.base import ModelSpec, build_model

    threads = int(ctx.option("threads", torch.get_num_threads()))
    cases = QUICK_CASES if ctx.quick else CASES
    for name in _as_list(ctx.option("models", list(cases))):
        if name not in cases:
            from edgetune.core.errors import ConfigError

            raise ConfigError(f"loop-overhead: unknown model {name!r}; choose from {', '.join(cases)}")
        arch, opts, batch, steps, repeats = cases[name]
        batch = int(ctx.option("batch", batch))
        steps = int(ctx.option("steps", steps))
        repeats = int(ctx.option("repeats", repeats))
        if steps <= WARMUP:
            steps = WARMUP + 1
        spec = ModelSpec(input_shape=(1, 28, 28), num_classes=10)
        seed_everything(ctx.seed)
        init = build_model(arch, opts, spec).state_dict()
        g = torch.Generator().manual_seed(ctx.seed)
        n = batch * steps
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        et_times: list[float] = []
        bare_times: list[float] = []
        setups: list[float] = []
        diffs: list[float] = []
        ratios: list[float] = []
        for r in range(repeats):
            got: dict[str, tuple[list[float], float]] = {}
            for side in (("edgetune", "bare") if r % 2 == 0 else ("bare", "edgetune")):
                model = build_model(arch, opts, spec)
                model.load_state_dict(init)
                if side == "edgetune":
                    times, loss, setup = edgetune_loop(model, x, y, batch, steps, threads, ctx.seed)
                    setups.append(setup)
                else:
                    times, loss = bare_loop(model, x, y, batch, steps, threads, ctx.seed)
                got[side] = (times, loss)
            et_times += got["edgetune"][0]
            bare_times += got["bare"][0]
            diffs.append(abs(got["edgetune"][1] - got["bare"][1]))
            ratios.append(statistics.median(got["edgetune"][0]) / statistics.median(got["bare"][0]))
            log.info("loop-overhead %s repeat %d: edgetune %.2f ms, bare %.2f ms", name, r,
                     statistics.median(got["edgetune"][0]) * 1e3, statistics.median(got["bare"][0]) * 1e3)
        med_et, med_bare = statistics.median(et_times), statistics.median(bare_times)
        yield {
            "model": name, "architecture": f"{arch} {opts}" if opts else arch,
            "parameters": count_parameters(build_model(arch, opts, spec)), "batch": batch,
            "steps_per_repeat": steps, "repeats": repeats, "timed_steps_per_side": len(et_times),
            "warmup_steps": WARMUP, "torch_threads": threads, "optimizer": f"adamw lr={LR} constant",
            "edgetune_step_ms_median": med_et * 1e3, "bare_step_ms_median": med_bare * 1e3,
            "edgetune_step_ms_p10": _quantile(et_times, 0.1) * 1e3, "bare_step_ms_p10": _quantile(bare_times, 0.1) * 1e3,
            "overhead_ratio": med_et / med_bare - 1.0,
            "overhead_ratio_per_repeat_median": statistics.median(ratios) - 1.0,
            "overhead_ms_median": (med_et - med_bare) * 1e3,
            "fit_setup_ms": statistics.median(setups) * 1e3,
            "final_loss_abs_diff": max(diffs),
            "within_5pct": med_et / med_bare - 1.0 <= 0.05,
            "excluded": "checkpoints off, progress off, no eval split; fit set-up reported apart",
        }


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]
