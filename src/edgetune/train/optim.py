"""Optimizer and learning-rate schedule builders."""

from __future__ import annotations

import math

import torch
from torch import nn

from edgetune.train.config import OptimizerConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def build_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: ScheduleConfig, steps_per_epoch: int | None = None) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` of ``total`` (pure function).

    With ``cfg.per_epoch`` the position in training is the epoch index ``step // steps_per_epoch`` over the
    number of epochs (the factor is constant within an epoch); otherwise the step over ``total``.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    by_epoch = bool(cfg.per_epoch and steps_per_epoch)
    if by_epoch:
        done, span = step // steps_per_epoch, max(1, math.ceil(total / steps_per_epoch))
    else:
        done, span = step - cfg.warmup_steps, max(1, total - cfg.warmup_steps)
    if cfg.end_fraction < 1:  # cosine and linear only (the config refuses it on the others)
        span = max(1, int(span * cfg.end_fraction)) if by_epoch else max(1.0, span * cfg.end_fraction)
    t = min(1.0, done / span)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.name == "linear":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - t)
    return cfg.gamma ** sum(t >= m for m in cfg.milestones)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig, steps_per_epoch: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg, steps_per_epoch))
