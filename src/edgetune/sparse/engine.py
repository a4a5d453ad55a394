"""``SparseEngine``: the training-loop callback that evolves the topology of every SparseLinear.

At each update step (every ``update_interval`` steps or epochs, until ``stop_fraction`` of training)
and for every sparse layer, three steps: **remove** (prune to the scheduled density by relative importance
when the density schedule decays, then cut the links the removal rule picks, ``floor(zeta_t * nnz)`` by
default), **percolate** (cut dead neurons along the layer chains, to a fixed point), **regrow** (back to the
scheduled density by the regrowth rule, new links at zero). The rules are looked up by name in the
registries of :mod:`edgetune.sparse.strategies` (removal, regrowth, density schedule; ``edgetune ls
methods``); a rule flagged ``needs_gradients`` gets the dense gradient of the batch before the update.
The optimizer state follows the links (surviving links keep their moments, new ones start at zero).
Every random decision uses a generator seeded by (seed, step, layer), so all DDP ranks agree; dense
gradients are averaged across ranks before they are used. Removal, scoring and sampling run on the
CPU whatever the layer's device (the decisions are then the same on every device; the predictors
themselves also run on CUDA when called directly); a GPU run pays one dense (out, in) transfer per layer
per update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.hooks import Callback, TrainState
from edgetune.sparse.config import SparseConfig
from edgetune.sparse.layer import SparseLinear
from edgetune.sparse.percolation import active_neuron_fraction, percolate
from edgetune.sparse.removal import relative_importance_removal
from edgetune.sparse.schedules import (
    cosine_zeta,
    last_update_step,
    removal_temperature,
    stop_step,
    update_due,
)
from edgetune.sparse.sparsify import hidden_tails, layer_chains, sparse_layers
from edgetune.sparse.strategies import (
    DENSITY_SCHEDULES,
    REGROWTHS,
    REMOVALS,
    RuleContext,
    ScheduleContext,
    apply_rule,
    load_rules,
)
from edgetune.sparse.topology import link_count

__all__ = ["SparseEngine", "active_neuron_fraction"]

log = logging.getLogger(__name__)


@dataclass
class _LayerUpdate:
    """One layer during an update: its mask after removal (then percolation) and what it started from."""

    name: str
    layer: SparseLinear
    weight: torch.Tensor  # dense (out, in) before the update
    old: torch.Tensor  # mask before the update
    mask: torch.Tensor  # mask after removal, then after percolation
    target: int  # link count after regrowth
    after_removal: int = 0  # link count after removal, before percolation


load_rules()


class SparseEngine(Callback):
    """Drives topology updates of ``model``'s SparseLinear layers from the training loop.

    In edgetune's loop (or any loop driving Callbacks) it is a callback. In your own PyTorch loop, attach
    it to the optimizer and call :meth:`step` right after each ``optimizer.step()``::

        sparsify_(model, cfg)
        optimizer = torch.optim.AdamW(model.parameters())      # built after sparsify_
        engine = SparseEngine(model, cfg).attach(optimizer, total_steps=epochs * len(loader),
                                                 steps_per_epoch=len(loader))
        ...  loss.backward(); optimizer.step(); engine.step(); optimizer.zero_grad()
        engine.close()

    The optimizer steps of update iterations are skipped when the method asks for it, and the optimizer
    moments follow the links (see :class:`edgetune.integrations.MethodStepper`).
    """

    name = "sparse"

    def __init__(self, model: nn.Module, cfg: SparseConfig, *, seed: int = 0) -> None:
        self.cfg = cfg.resolved()
        # the rules, looked up once in their registries (edgetune.sparse.strategies)
        self.removal = REMOVALS.get(self.cfg.removal)
        self.regrowth = REGROWTHS.get(self.cfg.regrowth)
        self.schedule = DENSITY_SCHEDULES.get(self.cfg.density_schedule)
        self.options = {k: self.cfg.rule_options(k) for k in ("removal", "regrowth", "density_schedule")}
        self.needs_gradients = self.removal.needs_gradients or self.regrowth.needs_gradients
        self.layers = sparse_layers(model)
        if not self.layers:
            raise ConfigError(
                "SparseEngine: the model has no SparseLinear layer; call sparsify_(model, cfg) first"
            )
        self.chains = layer_chains(self.layers, model)  # active neurons are measured for every method
        self.tails = hidden_tails(model, self.layers, self.chains)
        seen = [i for chain in self.chains for i in chain]
        self._shared = {i: seen.count(i) > 1 for i in seen}  # layers in more than one chain
        if self.cfg.percolation and not self.chains:
            log.warning(
                "sparse: percolation is on but no chain of sparse layers was found (%s); nothing will be "
                "percolated",
                ", ".join(n for n, _ in self.layers),
            )
        self.seed = self.cfg.seed if self.cfg.seed is not None else seed
        self.frozen = [False] * len(self.layers)
        self.updates = 0
        self.last: dict[str, float] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._armed = False
        self._handles: list[Any] = []
        self.interval = 1
        self.total = 1
        self.t_end = 1
        self.last_update = 0
        self.model = model
        self.stepper: Any = None  # a MethodStepper once attach() was called
        if self.needs_gradients:  # the rules read the dense gradient of the batch before each update
            for i, (_, layer) in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(self._capture(i)))

    # ------------------------------------------------------------------ schedule
    def _setup(self, state: TrainState) -> None:
        per = state.steps_per_epoch if self.cfg.update_unit == "epochs" else 1
        self.interval = max(1, int(self.cfg.update_interval or 1) * per)
        self.total = max(1, state.total_steps)
        self.t_end = max(1, stop_step(self.total, self.cfg.stop_fraction))
        self.last_update = last_update_step(self.t_end, self.interval)
        decays = bool(self.cfg.initial_density) and self.cfg.initial_density != self.cfg.density
        if decays and self.last_update == 0:
            raise ConfigError(
                f"sparse: density decay from {self.cfg.initial_density} to {self.cfg.density} needs topology updates "
                f"before the stop at step {self.t_end} ({self.cfg.stop_fraction:g} of {self.total} steps), but updates "
                f"come every {self.interval} steps, so the model would train at {self.cfg.initial_density} throughout; "
                "lower sparse.update_interval (or use update_unit=steps) or train longer"
            )
        if decays and state.world_size > 1:
            raise ConfigError(
                "sparse: density decay (initial_density) changes parameter sizes, which DDP cannot "
                "follow; run it in one process or set sparse.initial_density=null"
            )

    def _schedule_context(self, step: int) -> ScheduleContext:
        c = self.cfg
        return ScheduleContext(
            density=c.density,
            initial_density=c.initial_density or c.density,
            t_end=self.t_end,
            interval=self.interval,
            last_update=self.last_update,
            zeta=self.zeta_at(step),
            steepness=c.decay_steepness,
            options=self.options["density_schedule"],
        )

    def density_at(self, step: int) -> float:
        """Density the update at optimizer step ``step`` ends on (the density schedule's)."""
        return self.schedule.at(step, self._schedule_context(step))

    def zeta_at(self, step: int) -> float:
        z = float(self.cfg.zeta or 0.0)
        return cosine_zeta(step, self.t_end, z) if self.cfg.zeta_schedule == "cosine" else z

    def _due(self, step: int) -> bool:
        if not self.regrowth.evolves and not self.cfg.initial_density:
            return False
        return update_due(step, self.interval, self.cfg.stop_fraction, self.total)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, state: TrainState) -> None:
        self._setup(state)
        self._armed = self._due(state.step + 1)

    def before_optimizer_step(self, state: TrainState) -> None:
        if self._due(state.step + 1) and self.cfg.skip_step_on_update:
            state.skip_step = True

    def after_optimizer_step(self, state: TrainState) -> None:
        step = state.step + 1  # optimizer steps taken, this one included
        if self._due(step):
            self.update(step, state.optimizer)
        self._armed = self._due(step + 1)

    def _capture(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (self._armed and module.training and torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])  # (N, in)

            def grad_hook(grad_out: torch.Tensor) -> None:
                g = grad_out.detach().reshape(-1, grad_out.shape[-1]).t() @ x.to(grad_out.dtype)  # (out, in)
                self._grads[i] = g if i not in self._grads else self._grads[i] + g

            output.register_hook(grad_hook)

        return hook

    # ------------------------------------------------------------------ the update
    def _generator(self, step: int, i: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + step) * 1009 + i)

    def _rule_context(
        self, step: int, i: int, name: str, generator: torch.Generator, temp: float, kind: str
    ) -> RuleContext:
        rule = self.removal if kind == "removal" else self.regrowth
        grad = self._grads.get(i)
        if rule.needs_gradients and grad is None:
            raise ConfigError(
                f"sparse layer {name!r}: {getattr(self.cfg, kind)} {kind} at step {step} found no dense gradient; the "
                "update must follow a training batch (forward + backward in train mode, as the Trainer does), not "
                f"run on its own; or choose a {kind} rule that needs no gradient (edgetune ls methods)"
            )
        return RuleContext(
            layer=name,
            step=step,
            generator=generator,
            temperature=temp,
            predictor=str(self.cfg.predictor),
            grad=None if grad is None else grad.cpu(),
            options=self.options[kind],
        )

    def _remove(self, step: int, i: int, temp: float, sched: ScheduleContext, density: float) -> _LayerUpdate:
        """Removal step of layer ``i``: prune to the scheduled density, then cut links by the removal rule."""
        name, layer = self.layers[i]
        gen = self._generator(step, i, torch.device("cpu"))
        mask = layer.mask()
        w = layer.to_dense_weight()
        old = mask.clone()
        target = link_count(layer.out_features, layer.in_features, density)
        final = link_count(layer.out_features, layer.in_features, self.cfg.density)
        pruned, k = self.schedule.removal(int(mask.sum()), final, target, sched)
        if pruned:  # density decay: prune to the scheduled density by relative importance
            mask &= ~relative_importance_removal(w, mask, pruned)
        if k and not self.frozen[i] and self.regrowth.evolves:
            ctx = self._rule_context(step, i, name, gen, temp, "removal")
            rem = apply_rule(
                "removal",
                self.cfg.removal,
                name,
                k,
                mask,
                lambda: self.removal.fn(w.cpu(), mask.cpu(), k, ctx),
            )
            mask &= ~rem.to(mask.device)
        return _LayerUpdate(
            name=name, layer=layer, weight=w, old=old, mask=mask, target=target, after_removal=int(mask.sum())
        )

    def _percolate(self, work: list[_LayerUpdate]) -> None:
        """Percolation step: cut hidden neurons left without inputs or outputs along every chain."""
        # chains that share a layer (gate_proj and up_proj -> down_proj) repeat until nothing changes
        changed = bool(self.cfg.percolation)
        while changed:
            changed = False
            for chain in self.chains:
                res = percolate([work[i].mask for i in chain])
                for i, m in zip(chain, res.masks):
                    changed |= bool(self._shared.get(i)) and not torch.equal(m, work[i].mask)
                    work[i].mask = m

    def _regrow(
        self, step: int, i: int, u: _LayerUpdate, optimizer: torch.optim.Optimizer | None
    ) -> tuple[int, int, float]:
        """Regrowth step of layer ``i`` back to its scheduled count; returns (removed, regrown, overlap)."""
        mask = u.mask
        removed = u.old & ~mask
        # a frozen layer removes nothing itself but regrows what percolation cut, so its density holds
        # percolation_refund=False: what percolation cut is not regrown (the official EM_S scheduler)
        have = int(mask.sum()) if self.cfg.percolation_refund else u.after_removal
        k = max(0, min(u.target - have, mask.numel() - int(mask.sum()))) if self.regrowth.evolves else 0
        gen = self._generator(step, i + 7919, torch.device("cpu"))
        if k:
            ctx = self._rule_context(step, i, u.name, gen, 0.0, "regrowth")
            new = apply_rule(
                "regrowth", self.cfg.regrowth, u.name, k, mask, lambda: self.regrowth.fn(mask.cpu(), k, ctx)
            ).to(mask.device)
        else:
            new = torch.zeros_like(mask)
        final = mask | new
        overlap = float((new & removed).sum()) / max(1, int(removed.sum()))
        if (
            self.cfg.early_stop_overlap is not None
            and int(removed.sum())
            and overlap > self.cfg.early_stop_overlap
        ):
            self.frozen[i] = True
            log.info("sparse: %s frozen at step %d (removed/regrown overlap %.3f)", u.name, step, overlap)
        idx = final.nonzero().t()  # (2, nnz) row-major
        # survivors keep their weight and optimizer state; regrown links start at 0 with zero state, and so
        # do links removed in this very update unless regrown_removed=keep gives them theirs back
        if self.cfg.regrown_removed == "keep":
            u.layer.set_topology(idx, u.weight[final] * u.old[final], optimizer)
        else:
            u.layer.set_topology(idx, u.weight[final] * mask[final], optimizer, fresh=new[final])
        return int(removed.sum()), int(new.sum()), overlap

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Run one topology update of every layer at optimizer step ``step``: remove, percolate, regrow."""
        sched = self._schedule_context(step)
        temp = removal_temperature(min(step, self.t_end), self.t_end, *self.cfg.temperature)
        if self.needs_gradients and dist.is_available() and dist.is_initialized():
            for g in self._grads.values():
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        density = self.schedule.at(step, sched)
        work = [self._remove(step, i, temp, sched, density) for i in range(len(self.layers))]
        self._percolate(work)
        counts = [self._regrow(step, i, u, optimizer) for i, u in enumerate(work)]
        self._grads.clear()
        self.updates += 1
        all_masks = [layer.mask() for _, layer in self.layers]
        nnz = sum(int(m.sum()) for m in all_masks)
        size = sum(m.numel() for m in all_masks)
        self.last = {
            "sparse_density": nnz / size,
            "sparse_active_neurons": active_neuron_fraction(all_masks, self.chains, self.tails),
            "sparse_removed": float(sum(c[0] for c in counts)),
            "sparse_regrown": float(sum(c[1] for c in counts)),
            "sparse_overlap": sum(c[2] for c in counts) / len(self.layers),
            "sparse_frozen_layers": float(sum(self.frozen)),
            "sparse_updates": float(self.updates),
            "sparse_zeta": sched.zeta,
        }
        log.debug("sparse update at step %d: %s", step, self.last)
        return self.last

    # ------------------------------------------------------------------ outside edgetune's loop
    def attach(
        self, optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int | None = None
    ) -> SparseEngine:
        """Drive this engine from your own loop: call :meth:`step` after each ``optimizer.step()``; return self.

        ``total_steps``: optimizer steps of the whole training; ``steps_per_epoch`` (e.g. ``len(loader)``)
        is needed by methods that update once per N epochs (cht, chts, chtss). ``optimizer`` must hold the
        SparseLinear parameters, i.e. be built after ``sparsify_``. :attr:`stepper` (a MethodStepper) then
        carries the loop position for your checkpoints (``engine.stepper.state_dict()``).
        """
        from edgetune.integrations.stepper import MethodStepper, unwrap_optimizer

        if self.stepper is not None:
            raise ConfigError(
                "SparseEngine.attach: this engine is already attached to an optimizer; build one "
                "engine per training run"
            )
        held = {id(p) for g in unwrap_optimizer(optimizer).param_groups for p in g["params"]}
        missing = [name for name, layer in self.layers if id(layer.values) not in held]
        if missing:
            raise ConfigError(
                f"SparseEngine.attach: the optimizer does not hold the sparse weights of {missing}; it was built "
                "before sparsify_ replaced those layers. Build the optimizer after sparsify_(model, cfg), from "
                "model.parameters()"
            )
        if self.cfg.update_unit == "epochs" and steps_per_epoch is None:
            raise ConfigError(
                f"SparseEngine.attach: sparse method {self.cfg.method!r} updates the topology every "
                f"{self.cfg.update_interval} epoch(s), so it needs steps_per_epoch (optimizer steps per epoch, e.g. "
                "len(train_loader)); pass it, or set update_unit='steps' with an update_interval in steps"
            )
        self.stepper = MethodStepper(
            self.model, optimizer, [self], total_steps=total_steps, steps_per_epoch=steps_per_epoch
        )
        return self

    def step(self, loss: torch.Tensor | float | None = None) -> dict[str, float]:
        """Call right after ``optimizer.step()`` in your loop (after :meth:`attach`); return :meth:`metrics`
        of the update when one ran at this step, else ``{}``."""
        if self.stepper is None:
            raise ConfigError(
                "SparseEngine.step: call engine.attach(optimizer, total_steps=...) once before the "
                "training loop (in edgetune's Trainer the engine is a callback and needs neither)"
            )
        before = self.updates
        self.stepper.step(loss)
        return self.metrics() if self.updates != before else {}

    def close(self) -> None:
        """End training driven by :meth:`step` (fires on_fit_end; removes the optimizer and model hooks)."""
        if self.stepper is not None:
            self.stepper.close()

    # ------------------------------------------------------------------ reporting and state
    def metrics(self) -> dict[str, float]:
        masks = [layer.mask() for _, layer in self.layers]
        nnz = sum(int(m.sum()) for m in masks)
        out = dict(self.last)
        out["sparse_density"] = nnz / sum(m.numel() for m in masks)
        out["sparse_active_neurons"] = active_neuron_fraction(masks, self.chains, self.tails)
        out["sparse_updates"] = float(self.updates)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.cfg.method,
            "density": self.cfg.density,
            "layers": [[name, layer.out_features, layer.in_features] for name, layer in self.layers],
            "frozen": list(self.frozen),
            "updates": self.updates,
            "last": dict(self.last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = [[name, layer.out_features, layer.in_features] for name, layer in self.layers]
        theirs = [list(x) for x in state.get("layers", [])]
        if theirs != mine:
            diff = next(
                ((a, b) for a, b in zip(theirs, mine) if a != b), (theirs[len(mine) :], mine[len(theirs) :])
            )
            raise CheckpointError(
                f"checkpoint holds another sparse topology: layer {diff[0]} in the checkpoint vs {diff[1]} in this "
                "model; resume with the recipe that wrote it"
            )
        if state.get("method") != self.cfg.method or state.get("density") != self.cfg.density:
            raise CheckpointError(
                f"checkpoint was trained with sparse method {state.get('method')!r} at density {state.get('density')} "
                f"but this run asks for {self.cfg.method!r} at {self.cfg.density}; resume with the same sparse settings"
            )
        self.frozen = [bool(x) for x in state["frozen"]]
        self.updates = int(state["updates"])
        self.last = {k: float(v) for k, v in state.get("last", {}).items()}
