"""Typed configuration of the training loop (the ``train:`` section of a recipe)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError

__all__ = ["CheckpointConfig", "OptimizerConfig", "ScheduleConfig", "TrainConfig"]


class OptimizerConfig(Config):
    """name: sgd | adam | adamw. momentum/nesterov apply to SGD, betas to Adam(W)."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class ScheduleConfig(Config):
    """Learning-rate schedule over optimizer steps.

    name: constant | cosine (to ``min_lr_ratio * lr``) | linear (decay to ``min_lr_ratio * lr``) |
    step (multiply by ``gamma`` at each fraction of training in ``milestones``).
    warmup_steps: linear warm-up from 0 before the schedule.
    end_fraction: the fraction of training (after warm-up) at which cosine/linear reach their end value and
        stay there (1.0: at the last step). The official CHT/CHTs MLP code decays to 1% at 90% of training.
    per_epoch: the factor changes only at the start of an epoch, from the epoch's index (what a PyTorch
        scheduler stepped once an epoch does), instead of at every optimizer step (warm-up stays per step).
    """

    name: Literal["constant", "cosine", "linear", "step"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    gamma: float = Field(default=0.1, gt=0, le=1)
    end_fraction: float = Field(default=1.0, gt=0, le=1)
    per_epoch: bool = False

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError("milestones must be increasing fractions of training in (0, 1)")
        return v

    @model_validator(mode="after")
    def _end_fraction(self) -> ScheduleConfig:
        if self.end_fraction < 1 and self.name not in ("cosine", "linear"):
            raise ValueError(f"end_fraction={self.end_fraction} applies to the cosine and linear schedules, not "
                             f"{self.name!r}; remove it, or use name: linear / cosine")
        return self


class CheckpointConfig(Config):
    """When to write checkpoints and how many to keep. every_steps=None: only at epoch ends."""

    every_epochs: int | None = Field(default=1, ge=1)
    every_steps: int | None = Field(default=None, ge=1)
    keep_last: int = Field(default=2, ge=1)


class TrainConfig(Config):
    """The training loop.

    device: cpu | cuda | cuda:N | auto (CUDA when available).
    amp: mixed precision (bfloat16 autocast on CPU, float16 + loss scaling on CUDA).
    grad_clip: max global gradient norm, or None.
    max_steps: stop after this many optimizer steps in total (None: run all epochs).
    num_threads: torch intra-op threads on CPU (None: torch's default).
    trainable: name patterns of the parameters to train (globs, ``re:`` regexes, or ``head``); the rest are
        frozen. None: everything trains (a ``features`` model trains its head only).
    """

    epochs: int = Field(default=5, ge=1, le=100_000)
    batch_size: int = Field(default=128, ge=1)
    eval_batch_size: int = Field(default=1024, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(default=None, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    amp: bool = False
    device: str = "cpu"
    num_threads: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    log_every_steps: int = Field(default=50, ge=1)
    eval_every_epochs: int = Field(default=1, ge=1)
    progress: bool = True
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    trainable: list[str] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError("device must be cpu, cuda, cuda:N or auto")
        return v

    def warmup_problem(self, total_steps: int, how: str, key: str = "train.") -> str | None:
        """The message when the warm-up does not end before the run does, else None.

        ``how`` says where ``total_steps`` comes from (``max_steps=N``, or epochs x steps per epoch); ``key``
        prefixes the key names (empty inside a validation error, which names the section itself).
        """
        warmup = self.schedule.warmup_steps
        if warmup and warmup >= total_steps:
            return (f"{key}schedule.warmup_steps={warmup} is not below the run's {total_steps} optimizer steps "
                    f"({how}), so the learning rate would never reach {key}optimizer.lr; lower "
                    f"schedule.warmup_steps below {total_steps} (a few percent of the steps is usual) or train longer")
        return None

    def check_total_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Raise :class:`ConfigError` at run start when the warm-up is as long as the run.

        Call it once the data size is known: ``total_steps`` is the session's optimizer steps (epochs x steps per
        epoch, capped by max_steps). At validate time only ``max_steps`` is known; this gives the same message.
        """
        if self.max_steps is not None and total_steps >= self.max_steps:
            how = f"max_steps={self.max_steps}"
        elif steps_per_epoch is not None:
            how = f"epochs={self.epochs} x {steps_per_epoch} steps per epoch at batch_size={self.batch_size}"
        else:
            how = f"epochs={self.epochs} over this data"
        problem = self.warmup_problem(total_steps, how)
        if problem:
            raise ConfigError(problem)

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.max_steps is not None:
            problem = self.warmup_problem(self.max_steps, f"max_steps={self.max_steps}", key="")
            if problem:
                raise ValueError(problem)
        return self
