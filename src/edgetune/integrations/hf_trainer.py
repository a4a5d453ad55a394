"""``EdgetuneTrainerCallback``: edgetune method callbacks inside the Hugging Face ``transformers.Trainer``.

::

    from edgetune.integrations.hf_trainer import EdgetuneTrainerCallback

    sparsify_(model, cfg)                                   # before the Trainer builds its optimizer
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[EdgetuneTrainerCallback([SparseEngine(model, cfg)])])
    trainer.train()

The adapter builds the hooks' :class:`~edgetune.core.hooks.TrainState` from what the Trainer passes:
``state.max_steps`` (total steps), ``state.global_step``, the model (unwrapped) and the optimizer (the torch
optimizer under accelerate's wrapper); steps per epoch come from the training dataloader and
``gradient_accumulation_steps``. Event mapping: ``on_train_begin`` -> on_fit_start/on_session_start/
on_epoch_start; ``on_pre_optimizer_step`` -> after_backward/before_optimizer_step (a skipped step sets
the gradients to None so the optimizer step changes nothing; the Trainer's LR schedule still advances);
``on_optimizer_step`` -> after_optimizer_step; ``on_epoch_end`` -> on_epoch_end/on_epoch_start;
``on_train_end`` -> on_session_end/on_fit_end. On transformers versions without the two optimizer events,
an optimizer step pre-hook and ``on_step_end`` do the same. The methods' state is not written into the
Trainer's checkpoints: save ``callback.state_dict()`` yourself if you resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from edgetune.core.errors import ConfigError, EdgetuneError
from edgetune.core.hooks import Callback
from edgetune.integrations.stepper import MethodStepper

__all__ = ["EdgetuneTrainerCallback", "MissingExtraError"]

log = logging.getLogger(__name__)


class MissingExtraError(EdgetuneError, ImportError):
    """An optional dependency of edgetune is not installed."""


try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only where transformers is absent
    raise MissingExtraError(
        f"edgetune.integrations.hf_trainer needs the Hugging Face transformers package, which is not importable "
        f"here ({e}); install it with pip install 'edgetune[hf]' (or pip install transformers accelerate)"
    ) from e

_HAS_OPTIMIZER_EVENTS = hasattr(TrainerCallback, "on_pre_optimizer_step") and hasattr(
    TrainerCallback, "on_optimizer_step"
)


def _steps_per_epoch(args: Any, state: Any, train_dataloader: Any) -> int:
    """Optimizer steps per epoch, as the Trainer counts them (ceil of batches / accumulation)."""
    accum = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
    try:
        batches = len(train_dataloader)
    except TypeError:  # no dataloader or an iterable one without a length
        batches = 0
    if batches:
        return max(1, math.ceil(batches / accum))
    epochs = max(1, math.ceil(float(getattr(state, "num_train_epochs", 1) or 1)))
    return max(1, math.ceil(state.max_steps / epochs))


class EdgetuneTrainerCallback(TrainerCallback):
    """Runs edgetune method ``callbacks`` (e.g. ``[SparseEngine(model, cfg)]``) inside ``transformers.Trainer``."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        bad = [type(cb).__name__ for cb in callbacks if not isinstance(cb, Callback)]
        if bad:
            raise ConfigError(f"EdgetuneTrainerCallback takes a list of edgetune Callback objects, got "
                              f"{bad}; pass e.g. [SparseEngine(model, cfg)]")
        self.callbacks = list(callbacks)
        self.stepper: MethodStepper | None = None

    def _stepper(self) -> MethodStepper:
        if self.stepper is None:
            raise ConfigError("EdgetuneTrainerCallback: a training event came before on_train_begin; add the callback "
                              "to the Trainer (callbacks=[...]) before calling trainer.train()")
        return self.stepper

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise ConfigError("EdgetuneTrainerCallback: the Trainer passed no model or optimizer to on_train_begin; "
                              "use transformers.Trainer (or a subclass that keeps its callback handler)")
        if self.stepper is not None:  # a second trainer.train(): the previous fit ended at on_train_end
            self.stepper.close()
        spe = _steps_per_epoch(args, state, train_dataloader)
        self.stepper = MethodStepper(model, optimizer, self.callbacks, total_steps=max(1, int(state.max_steps)),
                                     steps_per_epoch=spe, hook_optimizer=not _HAS_OPTIMIZER_EVENTS,
                                     auto_epochs=False)
        self.stepper.state.step = int(state.global_step)
        self.stepper.state.epoch = int(state.epoch or 0)
        self.stepper.start()
        log.info("edgetune: driving %s from the HF Trainer (%d steps, %d per epoch)",
                 ", ".join(cb.name for cb in self.callbacks), state.max_steps, spe)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if _HAS_OPTIMIZER_EVENTS:
            self._stepper().before_optimizer_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if _HAS_OPTIMIZER_EVENTS:
            self._stepper().step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        st = self._stepper()
        if not _HAS_OPTIMIZER_EVENTS:
            st.step()
        if st.state.step != state.global_step:
            log.warning("edgetune: step %d disagrees with the Trainer's global_step %d; following the Trainer",
                        st.state.step, state.global_step)
            st.state.step = int(state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stepper().end_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stepper().close()

    # ------------------------------------------------------------------ reporting and state
    def metrics(self) -> dict[str, float]:
        """The methods' current scalars (e.g. ``sparse_density``), merged."""
        return {k: v for cb in self.callbacks for k, v in cb.metrics().items()}

    def state_dict(self) -> dict[str, Any]:
        """Every method's state, for your own checkpoint beside the Trainer's."""
        return {f"{i}:{cb.name}": cb.state_dict() for i, cb in enumerate(self.callbacks)}
