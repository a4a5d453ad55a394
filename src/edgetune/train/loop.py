"""The training loop: one explicit, readable loop with named hook points (see edgetune.core.hooks).

Data are in-memory splits (``TensorDataset`` with the target last, or a ``DictDataset`` of named columns,
see :mod:`edgetune.data.batches`); a per-batch ``transform`` runs on the device (uint8 images to normalized
floats, padding trimmed). A :class:`~edgetune.train.tasks.Task` turns each batch into a loss and metrics, so
the loop trains classifiers, language models and Hugging Face models (keyword inputs, ``ModelOutput``)
alike. The loop shuffles with a generator seeded by (seed, session, epoch), so a resumed run sees exactly the
batches the interrupted one would have seen.

:meth:`Trainer.fit` may be called again with new data and its own step budget: each call is a *session* (hooks
``on_session_start``/``on_session_end`` fire per call; the global step keeps counting; a new session gets a
fresh optimizer and schedule unless asked to keep them). Checkpoints hold the model, optimizer, schedule,
every RNG, the loop position, the statistic sums of the train record in progress and each callback's state;
resuming from one reproduces the uninterrupted run bit for bit, weights and records alike but their times
(same machine, same thread count).
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
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback, TrainState
from edgetune.core.seed import rng_state, set_rng_state
from edgetune.data.batches import Batch, BatchTransform, take, to_device
from edgetune.train.checkpoint import CheckpointManager, check_fingerprint, model_fingerprint
from edgetune.train.config import TrainConfig
from edgetune.train.distributed import DistInfo, barrier, init_distributed, ranks_in_sync
from edgetune.train.metrics import MetricsLog
from edgetune.train.optim import build_optimizer, build_scheduler
from edgetune.train.tasks import Task, get_task

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


def _add(acc: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    """Accumulate a step's statistic sums into ``acc`` in place (float sums in float64)."""
    for k, v in sums.items():
        if k in acc:
            acc[k].add_(v.detach())
        else:
            acc[k] = v.detach().double() if v.is_floating_point() else v.detach().clone()


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch_size: int, device: torch.device, *,
             task: str | Task = "classification", transform: BatchTransform | None = None) -> dict[str, float]:
    """The task's metrics of ``model`` over ``data`` (e.g. loss and accuracy; model in eval mode, restored after)."""
    task = get_task(task)
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    n = len(data)
    for i in range(0, n, batch_size):
        batch = to_device(take(data, torch.arange(i, min(n, i + batch_size))), device)
        if transform is not None:
            batch = transform(batch)
        _add(sums, task.step(model, batch).sums)
    model.train(was_training)
    return task.summarize({k: float(v) for k, v in sums.items()})


