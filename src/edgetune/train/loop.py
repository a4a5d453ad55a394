"""The training loop: one explicit, readable loop with named hook points (see edgetune.core.hooks).

Data are in-memory ``TensorDataset`` splits whose last tensor is the target; the loop shuffles with a
generator seeded by (seed, epoch), so a resumed run sees exactly the batches the interrupted one would
have seen. Checkpoints hold the model, optimizer, schedule, every RNG, the loop position and each
callback's state; resuming from one reproduces the uninterrupted run bit for bit (same machine, same
thread count).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback, TrainState
from edgetune.core.seed import rng_state, set_rng_state
from edgetune.train.checkpoint import CheckpointManager, check_fingerprint, model_fingerprint
from edgetune.train.config import TrainConfig
from edgetune.train.distributed import DistInfo, barrier, init_distributed, ranks_in_sync
from edgetune.train.metrics import MetricsLog
from edgetune.train.optim import build_optimizer, build_scheduler

__all__ = ["Trainer", "evaluate", "resolve_device"]

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``auto``; asking for CUDA without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is available here; use train.device=cpu or auto")
    return torch.device(name)


def _loss_and_correct(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0):
    """Mean cross-entropy and (#correct, #counted) over (B, C) or (B, T, V) logits; -100 targets ignored."""
    logits = logits.reshape(-1, logits.shape[-1])  # (N, C)
    target = target.reshape(-1)
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
    valid = target != IGNORE_INDEX
    correct = (logits.argmax(-1) == target) & valid
    return loss, correct.sum(), valid.sum()


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``data`` (model put in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    tensors = data.tensors
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(tensors[0]), batch_size):
        batch = [t[i : i + batch_size].to(device, non_blocking=True) for t in tensors]
        loss, c, n = _loss_and_correct(model(*batch[:-1]), batch[-1])
        loss_sum += loss.double() * n
        correct += c
        count += n
    model.train(was_training)
    n = max(1, int(count))
    return {"loss": float(loss_sum) / n, "acc": int(correct) / n}


class Trainer:
    """Trains ``model`` on ``train`` with ``cfg``; evaluates on ``val``/``test`` at epoch ends.

    Args:
        model: any module whose forward takes the dataset's input tensors.
        train / val / test: TensorDatasets, last tensor is the target.
        cfg: the loop's config.
        callbacks: method hooks (sparse topology updates, adapters, ...).
        run_dir: where metrics.jsonl and checkpoints/ go (None: nothing written).
        seed: seeds the data order; the caller seeds model init.
    """

    def __init__(
        self,
        model: nn.Module,
        train: TensorDataset,
        cfg: TrainConfig,
        *,
        val: TensorDataset | None = None,
        test: TensorDataset | None = None,
        callbacks: Sequence[Callback] = (),
        run_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
        self.dist: DistInfo = init_distributed(self.device)
        self.model = model.to(self.device)
        self.train_data, self.val_data, self.test_data = train, val, test
        self.callbacks = list(callbacks)
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.ws = self.dist.world_size
        if cfg.batch_size % self.ws:
            raise ConfigError(
                f"train.batch_size={cfg.batch_size} must be divisible by the number of processes ({self.ws})"
            )
        self.local_batch = cfg.batch_size // self.ws
        n_local = len(train) // self.ws
        if n_local == 0:
            raise ConfigError(f"the training split has {len(train)} examples, fewer than {self.ws} processes")
        self.steps_per_epoch = math.ceil(n_local / self.local_batch)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("the model has no trainable parameters; nothing to train")
        self.optimizer = build_optimizer(trainable, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.schedule)
        self.scaler = torch.amp.GradScaler("cuda") if (cfg.amp and self.device.type == "cuda") else None
        self.ddp_model: nn.Module = self.model
        if self.ws > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.state = TrainState(
            model=self.model, optimizer=self.optimizer, device=self.device, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, rank=self.dist.rank, world_size=self.ws,
        )
        self.batch_in_epoch = 0
        self.earlier_time_s = 0.0  # time spent in fit() by earlier processes of this run (from the checkpoint)
        self._fit_t0: float | None = None
        self.history: list[dict[str, Any]] = []
        main = self.dist.is_main and self.run_dir is not None
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if main else None
        self.ckpt = (
            CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last) if self.run_dir else None
        )

    # ----------------------------------------------------------------------------------- helpers
    def _hook(self, name: str) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self.state)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.cfg.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _batches(self, epoch: int, start: int) -> Iterator[list[torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.train_data)
        perm = torch.randperm(n, generator=g)
        perm = perm[: (n // self.ws) * self.ws][self.dist.rank :: self.ws]
        for b in range(start, self.steps_per_epoch):
            idx = perm[b * self.local_batch : (b + 1) * self.local_batch]
            yield [t[idx].to(self.device, non_blocking=True) for t in self.train_data.tensors]

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics is not None:
            self.metrics.write(record)

    # ------------------------------------------------------------------------------- checkpoints
    def _state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_state(),
            "loop": {"step": self.state.step, "epoch": self.state.epoch, "batch": self.batch_in_epoch,
                     "elapsed_s": self.elapsed_s()},
            "callbacks": {f"{i}:{cb.name}": cb.state_dict() for i, cb in enumerate(self.callbacks)},
        }

    def elapsed_s(self) -> float:
        """Seconds spent in :meth:`fit` over the whole run, earlier (resumed) processes included."""
        now = 0.0 if self._fit_t0 is None else time.perf_counter() - self._fit_t0
        return self.earlier_time_s + now

    def save_checkpoint(self) -> None:
        if self.ckpt is not None and self.dist.is_main:
            self.ckpt.save(self.state.step, self._state_dict(), model_fingerprint(self.model))
        barrier()

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest checkpoint of run_dir (or ``path``); return False when there is none."""
        if path is None:
            path = self.ckpt.latest() if self.ckpt else None
            if path is None:
                return False
        ck = CheckpointManager.load(path, device="cpu")
        check_fingerprint(ck.fingerprint, self.model, ck.path)
        s = ck.state
        names = [f"{i}:{cb.name}" for i, cb in enumerate(self.callbacks)]
        if sorted(s["callbacks"]) != sorted(names):
            from edgetune.core.errors import CheckpointError

            raise CheckpointError(
                f"checkpoint {ck.path} was written with methods {sorted(s['callbacks'])} but this run has "
                f"{sorted(names)}; resume with the recipe that wrote it"
            )
        for name, cb in zip(names, self.callbacks):  # callbacks validate their state before the model changes
            cb.load_state_dict(s["callbacks"][name])
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.scaler and s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        set_rng_state(s["rng"])
        loop = s["loop"]
        self.state.step, self.state.epoch, self.batch_in_epoch = loop["step"], loop["epoch"], loop["batch"]
        self.earlier_time_s = float(loop.get("elapsed_s", 0.0))
        if self.metrics is not None:
            self.metrics.truncate_after(self.state.step)
        log.info("resumed from %s at step %d (epoch %d)", ck.path, self.state.step, self.state.epoch)
        return True

    # ------------------------------------------------------------------------------------- loop
    def _train_step(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        st, opt = self.state, self.optimizer
        opt.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.ddp_model(*batch[:-1])
        loss, correct, count = _loss_and_correct(out, batch[-1], self.cfg.label_smoothing)
        st.loss = loss.detach()  # a live graph here would pin autograd nodes (and stale shapes) to the next step
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._hook("after_backward")
        if self.scaler:
            self.scaler.unscale_(opt)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        st.skip_step = False
        self._hook("before_optimizer_step")
        if not st.skip_step:
            if self.scaler:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
        self._hook("after_optimizer_step")
        if not st.skip_step:  # a skipped step does not advance the LR schedule (CHT code bug, spec §3 item 14)
            self.scheduler.step()
        return loss.detach(), correct, count

    def _end_epoch(self) -> None:
        st = self.state
        if (st.epoch + 1) % self.cfg.eval_every_epochs == 0 or st.step >= self.total_steps:
            st.last_eval = self.evaluate_all()
            for split in ("val", "test"):
                if f"{split}_acc" in st.last_eval:
                    self._log({"kind": "eval", "split": split, "step": st.step, "epoch": st.epoch + 1,
                               "loss": st.last_eval[f"{split}_loss"], "acc": st.last_eval[f"{split}_acc"]})
        self._hook("on_epoch_end")
        extra = {k: v for cb in self.callbacks for k, v in cb.metrics().items()}
        if extra:
            self._log({"kind": "method", "step": st.step, "epoch": st.epoch + 1, **extra})
        st.epoch += 1
        self.batch_in_epoch = 0
        every = self.cfg.checkpoint.every_epochs
        if every and (st.epoch % every == 0 or st.step >= self.total_steps):
            self.save_checkpoint()

    def evaluate_all(self) -> dict[str, float]:
        """Loss/accuracy on val and test (every rank evaluates the whole split; no collectives)."""
        out: dict[str, float] = {}
        for split, data in (("val", self.val_data), ("test", self.test_data)):
            if data is not None:
                r = evaluate(self.model, data, self.cfg.eval_batch_size, self.device)
                out[f"{split}_loss"], out[f"{split}_acc"] = r["loss"], r["acc"]
        return out

    def fit(self, session: int = 0) -> dict[str, Any]:
        """Train until ``epochs`` or ``max_steps``; return the final summary."""
        from tqdm.auto import tqdm

        st, cfg = self.state, self.cfg
        st.session = session
        self.ddp_model.train()
        self._hook("on_fit_start")
        self._hook("on_session_start")
        bar = tqdm(total=self.total_steps, initial=st.step, disable=not (cfg.progress and self.dist.is_main),
                   desc="train", unit="step", dynamic_ncols=True, leave=False)
        t0 = self._fit_t0 = time.perf_counter()
        run_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        run_correct = torch.zeros((), dtype=torch.long, device=self.device)
        run_count = torch.zeros((), dtype=torch.long, device=self.device)
        run_steps = 0
        while st.step < self.total_steps and st.epoch < cfg.epochs:
            if self.batch_in_epoch == 0:
                self._hook("on_epoch_start")
            for batch in self._batches(st.epoch, self.batch_in_epoch):
                loss, c, n = self._train_step(batch)
                st.step += 1
                self.batch_in_epoch += 1
                run_loss += loss.double()
                run_correct += c
                run_count += n
                run_steps += 1
                bar.update(1)
                if st.step % cfg.log_every_steps == 0 or st.step == self.total_steps:
                    rec = {"kind": "train", "step": st.step, "epoch": st.epoch + 1,
                           "loss": float(run_loss) / run_steps, "acc": int(run_correct) / max(1, int(run_count)),
                           "lr": self.optimizer.param_groups[0]["lr"], "time_s": time.perf_counter() - t0}
                    self._log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['acc']:.3f}")
                    run_loss.zero_(), run_correct.zero_(), run_count.zero_()
                    run_steps = 0
                every = cfg.checkpoint.every_steps
                if every and st.step % every == 0:
                    self.save_checkpoint()
                if st.step >= self.total_steps:
                    break
            self._end_epoch()
        bar.close()
        if not st.last_eval:  # resumed from the final checkpoint: nothing left to train
            st.last_eval = self.evaluate_all()
        self._hook("on_session_end")
        self._hook("on_fit_end")
        summary: dict[str, Any] = {"steps": st.step, "epochs": st.epoch, "earlier_time_s": self.earlier_time_s,
                                   **st.last_eval}
        if self.ws > 1:
            in_sync, sums, differ = ranks_in_sync(self.model)
            self._log({"kind": "ddp_check", "step": st.step, "world_size": self.ws, "in_sync": in_sync,
                       "checksums": sums, "differ": differ})
            summary["ddp_in_sync"] = in_sync
            if not in_sync:
                log.error("DDP ranks hold different weights at the end of training, in: %s", ", ".join(differ))
        if self.metrics is not None:
            self.metrics.close()
        return summary
