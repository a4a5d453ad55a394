"""``hf-parity`` suite: the same MiniLM fine-tune through edgetune's loop and through Hugging Face's ``Trainer``.

One model (all-MiniLM-L6-v2 encoder, mean pooling, a new 2-way head: :class:`FeatureClassifier`) is built
once and deep-copied for each side, and fine-tuned for ``steps`` optimizer steps on a SpamAssassin subset.

Matched on purpose:
- initial weights (one copy of the model), tokenization (the model's tokenizer, ``max_length``), padding trim
  (edgetune's :class:`TrimPadding`, run in the HF side's collator too);
- data order: the HF side reads an ``IterableDataset`` that yields the examples in the order edgetune's loop
  draws them (its seeded permutation per epoch), so both see the same batches; batch dispatch is off;
- optimizer: AdamW (``adamw_torch``), same lr, betas, eps 1e-8, weight decay 0 (HF would exempt biases and
  LayerNorm weights from decay; with 0 there is nothing to exempt), gradient clipping at norm 1.0 on both;
- LR schedule: linear decay to 0 over ``steps`` without warm-up (edgetune's warm-up gives ``(s+1)/w`` at step
  ``s``, HF's ``s/w``, so warm-up is left out rather than mismatched);
- loss: mean cross-entropy on the head's logits (the HF side wraps the model in a module that returns it);
  both per-step curves are the exact float loss of each step (HF's logged loss is rounded to 4 decimals, so
  the wrapper records it instead);
- dropout: mode ``off`` sets every ``nn.Dropout`` (attention dropout included) to p=0, so the two runs are the
  same computation and the curves must agree to float round-off; mode ``on`` keeps the model's dropout (0.1)
  with the global RNG seeded identically right before each ``train`` call: whether masks line up then depends
  on what else draws from the RNG first (accelerate, samplers), so only a statistical match is expected.

Not matched: the HF side also runs its own per-step bookkeeping (accelerate's wrapper, ``TrainerState``,
logging every step, callbacks) and edgetune its own (task sums, hooks, log every step): that is what the time
per step compares. The HF Trainer gets ``EdgetuneTrainerCallback`` with one no-op edgetune callback (the
adapter rejects an empty list) so the adapter's per-step cost is included. The two sides run one after the other (which one first alternates between
dropout modes, column ``ran_first``), so on a shared machine their times differ by the load of the moment too.
"""

from __future__ import annotations

import copy
import csv
import logging
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.bench.harness import DEFAULT_RESULTS_DIR, BenchContext, register_suite
from edgetune.bench.loop_overhead import StepClock
from edgetune.bench.plots import pyplot, save_figure
from edgetune.core.hooks import Callback

__all__ = ["hf_order", "plot_curves"]

log = logging.getLogger(__name__)
WARMUP = 2


class _NoOp(Callback):
    name = "noop"


