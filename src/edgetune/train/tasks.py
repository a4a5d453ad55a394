"""Tasks: how a batch becomes a loss and metrics. The loop knows no loss; a task does.

A task calls the model on a batch (list batches positionally, dict batches by keyword, see
:mod:`edgetune.data.batches`), reads the logits (a tensor, or ``.logits`` of a Hugging Face ``ModelOutput``),
and returns the mean loss plus **sums** of its statistics over the batch, so sums from many batches (and
many processes) add up exactly before :meth:`Task.summarize` turns them into metrics.

- ``classification``: logits ``(B, C)``, target ``(B,)``; metrics ``loss``, ``acc``.
- ``lm``: causal language modelling. List batches carry the shifted target already (``[x, y]``, both
  ``(B, T)``); dict batches carry Hugging Face ``labels`` equal to ``input_ids`` (``-100`` where ignored),
  shifted here. Metrics ``loss``, ``acc`` (next-token), ``ppl``.
- ``seq2seq``: ``[src, tgt_in, tgt_out]``, logits ``(B, T, V)``; metrics as ``lm``.

A feature extractor plus a head is a classification model (see ``edgetune.models.pretrained``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.core.errors import ConfigError
from edgetune.core.outputs import logits_of as _logits_of
from edgetune.core.registry import Registry
from edgetune.data.batches import Batch, batch_inputs, batch_target

__all__ = ["IGNORE_INDEX", "TASKS", "StepOutput", "Task", "get_task", "logits_of"]

IGNORE_INDEX = -100


def logits_of(out: Any) -> Tensor:
    """The logits in a model's output: a tensor, a ``ModelOutput``/object with ``.logits``, or a dict."""
    return _logits_of(out, "a classification or language model must return a logits tensor or an object with a "
                           ".logits tensor (for a feature extractor, add a head: model.task=classification)")


class StepOutput:
    """Mean loss of a batch (with its graph) and detached sums of the task's statistics."""

    __slots__ = ("loss", "sums")

    def __init__(self, loss: Tensor, sums: dict[str, Tensor]) -> None:
        self.loss = loss
        self.sums = sums


def _token_ce(logits: Tensor, target: Tensor, smoothing: float) -> StepOutput:
    """Cross-entropy over ``(N, C)`` or ``(B, T, V)`` logits; ``-100`` targets ignored."""
    flat = logits.reshape(-1, logits.shape[-1])  # (N, C)
    tgt = target.reshape(-1)
    valid = tgt != IGNORE_INDEX
    n = valid.sum()
    loss = F.cross_entropy(flat.float(), tgt, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
    if not bool(n):  # every target ignored: a zero loss that still carries the graph
        loss = flat.sum() * 0.0
    with torch.no_grad():  # few small ops: this runs every training step
        correct = (flat.argmax(-1) == tgt).sum()  # an ignored target (-100) never equals an argmax (>= 0)
        loss_sum = loss.detach() * n
    return StepOutput(loss, {"loss_sum": loss_sum, "correct": correct, "count": n})


class Task:
    """Base task: call the model, compute the loss. Subclasses set ``name`` and override :meth:`loss_from`."""

    name = "task"
    #: metrics this task reports (the first is the one a report leads with)
    metrics: tuple[str, ...] = ("loss", "acc")

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        args, kwargs = batch_inputs(batch)
        return model(*args, **kwargs)

    def loss_from(self, out: Any, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def step(self, model: nn.Module, batch: Batch) -> StepOutput:
        """Forward ``batch`` through ``model``; the mean loss (differentiable) and statistic sums."""
        return self.loss_from(self.forward(model, batch), batch)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, float(sums.get("count", 0)))
        return {"loss": float(sums["loss_sum"]) / n, "acc": float(sums["correct"]) / n}


class ClassificationTask(Task):
    name = "classification"

    def loss_from(self, out: Any, batch: Batch) -> StepOutput:
        logits = logits_of(out)
        target = batch_target(batch)
        if logits.dim() != 2 or target.dim() != 1:
            raise ConfigError(
                f"classification expects logits (B, C) and targets (B,), got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}; for token-level targets use model.task=lm or seq2seq"
            )
        return _token_ce(logits, target, self.label_smoothing)


class LMTask(Task):
    name = "lm"
    metrics = ("loss", "ppl", "acc")

    def loss_from(self, out: Any, batch: Batch) -> StepOutput:
        logits = logits_of(out)  # (B, T, V)
        target = batch_target(batch)  # (B, T)
        if isinstance(batch, dict):  # Hugging Face convention: labels unshifted; predict token t+1 from t
            logits, target = logits[:, :-1], target[:, 1:]
        return _token_ce(logits, target, self.label_smoothing)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = super().summarize(sums)
        out["ppl"] = math.exp(min(out["loss"], 50.0))
        return out


class Seq2SeqTask(LMTask):
    name = "seq2seq"

    def loss_from(self, out: Any, batch: Batch) -> StepOutput:
        return _token_ce(logits_of(out), batch_target(batch), self.label_smoothing)


TASKS: Registry[Callable[..., Task]] = Registry("task")
TASKS.add("classification", ClassificationTask, summary="logits (B, C) vs labels (B,): loss, accuracy")
TASKS.add("lm", LMTask, summary="causal language modelling: loss, next-token accuracy, perplexity")
TASKS.add("seq2seq", Seq2SeqTask, summary="encoder-decoder token prediction: loss, accuracy, perplexity")


def get_task(task: str | Task, label_smoothing: float = 0.0) -> Task:
    """A task object from its name (``edgetune ls tasks``) or the object itself."""
    if isinstance(task, Task):
        return task
    return TASKS.get(task)(label_smoothing=label_smoothing)
