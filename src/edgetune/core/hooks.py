"""Hook points of the training loop, and the state the loop shows to them.

Methods plug into training by implementing a :class:`Callback`: every hook is a no-op by default, so a
method overrides only the points it needs. The loop calls, in order::

    on_fit_start                             (first call of Trainer.fit)
      on_session_start                       (once per call of Trainer.fit: each call is a session)
        on_epoch_start
          [per batch] forward -> loss -> backward
          after_backward                     (gradients are available; masks can be applied to them)
          before_optimizer_step              (set state.skip_step = True to skip this step)
          optimizer.step()
          after_optimizer_step               (topology updates, weight masking)
        on_epoch_end                         (after evaluation; state.last_eval holds its metrics)
      on_session_end
    on_fit_end                               (Trainer.close(), after the last session)

``state.step`` counts optimizer steps over the whole run; a session runs from ``state.session_start`` to
``state.total_steps`` (both global steps), so ``state.progress`` is the fraction of the current session done.

A callback that carries state across a resume implements ``state_dict()`` / ``load_state_dict()``:
nested dicts/lists of tensors, numbers and strings (tensors go to safetensors, the rest to JSON).
``metrics()`` returns scalars logged to metrics.jsonl at the end of each epoch and shown in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Callback", "TrainState"]


@dataclass
class TrainState:
    """What the loop exposes to hooks. ``model`` is the unwrapped module (not the DDP wrapper)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    session: int = 0
    session_start: int = 0
    rank: int = 0
    world_size: int = 1
    loss: torch.Tensor | None = None
    skip_step: bool = False
    last_eval: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """Fraction of the current session done, in [0, 1]."""
        return min(1.0, (self.step - self.session_start) / max(1, self.total_steps - self.session_start))


class Callback:
    """Base of every training hook; all hooks are no-ops. Name each subclass after its method."""

    name: str = "callback"

    def on_fit_start(self, state: TrainState) -> None: ...
    def on_session_start(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def after_backward(self, state: TrainState) -> None: ...
    def before_optimizer_step(self, state: TrainState) -> None: ...
    def after_optimizer_step(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_session_end(self, state: TrainState) -> None: ...
    def on_fit_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}