def hf_order(n: int, batch: int, steps: int, seed: int) -> list[int]:
    """Example indices in the order edgetune's loop visits them for ``steps`` batches (session 0, one process)."""
    per_epoch = -(-n // batch)
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        for b in range(per_epoch):  # a short last batch is a batch of its own in edgetune's loop
            order.extend(perm[b * batch:(b + 1) * batch])
        epoch += 1
    return order[: steps * batch]


class _Ordered(torch.utils.data.IterableDataset):
    def __init__(self, columns: dict[str, torch.Tensor], order: list[int]) -> None:
        self.columns, self.order = columns, order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in self.order:
            yield {k: v[i] for k, v in self.columns.items()}


class _WithLoss(nn.Module):
    """The classifier plus its mean cross-entropy, as the HF Trainer wants it; records every training loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.losses: list[float] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        loss = F.cross_entropy(logits.float(), labels)
        if self.training:
            self.losses.append(float(loss.detach()))
        return {"loss": loss, "logits": logits}


def _no_dropout_(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _edgetune_side(model: nn.Module, train: Any, transform: Any, batch: int, steps: int, lr: float,
                   seed: int, threads: int) -> tuple[list[float], list[float], list[float]]:
    from edgetune.core.seed import seed_everything
    from edgetune.train.config import TrainConfig
    from edgetune.train.loop import Trainer

    cfg = TrainConfig(epochs=10_000, batch_size=batch, max_steps=steps, num_threads=threads, progress=False,
                      optimizer={"name": "adamw", "lr": lr, "weight_decay": 0.0}, grad_clip=1.0,
                      schedule={"name": "linear", "warmup_steps": 0}, log_every_steps=1,
                      checkpoint={"every_epochs": None})
    clock = StepClock()
    trainer = Trainer(model, train, cfg, callbacks=[clock], seed=seed, task="classification", transform=transform)
    seed_everything(seed)
    t0 = time.perf_counter()
    trainer.fit()
    trainer.close()
    recs = [r for r in trainer.history if r.get("kind") == "train"]
    times = [b - a for a, b in zip([t0, *clock.stamps[:-1]], clock.stamps)]
    return [float(r["loss"]) for r in recs], [float(r["lr"]) for r in recs], times


def _hf_side(model: nn.Module, train: Any, transform: Any, batch: int, steps: int, lr: float, seed: int,
             threads: int, out_dir: Path) -> tuple[list[float], list[float], list[float], str]:
    import transformers

    from edgetune.core.seed import seed_everything

    class _Clock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.stamps.append(time.perf_counter())

    callbacks: list[Any] = []
    adapter = "none"
    try:
        from edgetune.integrations.hf_trainer import EdgetuneTrainerCallback

        callbacks.append(EdgetuneTrainerCallback([_NoOp()]))
        adapter = "EdgetuneTrainerCallback([no-op])"
    except Exception as e:  # noqa: BLE001 - the adapter is optional here: run the Trainer bare and say so
        log.warning("hf-parity: EdgetuneTrainerCallback unavailable (%s); running the HF Trainer without it", e)
    clock = _Clock()
    callbacks.append(clock)

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        stacked = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return transform(stacked) if transform is not None else stacked

    torch.set_num_threads(threads)
    wrapped = _WithLoss(model)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        lr_scheduler_type="linear", warmup_steps=0, optim="adamw_torch", logging_strategy="steps", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=seed, dataloader_num_workers=0,
        remove_unused_columns=False, accelerator_config={"dispatch_batches": False},
    )
    order = hf_order(len(train), batch, steps, seed)
    ds = _Ordered(train.columns, order)
    trainer = transformers.Trainer(model=wrapped, args=args, train_dataset=ds, data_collator=collate,
                                   callbacks=callbacks)
    seed_everything(seed)
    t0 = time.perf_counter()
    trainer.train()
    lrs = [float(h["learning_rate"]) for h in trainer.state.log_history if "learning_rate" in h]
    times = [b - a for a, b in zip([t0, *clock.stamps[:-1]], clock.stamps)]
    return list(wrapped.losses), lrs, times, adapter


def plot_curves(curves: list[dict[str, Any]], path: str | Path) -> None:
    """PNG of both loss curves per dropout mode (rows of :data:`curves`: mode, step, edgetune_loss, hf_loss)."""
    plt = pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in curves))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in curves if r["mode"] == mode]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["edgetune_loss"] for r in rows], label="edgetune Trainer", lw=2)
        ax.plot(steps, [r["hf_loss"] for r in rows], label="HF Trainer", lw=1.2, ls="--", marker=".", ms=4)
        diff = max(abs(r["edgetune_loss"] - r["hf_loss"]) for r in rows)
        ax.set_title(f"MiniLM fine-tune, dropout {mode}: max |diff| {diff:.2e}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (batch)")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@register_suite(
    "hf-parity",
    summary="MiniLM fine-tune through edgetune's loop and HF's Trainer: per-step loss curves, max diff, step time",
    options={"steps": "optimizer steps (default 40; quick 4)", "batch": "batch size (default 16; quick 4)",
             "max_length": "tokens per text (default 64; quick 32)", "lr": "learning rate (default 5e-5)",
             "dropout": "list of modes: off (exact parity) and/or on (default both; quick off)",
             "curves_dir": "folder for hf-parity-curves.csv and hf-parity.png (default bench/results; quick: scratch)"},
)
def _hf_parity(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    from edgetune.core.seed import seed_everything
    from edgetune.data.base import DataConfig, load_dataset
    from edgetune.data.tokenize import tokenize_bundle
    from edgetune.models.pretrained import load_pretrained

    steps = int(ctx.option("steps", 4 if ctx.quick else 40))
    batch = int(ctx.option("batch", 4 if ctx.quick else 16))
    max_length = int(ctx.option("max_length", 32 if ctx.quick else 64))
    lr = float(ctx.option("lr", 5e-5))
    modes = [str(m) for m in _as_list(ctx.option("dropout", ["off"] if ctx.quick else ["off", "on"]))]
    curves_dir = Path(ctx.option("curves_dir", ctx.out_dir if ctx.quick else DEFAULT_RESULTS_DIR))
    threads = torch.get_num_threads()
    n_train = batch * max(1, min(steps, 32))  # a small subset; longer runs revisit it in later epochs
    bundle = load_dataset(DataConfig(name="spamassassin", limit_train=n_train, limit_test=8, seed=ctx.seed))
    seed_everything(ctx.seed)
    loaded = load_pretrained("minilm", num_classes=bundle.num_classes)
    bundle = tokenize_bundle(bundle, loaded.tokenizer, max_length)
    curves: list[dict[str, Any]] = []
    for mode in modes:
        if mode not in ("off", "on"):
            from edgetune.core.errors import ConfigError

            raise ConfigError(f"hf-parity: dropout mode {mode!r} is not off or on")
        base = copy.deepcopy(loaded.model)
        if mode == "off":
            _no_dropout_(base)
        hf_first = modes.index(mode) % 2 == 1  # alternate which side runs first
        sides = ("hf", "edgetune") if hf_first else ("edgetune", "hf")
        for side in sides:
            if side == "edgetune":
                et_loss, et_lr, et_t = _edgetune_side(copy.deepcopy(base), bundle.train, bundle.transform, batch,
                                                      steps, lr, ctx.seed, threads)
            else:
                with tempfile.TemporaryDirectory(prefix="edgetune-hf-parity-") as tmp:
                    hf_loss, hf_lr, hf_t, adapter = _hf_side(copy.deepcopy(base), bundle.train, bundle.transform,
                                                             batch, steps, lr, ctx.seed, threads, Path(tmp))
        n = min(len(et_loss), len(hf_loss))
        if n != steps or len(hf_loss) != len(et_loss):
            log.warning("hf-parity: %d edgetune and %d HF losses for %d steps", len(et_loss), len(hf_loss), steps)
        diffs = [abs(a - b) for a, b in zip(et_loss[:n], hf_loss[:n])]
        et_used = [lr, *et_lr[:-1]]  # edgetune logs the LR after the step's schedule update; HF the LR the step used
        for i in range(n):
            curves.append({"mode": mode, "step": i + 1, "edgetune_loss": et_loss[i], "hf_loss": hf_loss[i],
                           "abs_diff": diffs[i], "edgetune_lr": et_used[i] if i < len(et_used) else None,
                           "hf_lr": hf_lr[i] if i < len(hf_lr) else None})
        lr_diff = max((abs(a - b) for a, b in zip(et_used, hf_lr)), default=None)
        et_step = statistics.median(et_t[WARMUP:] or et_t)
        hf_step = statistics.median(hf_t[WARMUP:] or hf_t)
        yield {"model": "minilm (FeatureClassifier, mean pool, new head)", "dataset": "spamassassin",
               "dropout": mode, "train_examples": n_train, "steps": steps, "batch": batch, "max_length": max_length,
               "lr": lr, "schedule": "linear, no warm-up", "grad_clip": 1.0, "steps_compared": n,
               "max_abs_loss_diff": max(diffs) if diffs else None,
               "mean_abs_loss_diff": statistics.fmean(diffs) if diffs else None,
               "final_loss_edgetune": et_loss[-1] if et_loss else None, "final_loss_hf": hf_loss[-1] if hf_loss else None,
               "max_abs_lr_diff": lr_diff, "edgetune_step_ms_median": et_step * 1e3, "hf_step_ms_median": hf_step * 1e3,
               "hf_over_edgetune_time": hf_step / et_step, "ran_first": sides[0], "hf_callback": adapter, "torch_threads": threads,
               "transformers": _tf_version()}
    if curves:
        curves_dir.mkdir(parents=True, exist_ok=True)
        path = curves_dir / "hf-parity-curves.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(curves[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(curves)
        plot_curves(curves, curves_dir / "hf-parity.png")
        log.info("hf-parity: curves in %s and %s", path, curves_dir / "hf-parity.png")


def _tf_version() -> str | None:
    try:
        import transformers

        return str(transformers.__version__)
    except ImportError:
        return None
