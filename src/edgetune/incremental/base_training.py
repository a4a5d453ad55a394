"""The ``incremental_base:`` recipe section: how a backbone is trained on the base classes for few-shot
class-incremental learning.

- ``head``: the classifier trained with the backbone: ``cosine`` (learnable cosine head, logits
  ``scale * cos``, scale 16 as in CEC/TEEN; the FSCIL default), ``etf`` (a fixed simplex-ETF classifier, Tiomoko
  Ali et al. ICASSP 2024 / NC-FSCIL, with ``total_classes`` slots pre-allocated for classes added later), or
  ``linear`` (the model's own head, unchanged).
- ``select``: ``val`` keeps the weights of the epoch with the best validation accuracy (held-out base training
  data: set ``data.val_fraction``), never chosen on test data; ``last`` keeps the final weights.

::

    - name: base
      data: {name: synglyph, classes: 0-59, val_fraction: 0.07}
      model: {name: convnet}
      incremental_base: {head: cosine, scale: 16, select: val}
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback, TrainState
from edgetune.core.sections import SectionContext, register_section
from edgetune.core.surgery import replace_module
from edgetune.incremental.heads import CosineHead, ETFHead

__all__ = ["BaseTrainingConfig", "KeepBest"]

log = logging.getLogger(__name__)


class BaseTrainingConfig(Config):
    """head: cosine | etf | linear; scale: logit scale of the cosine and ETF heads; total_classes: ETF slots
    (base + classes to come; default the base classes only); seed: the ETF frame's seed; select: val | last."""

    head: Literal["cosine", "etf", "linear"] = "cosine"
    scale: float = Field(default=16.0, gt=0.0)
    total_classes: int | None = Field(default=None, ge=1)
    seed: int = 0
    select: Literal["val", "last"] = "val"


class KeepBest(Callback):
    """Keeps the weights of the epoch with the best ``val_acc`` (ties: lower ``val_loss``, then the later epoch)
    and restores them when the session ends; the session's summary then reports that epoch's evaluation
    (``best_epoch`` among the method metrics)."""

    name = "keep-best"

    def __init__(self, metric: str = "val_acc") -> None:
        self.metric = metric
        self.best: float | None = None
        self.best_epoch = 0
        self.best_eval: dict[str, float] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self._warned = False

    def on_epoch_end(self, state: TrainState) -> None:
        value = state.last_eval.get(self.metric)
        if value is None:
            if state.last_eval and not self._warned:
                log.warning("select=val but the stage has no validation split: keeping the last epoch's weights "
                            "(set data.val_fraction to select on held-out base training data)")
                self._warned = True
            return
        # ties (a small validation set saturates) go to the lower validation loss, then to the later epoch
        if self.best is None or self._rank(state.last_eval) >= self._rank(self.best_eval):
            self.best, self.best_epoch = float(value), state.epoch + 1
            self.best_eval = dict(state.last_eval)
            self.weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def _rank(self, evaluation: dict[str, float]) -> tuple[float, float]:
        return evaluation[self.metric], -evaluation.get(self.metric.replace("_acc", "_loss"), 0.0)

    def on_session_end(self, state: TrainState) -> None:
        if self.weights:
            state.model.load_state_dict(self.weights)
            state.last_eval = dict(self.best_eval)
            log.info("kept the weights of epoch %d (%s %.4f)", self.best_epoch, self.metric, self.best)

    def metrics(self) -> dict[str, float]:
        return {"best_epoch": float(self.best_epoch)} if self.best is not None else {}

    def state_dict(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        return {"best": self.best, "best_epoch": self.best_epoch, "best_eval": dict(self.best_eval),
                "weights": dict(self.weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
            self.best_eval = {k: float(v) for k, v in state["best_eval"].items()}
            self.weights = {k: v.clone() for k, v in state["weights"].items()}


def new_head(old: nn.Module, cfg: BaseTrainingConfig) -> nn.Module:
    """The head ``cfg`` asks for, in place of ``old`` (an ``nn.Linear``-like head with in/out features)."""
    d, k = getattr(old, "in_features", None), getattr(old, "out_features", None)
    if not isinstance(d, int) or not isinstance(k, int):
        raise ConfigError(f"incremental_base.head={cfg.head} replaces the model's classification head, but "
                          f"{type(old).__name__} has no in_features / out_features; use head: linear")
    p = next(old.parameters(), None)
    if cfg.head == "cosine":
        head: nn.Module = CosineHead(d, k, scale=cfg.scale)
    else:
        if cfg.total_classes is not None and cfg.total_classes < k:
            raise ConfigError(f"incremental_base.total_classes={cfg.total_classes} is below the {k} classes the "
                              "stage trains on; give the number of classes over all sessions")
        head = ETFHead(d, k, total_classes=cfg.total_classes, scale=cfg.scale, seed=cfg.seed)
    return head.to(p.device) if p is not None else head


@register_section("incremental_base", config=BaseTrainingConfig,
                  summary="train a backbone on the base classes with a cosine or fixed ETF head, select on val")
def apply_base_training(model: nn.Module, cfg: BaseTrainingConfig, ctx: SectionContext) -> list[Callback]:
    if cfg.head != "linear":
        if ctx.head is None:
            raise ConfigError(f"incremental_base.head={cfg.head} needs a classification model with a head; this "
                              "stage's model has none (set model.head_module, or use head: linear)")
        old = model.get_submodule(ctx.head)
        if not isinstance(old, (CosineHead, ETFHead)):  # a reloaded run already holds the new head
            replace_module(model, ctx.head, new_head(old, cfg))
            log.info("head %s: %s -> %s", ctx.head, type(old).__name__, cfg.head)
    return [KeepBest()] if cfg.select == "val" else []
