"""Stage steps: what a stage does with its model once loaded and prepared.

``train`` (the default) runs the training loop; ``evaluate`` only measures. A family registers its own step
(a merge, adding classes) with :func:`register_step`; the stage's options for it sit under the key of the same
name, validated by the step's config class. A step gets a :class:`StepContext` and returns the metrics it
measured (``step_metrics``: the list of its own keys the report's results table shows); the pipeline saves the
model, measures it and writes the report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgetune.core.hooks import Callback
from edgetune.core.registry import Registry
from edgetune.data.base import DataBundle
from edgetune.data.batches import BatchTransform
from edgetune.models.source import LoadedModel

__all__ = ["STEPS", "StepContext", "register_step"]

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """Everything a step may use. ``options`` is the validated config of the step (None for train/evaluate)."""

    loaded: LoadedModel
    data: DataBundle
    cfg: Any  # the stage's resolved recipe (RunConfig)
    device: torch.device
    run_dir: Path | None
    task: str
    transform: BatchTransform | None
    callbacks: list[Callback]
    train_transform: BatchTransform | None = None  # transform plus train-only augmentation (data.augment)
    resume: bool = False
    options: Any = None
    stages: dict[str, Callable[[], LoadedModel]] = field(default_factory=dict)


Step = Callable[[StepContext], dict[str, Any]]
STEPS: Registry[Step] = Registry("stage step")


def register_step(name: str, *, config: type | None = None, summary: str = "") -> Callable[[Step], Step]:
    return STEPS.register(name, config=config, summary=summary)


@register_step("train", summary="train the model with the training loop (hooks, checkpoints, resume)")
def _train(ctx: StepContext) -> dict[str, Any]:
    from edgetune.train.loop import Trainer

    b = ctx.data
    trainer = Trainer(ctx.loaded.model, b.train, ctx.cfg.train, val=b.val, test=b.test, callbacks=ctx.callbacks,
                      run_dir=ctx.run_dir, seed=ctx.cfg.seed, task=ctx.task, transform=ctx.transform,
                      train_transform=ctx.train_transform)
    if ctx.resume and not trainer.resume():
        log.warning("no checkpoint in %s: starting this stage from the beginning", ctx.run_dir)
        trainer.clear_log()  # the records of the attempt that left no checkpoint would otherwise appear twice
    summary = trainer.fit()
    trainer.close()
    summary["world_size"] = trainer.ws
    return summary


@register_step("evaluate", summary="measure the model on the data without training")
def _evaluate(ctx: StepContext) -> dict[str, Any]:
    from edgetune.train.loop import evaluate

    out: dict[str, Any] = {"steps": 0}
    for split, data in (("val", ctx.data.val), ("test", ctx.data.test)):
        if data is not None:
            r = evaluate(ctx.loaded.model, data, ctx.cfg.train.eval_batch_size, ctx.device, task=ctx.task,
                         transform=ctx.transform)
            out.update({f"{split}_{k}": v for k, v in r.items()})
    return out


from edgetune.pipeline import generation_step  # noqa: F401  (registers evaluate-generation)