class Trainer:
    """Trains ``model`` on ``train`` with ``cfg``; evaluates on ``val``/``test`` at epoch ends.

    Args:
        model: any module; the task calls it with the batch's inputs (positional or keyword).
        train / val / test: splits (``TensorDataset`` with the target last, or ``DictDataset``).
        cfg: the loop's config.
        callbacks: method hooks (sparse topology updates, adapters, ...).
        run_dir: where metrics.jsonl and checkpoints/ go (None: nothing written).
        seed: seeds the data order; the caller seeds model init.
        task: ``classification`` | ``lm`` | ``seq2seq`` or a :class:`Task` (turns a batch into loss and metrics).
        transform: per-batch preprocessing applied on the device to every train and eval batch.
        train_transform: when given, applied to training batches instead of ``transform`` (``transform`` plus
            train-only augmentation, see :mod:`edgetune.data.augment`); eval batches keep ``transform``.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Any,
        cfg: TrainConfig,
        *,
        val: Any = None,
        test: Any = None,
        callbacks: Sequence[Callback] = (),
        run_dir: str | Path | None = None,
        seed: int = 0,
        task: str | Task = "classification",
        transform: BatchTransform | None = None,
        train_transform: BatchTransform | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
        self.dist: DistInfo = init_distributed(self.device)
        self.model = model.to(self.device)
        self.task = get_task(task, cfg.label_smoothing)
        self.transform = transform
        self.train_transform = train_transform if train_transform is not None else transform
        self.val_data, self.test_data = val, test
        self.callbacks = list(callbacks)
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.ws = self.dist.world_size
        if cfg.batch_size % self.ws:
            raise ConfigError(
                f"train.batch_size={cfg.batch_size} must be divisible by the number of processes ({self.ws})"
            )
        self.local_batch = cfg.batch_size // self.ws
        self.scaler = torch.amp.GradScaler("cuda") if (cfg.amp and self.device.type == "cuda") else None
        self.ddp_model: nn.Module = self.model
        if self.ws > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.session = 0  # the session the next (or current) fit call runs
        self.session_start = 0  # global step at which the current session began
        self.sessions_done: list[dict[str, Any]] = []  # summaries of finished sessions (restored on resume)
        self._calls = 0  # fit calls made in this process
        self._started = False  # on_fit_start fired
        self._resume_session = -1  # session a loaded checkpoint was taken in, until its position is restored
        self._session_max_steps = cfg.max_steps
        self._set_session_data(train, cfg.epochs, cfg.max_steps)
        self.optimizer, self.scheduler = self._build_optimizer()
        self.state = TrainState(
            model=self.model, optimizer=self.optimizer, device=self.device, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, rank=self.dist.rank, world_size=self.ws,
        )
        self.batch_in_epoch = 0
        self._window: dict[str, torch.Tensor] = {}  # statistic sums since the last train record (checkpointed)
        self._resume_window: dict[str, torch.Tensor] = {}
        self.earlier_time_s = 0.0  # time spent in fit() by earlier processes of this run (from the checkpoint)
        self._fit_t0: float | None = None
        self.history: list[dict[str, Any]] = []
        self.records = 0  # metrics records written by this run (resumed runs continue the count)
        main = self.dist.is_main and self.run_dir is not None
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if main else None
        self.ckpt = (
            CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last) if self.run_dir else None
        )

    # ----------------------------------------------------------------------------------- helpers
    def _set_session_data(self, train: Any, epochs: int, max_steps: int | None) -> None:
        """Budget of the session about to run: its data, epochs and optional step cap."""
        n_local = len(train) // self.ws
        if n_local == 0:
            raise ConfigError(f"the training split has {len(train)} examples, fewer than {self.ws} processes")
        self.train_data = train
        self.epochs = epochs
        self.steps_per_epoch = math.ceil(n_local / self.local_batch)
        if n_local % self.local_batch == 1 and self.steps_per_epoch > 1 and self._has_batchnorm():
            # BatchNorm cannot normalise a batch of one example in training: drop that last example of each epoch
            self.steps_per_epoch -= 1
            log.info("the last batch of each epoch would hold 1 example, which BatchNorm cannot train on: dropped")
        total = epochs * self.steps_per_epoch
        self.session_steps = min(total, max_steps) if max_steps else total
        self.total_steps = self.session_start + self.session_steps  # global step at which this session ends
        self.cfg.check_total_steps(self.session_steps, self.steps_per_epoch)

    def _has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(
                "the model has no trainable parameters; nothing to train (check train.trainable patterns, or use "
                "a stage with step: evaluate)"
            )
        opt = build_optimizer(trainable, self.cfg.optimizer)
        return opt, build_scheduler(opt, self.session_steps, self.cfg.schedule, self.steps_per_epoch)

    def _hook(self, name: str) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self.state)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.cfg.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _prepare(self, batch: Batch) -> Batch:
        batch = to_device(batch, self.device)
        return self.train_transform(batch) if self.train_transform is not None else batch

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        # session 0 keeps the historical seed formula, so earlier runs' data order is unchanged
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + self.session * 7_919_000_003)
        n = len(self.train_data)
        perm = torch.randperm(n, generator=g)
        perm = perm[: (n // self.ws) * self.ws][self.dist.rank :: self.ws]
        for b in range(start, self.steps_per_epoch):
            idx = perm[b * self.local_batch : (b + 1) * self.local_batch]
            yield self._prepare(take(self.train_data, idx))

    def _log(self, record: dict[str, Any]) -> None:
        if self.session:
            record["session"] = self.session
        self.history.append(record)
        self.records += 1
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
            "window": dict(self._window),
            "loop": {"step": self.state.step, "epoch": self.state.epoch, "batch": self.batch_in_epoch,
                     "elapsed_s": self.elapsed_s(), "session": self.session, "session_start": self.session_start,
                     "sessions_done": self.sessions_done, "records": self.records},
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
        """Load the newest checkpoint of run_dir (or ``path``); return False when there is none.

        A checkpoint taken inside session ``k`` resumes exactly when the caller replays the same sequence of
        :meth:`fit` calls: calls for sessions before ``k`` return their recorded summaries without training,
        the call for session ``k`` continues from the checkpoint's position.
        """
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
        loop = s["loop"]
        self.sessions_done = list(loop.get("sessions_done", []))
        self._resume_session = int(loop.get("session", 0))
        self._resume_loop = loop
        self._resume_opt = (s["optimizer"], s["scheduler"], s["scaler"])
        self._resume_window = {k: v.to(self.device) for k, v in s.get("window", {}).items()}  # older: none kept
        set_rng_state(s["rng"])
        self.earlier_time_s = float(loop.get("elapsed_s", 0.0))
        if self._resume_session == 0 and self._calls == 0:  # the usual case: a position in the first session
            self._restore_position()
        if "records" in loop:  # exactly the records written before the checkpoint (eval/ddp records at its step too)
            self.records = int(loop["records"])
            if self.metrics is not None:
                self.metrics.truncate_to(self.records)
        elif self.metrics is not None:  # a checkpoint from before the count was kept
            self.metrics.truncate_after(int(loop["step"]))
        log.info("resumed from %s at step %d (session %d, epoch %d)", ck.path, loop["step"],
                 int(loop.get("session", 0)), loop["epoch"])  # _resume_session is -1 once the position is restored
        return True

    def clear_log(self) -> None:
        """Drop every record of metrics.jsonl (a run that restarts from the beginning writes them again)."""
        self.records = 0
        if self.metrics is not None:
            self.metrics.truncate_to(0)

    def _restore_position(self) -> None:
        loop = self._resume_loop
        opt, sched, scaler = self._resume_opt
        self.session_start = int(loop.get("session_start", 0))
        self._set_session_data(self.train_data, self.epochs, self._session_max_steps)
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(sched)
        if self.scaler and scaler:
            self.scaler.load_state_dict(scaler)
        self.state.step, self.state.epoch, self.batch_in_epoch = loop["step"], loop["epoch"], loop["batch"]
        self._window, self._resume_window = self._resume_window, {}  # a train record's window may straddle it
        self._resume_session = -1

    # ------------------------------------------------------------------------------------- loop
    def _train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        st, opt = self.state, self.optimizer
        opt.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.task.step(self.ddp_model, batch)
        loss = out.loss
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
        return out.sums

    def _end_epoch(self) -> None:
        st = self.state
        if (st.epoch + 1) % self.cfg.eval_every_epochs == 0 or st.step >= self.total_steps:
            st.last_eval = self.evaluate_all()
            for split in ("val", "test"):
                metrics = {k.removeprefix(f"{split}_"): v for k, v in st.last_eval.items() if k.startswith(f"{split}_")}
                if metrics:
                    self._log({"kind": "eval", "split": split, "step": st.step, "epoch": st.epoch + 1, **metrics})
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
        """The task's metrics on val and test, keys ``val_loss``, ``test_acc``, ... (every rank evaluates)."""
        out: dict[str, float] = {}
        for split, data in (("val", self.val_data), ("test", self.test_data)):
            if data is not None:
                r = evaluate(self.model, data, self.cfg.eval_batch_size, self.device, task=self.task,
                             transform=self.transform)
                out.update({f"{split}_{k}": v for k, v in r.items()})
        return out

    def fit(self, train: Any = None, *, epochs: int | None = None, max_steps: int | None = None,
            val: Any = None, test: Any = None, keep_optimizer: bool = False) -> dict[str, Any]:
        """Run one training session and return its summary.

        The first call trains on the data given to the constructor with ``cfg.epochs``/``cfg.max_steps``. A later
        call is a new session: ``train`` (default: the same data), its own ``epochs``/``max_steps`` budget
        (default: the config's), optional new ``val``/``test`` splits, and a fresh optimizer and LR schedule over
        the session's steps (``keep_optimizer=True`` keeps the optimizer's state and builds only a new schedule).
        """
        k = self._calls
        self._calls += 1
        self.session = k
        if val is not None:
            self.val_data = val
        if test is not None:
            self.test_data = test
        if k < len(self.sessions_done):  # finished before the checkpoint this run resumed from
            log.info("session %d finished before the checkpoint; skipping it", k)
            return dict(self.sessions_done[k])
        cap = max_steps if max_steps is not None else (self.cfg.max_steps if k == 0 else None)
        self._session_max_steps = cap
        if k > 0:
            self.session_start = self.state.step
        self._set_session_data(train if train is not None else self.train_data, epochs or self.cfg.epochs, cap)
        if k > 0:
            if keep_optimizer:
                self.scheduler = build_scheduler(self.optimizer, self.session_steps, self.cfg.schedule, self.steps_per_epoch)
            else:
                self.optimizer, self.scheduler = self._build_optimizer()
            self.state.optimizer = self.optimizer
            self.state.epoch, self.batch_in_epoch, self.state.last_eval = 0, 0, {}
            self._window = {}  # a session that raised may have left its sums
        if self._resume_session == k:
            self._restore_position()
        summary = self._fit_session()
        self.sessions_done.append({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        return summary

    def _fit_session(self) -> dict[str, Any]:
        from edgetune.train.progress import progress

        st, cfg = self.state, self.cfg
        st.session = self.session
        st.total_steps = self.total_steps
        st.steps_per_epoch = self.steps_per_epoch
        st.session_start = self.session_start
        self.ddp_model.train()
        if not self._started:  # once per process: the first session it trains (a resumed run may skip earlier ones)
            self._hook("on_fit_start")
            self._started = True
        self._hook("on_session_start")
        bar = progress(self.session_steps, st.step - self.session_start,
                       f"train{f' s{self.session}' if self.session else ''}", cfg.progress and self.dist.is_main)
        t0 = self._fit_t0 = time.perf_counter()
        if self.batch_in_epoch and (self.batch_in_epoch >= self.steps_per_epoch or st.step >= self.total_steps):
            self._end_epoch()  # resumed from a step checkpoint taken after an epoch's last batch, before its end
        while st.step < self.total_steps and st.epoch < self.epochs:
            if self.batch_in_epoch == 0:
                self._hook("on_epoch_start")
            for batch in self._batches(st.epoch, self.batch_in_epoch):
                _add(self._window, self._train_step(batch))
                st.step += 1
                self.batch_in_epoch += 1
                bar.update(1)
                if st.step % cfg.log_every_steps == 0 or st.step == self.total_steps:
                    metrics = self.task.summarize({k: float(v) for k, v in self._window.items()})
                    rec = {"kind": "train", "step": st.step, "epoch": st.epoch + 1, **metrics,
                           "lr": self.optimizer.param_groups[0]["lr"], "time_s": time.perf_counter() - t0}
                    self._log(rec)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in ("loss", "acc")})
                    self._window = {}
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
        summary: dict[str, Any] = {"steps": st.step, "epochs": st.epoch, "earlier_time_s": self.earlier_time_s,
                                   "session": self.session, "session_steps": st.step - self.session_start,
                                   **st.last_eval}
        if self.ws > 1:
            in_sync, sums, differ = ranks_in_sync(self.model)
            self._log({"kind": "ddp_check", "step": st.step, "world_size": self.ws, "in_sync": in_sync,
                       "checksums": sums, "differ": differ})
            summary["ddp_in_sync"] = in_sync
            if not in_sync:
                log.error("DDP ranks hold different weights at the end of training, in: %s", ", ".join(differ))
        return summary

    def close(self) -> None:
        """End the run: fire ``on_fit_end`` and close the metrics log (``fit`` callers that run sessions call this)."""
        self._hook("on_fit_end")
        if self.metrics is not None:
            self.metrics.close()
