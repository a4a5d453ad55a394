"""``MethodStepper``: drives edgetune method callbacks from a training loop that edgetune does not own.

A user's loop keeps its own forward, backward and ``optimizer.step()``; one call to :meth:`MethodStepper.step`
right after ``optimizer.step()`` fires the hooks of :mod:`edgetune.core.hooks` in the order edgetune's own
loop fires them. The stepper owns the :class:`TrainState` (step, epoch, model, optimizer), so no hook state is
built by hand::

    stepper = MethodStepper(model, optimizer, [engine], total_steps=len(loader) * epochs,
                            steps_per_epoch=len(loader))
    for epoch in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            stepper.step()            # after_optimizer_step; epoch ends every steps_per_epoch steps
            optimizer.zero_grad()
    stepper.close()                   # on_session_end, on_fit_end (or use ``with MethodStepper(...)``)

The hooks that must act *before* the optimizer step (``after_backward``, ``before_optimizer_step``) run
from a step pre-hook the stepper registers on the optimizer (``Optimizer.register_step_pre_hook``), so the
common case needs no second call. A hook that sets ``state.skip_step`` (the sparse engine does on update
steps of CHT, CHTs, CHTss and RigL) makes that optimizer step a no-op: the pre-hook sets every gradient of
the optimizer's parameters to ``None``, and torch's optimizers leave parameters without gradients (and their
moments and step counts) untouched. Your own LR scheduler still advances on such a step unless you test
:attr:`MethodStepper.last_step_skipped` (edgetune's loop does not advance it). Caveats of the pre-hook:
it runs after your gradient clipping (edgetune's loop clips between the two hooks, so the order of clipping
and ``after_backward`` differs); with a ``GradScaler`` that skips a step for inf/NaN gradients, neither the
optimizer nor the pre-hook run but ``step()`` still counts the iteration, as edgetune's loop does. Pass
``hook_optimizer=False`` to call :meth:`MethodStepper.before_optimizer_step` yourself instead.

``on_fit_start`` (and ``on_session_start``, ``on_epoch_start``) fire lazily at the first of: the model's
first forward, the first optimizer step, ``step()``, or an explicit :meth:`MethodStepper.start`; so
:meth:`load_state_dict` can restore a checkpoint after construction and before training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.hooks import Callback, TrainState

__all__ = ["MethodStepper", "unwrap_model", "unwrap_optimizer"]

log = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / ``torch.compile`` wrappers (``model`` itself when unwrapped)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers that hold it as ``.optimizer`` (accelerate's AcceleratedOptimizer)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class MethodStepper:
    """Owns the :class:`TrainState` of a user's loop and fires ``callbacks``' hooks from it.

    Args:
        model: the trained module (wrappers are unwrapped; hooks see the inner module).
        optimizer: the optimizer stepping ``model``'s parameters (built after any method verb such as
            ``sparsify_``, which replaces parameters).
        callbacks: method hooks, e.g. a ``SparseEngine``; fired in this order.
        total_steps: optimizer steps the whole training will take (schedules are fractions of it).
        steps_per_epoch: optimizer steps per epoch; given, ``step()`` ends an epoch every that many steps
            (and at ``total_steps``). None: one epoch spans the whole run unless you call :meth:`end_epoch`;
            methods that count in epochs need it.
        hook_optimizer: run the pre-step hooks from an optimizer step pre-hook (default); False: call
            :meth:`before_optimizer_step` yourself between ``backward()`` and ``optimizer.step()``.
        auto_epochs: end epochs from :meth:`step` every ``steps_per_epoch`` steps (default); False: the
            caller calls :meth:`end_epoch` (``steps_per_epoch`` then only informs the hooks).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        callbacks: Sequence[Callback],
        *,
        total_steps: int,
        steps_per_epoch: int | None = None,
        hook_optimizer: bool = True,
        auto_epochs: bool = True,
    ) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"MethodStepper: total_steps={total_steps!r} must be a positive int, the number of "
                              "optimizer steps of the whole training (e.g. len(loader) * epochs)")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ConfigError(f"MethodStepper: steps_per_epoch={steps_per_epoch!r} must be a positive int (optimizer "
                              "steps per epoch, e.g. len(loader)) or None")
        bad = [type(cb).__name__ for cb in callbacks if not isinstance(cb, Callback)]
        if bad:
            raise ConfigError(f"MethodStepper: callbacks must be edgetune Callback objects, got {bad}; pass the method "
                              "objects themselves, e.g. [SparseEngine(model, cfg)]")
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer)
        self.callbacks = list(callbacks)
        params = [p for p in self.model.parameters()]
        in_dist = dist.is_available() and dist.is_initialized()
        self.state = TrainState(
            model=self.model, optimizer=self.optimizer,
            device=params[0].device if params else torch.device("cpu"),
            total_steps=total_steps, steps_per_epoch=steps_per_epoch or total_steps,
            rank=dist.get_rank() if in_dist else 0, world_size=dist.get_world_size() if in_dist else 1,
        )
        self.auto_epochs = auto_epochs and steps_per_epoch is not None
        self.started = False
        self.closed = False
        self.last_step_skipped = False
        self._pre_done = False
        self._handles: list[Any] = [self.model.register_forward_pre_hook(self._on_forward)]
        if hook_optimizer:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_pre_step))

    # ------------------------------------------------------------------ hook plumbing
    def _fire(self, name: str) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self.state)

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if not self.started:
            self.start()

    def _on_optimizer_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.before_optimizer_step()

    # ------------------------------------------------------------------ the user's calls
    def start(self) -> None:
        """Fire ``on_fit_start``, ``on_session_start`` and ``on_epoch_start`` (once; later calls do nothing)."""
        if self.started:
            return
        if self.closed:
            raise ConfigError("MethodStepper: this stepper was closed; build a new one to train again")
        self.started = True
        self._fire("on_fit_start")
        self._fire("on_session_start")
        self._fire("on_epoch_start")

    def before_optimizer_step(self) -> bool:
        """Fire ``after_backward`` and ``before_optimizer_step``; return whether the step is to be skipped.

        Runs once per step (a second call before :meth:`step` only repeats the skip). When a hook set
        ``state.skip_step``, every gradient of the optimizer's parameters is set to None so that the coming
        ``optimizer.step()`` changes nothing. Called for you by the optimizer pre-hook unless
        ``hook_optimizer=False``.
        """
        self.start()
        if not self._pre_done:
            self._pre_done = True
            self._fire("after_backward")
            self.state.skip_step = False
            self._fire("before_optimizer_step")
        if self.state.skip_step:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        return self.state.skip_step

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Call right after ``optimizer.step()``: fire ``after_optimizer_step``, advance the step, end epochs.

        ``loss`` (optional) is shown to the hooks as ``state.loss``.
        """
        self.start()
        st = self.state
        if not self._pre_done:  # the optimizer step did not run (a GradScaler skip) or the pre-hook is off
            st.skip_step = False
        if loss is not None:
            st.loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._fire("after_optimizer_step")
        self.last_step_skipped = st.skip_step
        self._pre_done = False
        st.step += 1
        if st.step == st.total_steps + 1:
            log.warning("MethodStepper: step %d is past total_steps=%d; method schedules have ended (raise "
                        "total_steps to the real number of optimizer steps)", st.step, st.total_steps)
        if self.auto_epochs and (st.step % st.steps_per_epoch == 0 or st.step == st.total_steps):
            self.end_epoch()

    def end_epoch(self, last_eval: dict[str, float] | None = None) -> None:
        """Fire ``on_epoch_end`` (with ``last_eval`` as ``state.last_eval``), then start the next epoch.

        Called by :meth:`step` when ``steps_per_epoch`` was given; otherwise call it at your epoch ends.
        """
        self.start()
        st = self.state
        st.last_eval = dict(last_eval or {})
        self._fire("on_epoch_end")
        st.epoch += 1
        if st.step < st.total_steps:
            self._fire("on_epoch_start")

    def close(self) -> None:
        """Fire ``on_session_end`` and ``on_fit_end`` (if training started) and remove the stepper's hooks."""
        if self.closed:
            return
        self._remove_hooks()
        self.closed = True
        if self.started:
            self._fire("on_session_end")
            self._fire("on_fit_end")

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> MethodStepper:  # noqa: PYI034 (no typing.Self before Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # an interrupted fit does not end; just stop hooking the model and optimizer
            self._remove_hooks()
            self.closed = True

    # ------------------------------------------------------------------ reporting and state
    def metrics(self) -> dict[str, float]:
        """The callbacks' current scalars (e.g. ``sparse_density``), merged."""
        return {k: v for cb in self.callbacks for k, v in cb.metrics().items()}

    def _names(self) -> list[str]:
        return [f"{i}:{cb.name}" for i, cb in enumerate(self.callbacks)]

    def state_dict(self) -> dict[str, Any]:
        """Loop position and every callback's state, for the user's checkpoint (save beside the model's)."""
        return {"step": self.state.step, "epoch": self.state.epoch,
                "callbacks": {n: cb.state_dict() for n, cb in zip(self._names(), self.callbacks)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` before training resumes (before the first forward)."""
        names = self._names()
        theirs = sorted(state.get("callbacks", {}))
        if theirs != sorted(names):
            raise CheckpointError(f"MethodStepper: the checkpoint holds state of methods {theirs} but this stepper "
                                  f"drives {sorted(names)}; build the stepper with the callbacks that wrote it")
        if self.started:
            log.warning("MethodStepper: state loaded after training started; load it before the first forward so "
                        "that on_fit_start sees the restored step")
        for n, cb in zip(names, self.callbacks):
            cb.load_state_dict(state["callbacks"][n])
        self.state.step, self.state.epoch = int(state["step"]), int(state["epoch"])
