"""Backbones for the incremental bench suites: a registered architecture trained on the base classes with the
``incremental_base`` head (cosine / ETF / linear, epoch selected on held-out base training data), through the
training loop, and the full data set's features for the learners."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from edgetune.core.sections import SectionContext
from edgetune.core.seed import seed_everything
from edgetune.data import DataBundle, DataConfig, load_dataset
from edgetune.incremental.base_training import BaseTrainingConfig, apply_base_training
from edgetune.models import ModelSpec, build_model
from edgetune.train.config import TrainConfig
from edgetune.train.loop import Trainer

__all__ = ["fit_backbone"]

log = logging.getLogger(__name__)


def fit_backbone(data: DataConfig, model: str, model_options: dict[str, Any], train: dict[str, Any], *,
                 head: str = "cosine", total_classes: int | None = None, seed: int = 0,
                 device: torch.device | str = "cpu") -> tuple[nn.Module, DataBundle, dict[str, Any]]:
    """Train ``model`` on ``data`` (set ``data.classes`` to the base classes and ``val_fraction`` for the
    selection) with the given head; returns the model (eval mode), the base bundle and the training summary."""
    seed_everything(seed)
    bundle = load_dataset(data)
    spec = ModelSpec(bundle.input_shape, bundle.num_classes, bundle.task)
    net = build_model(model, model_options, spec, device=device)
    cfg = TrainConfig.model_validate({"progress": False, **train, "device": str(device)})
    steps_per_epoch = -(-len(bundle.train) // cfg.batch_size)
    ctx = SectionContext(total_steps=cfg.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                         epochs=cfg.epochs, device=torch.device(device), seed=seed, head="head")
    callbacks = apply_base_training(net, BaseTrainingConfig(head=head, total_classes=total_classes), ctx)
    trainer = Trainer(net, bundle.train, cfg, val=bundle.val, test=bundle.test, callbacks=callbacks, seed=seed,
                      transform=bundle.transform)
    summary = trainer.fit()
    trainer.close()
    log.info("backbone %s (%s head, seed %d): base test accuracy %.4f", model, head, seed, summary.get("test_acc", 0))
    return net.eval(), bundle, summary
