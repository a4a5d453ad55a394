"""SoRA: a LoRA whose rank a sparse gate learns (Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained
Language Models").

``W' = W + s * B diag(g) A`` with a gate ``g`` of ``r`` entries, initialised to ones. The gate trains with the
other factors, and after every optimizer step a proximal (soft-threshold) step for the L1 penalty
``lambda * ||g||_1`` follows::

    g <- sign(g) * max(|g| - eta * lambda, 0)

where ``eta`` is the current learning rate of the gate's parameter group and ``lambda`` is ``sparsity_lambda``
(optionally swept linearly to ``lambda_end`` over training: the paper's sparsifying scheduler, which its code
steps through a list of values). The authors' code thresholds each step by a fixed ``lambda_2`` instead of
``lr * lambda`` (3e-4 at lr 8e-4 in their GLUE runs, hence the default ``lambda = 0.4``); under a constant learning
rate the two agree with ``lambda = lambda_2 / lr``. With Adam a gate moves by about ``lr`` per step at most, so a gate
whose normalised gradient stays below ``lambda`` shrinks to zero. (That code also draws the gate from N(0, 1);
ones, as here, start every rank open.) Gates reach exactly zero; :func:`prune_sora_` then removes the zeroed ranks
of each layer, leaving a smaller LoRA (ranks may differ between layers) whose output equals the gated one. :meth:`SoraAdapter.as_lora` gives the gate-folded plain
LoRA ``(A[k], B[:, k] * g[k], s)`` over the non-zero ranks ``k``. An optimizer with weight decay on the gate adds
its own shrinkage on top of the proximal step.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import LayerInfo
from edgetune.adapters.lora import LoraAdapter, lora_delta_weight, lora_update
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback, TrainState

__all__ = ["SoraAdapter", "SoraConfig", "SoraProximal", "gated_factor", "prune_sora_", "soft_threshold",
           "sora_callbacks", "sora_lambda"]

log = logging.getLogger(__name__)


class SoraConfig(AdapterConfig):
    """SoRA (Ding et al. 2023): LoRA with a gate ``g`` on its ranks, made sparse by a proximal L1 step.

    sparsity_lambda: the L1 weight ``lambda`` (the threshold of a step is ``lr * lambda``; with Adam, gates whose
    normalised gradient stays below it die; 0 turns the gate into a plain trained scale). lambda_schedule:
    ``constant``, or ``linear`` from ``sparsity_lambda`` to ``lambda_end`` over the training session (sweeps the
    sparsity, as the paper's sparsifying scheduler does).
    """

    method: Literal["sora"] = "sora"
    sparsity_lambda: float = Field(default=0.4, ge=0)
    lambda_schedule: Literal["constant", "linear"] = "constant"
    lambda_end: float | None = Field(default=None, ge=0)


# ------------------------------------------------------------------------------------------ pure maths
def soft_threshold(g: Tensor, t: float) -> Tensor:
    """``sign(g) * max(|g| - t, 0)``: the proximal operator of ``t * ||g||_1`` (entries within ``t`` of 0 become 0)."""
    return torch.sign(g) * torch.clamp(g.abs() - t, min=0)


def gated_factor(b: Tensor, g: Tensor) -> Tensor:
    """``B diag(g)``: column ``i`` of ``B`` (``(out, r)`` or ``(out, r, 1, 1)``) times ``g[i]``."""
    return b * g.view(1, -1, *([1] * (b.dim() - 2)))


def sora_lambda(lam: float, end: float | None, schedule: str, progress: float) -> float:
    """``lambda`` at a fraction ``progress`` in [0, 1] of training."""
    if schedule == "constant" or end is None:
        return lam
    return lam + (end - lam) * progress


# ------------------------------------------------------------------------------------------ module
class SoraAdapter(LoraAdapter):
    """A LoRA with a gate ``lora_gate`` ``(r,)`` between ``A`` and ``B``; ``rank`` is its current number of ranks."""

    def __init__(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator,
                 reference: Tensor | None = None) -> None:
        super().__init__(info, cfg, generator, reference)
        self.lora_gate = nn.Parameter(torch.ones(cfg.rank, **self._factory))

    def _b(self) -> Tensor:
        return gated_factor(self.lora_B, self.lora_gate)

    def forward(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.rank == 0:  # every gate was zero and got pruned: the adapter adds nothing
            return y
        return super().forward(layer, x, y)

    def update(self, x: Tensor) -> Tensor:
        return lora_update(self.info, self.dropout(x), self.lora_A, self._b(), self.scale,
                           padding_idx=self.padding_idx)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        return lora_delta_weight(self.info, self.lora_A, self._b(), self.scale)

    def kept(self) -> Tensor:
        """Indices of the non-zero gates."""
        return torch.nonzero(self.lora_gate.detach() != 0).flatten()

    def as_lora(self) -> tuple[Tensor, Tensor, float]:
        """The plain LoRA over the non-zero gates: ``(A[k], B[:, k] * g[k], scale)``."""
        k = self.kept()
        return self.lora_A.detach()[k], gated_factor(self.lora_B.detach()[:, k], self.lora_gate.detach()[k]), self.scale

    @torch.no_grad()
    def prune_(self) -> int:
        """Drop the ranks whose gate is zero (new, smaller parameters); return how many remain."""
        k = self.kept()
        grad = self.lora_A.requires_grad, self.lora_B.requires_grad, self.lora_gate.requires_grad
        self.lora_A = nn.Parameter(self.lora_A[k].clone(), requires_grad=grad[0])
        self.lora_B = nn.Parameter(self.lora_B[:, k].clone(), requires_grad=grad[1])
        self.lora_gate = nn.Parameter(self.lora_gate[k].clone(), requires_grad=grad[2])
        self.rank = int(k.numel())
        return self.rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}, nonzero_gates={int((self.lora_gate != 0).sum())}"


# ------------------------------------------------------------------------------------------ model verbs
def _sora_modules(model: nn.Module, name: str) -> list[tuple[str, SoraAdapter]]:
    from edgetune.adapters.model import adapter_configs, adapter_layers

    cfg = adapter_configs(model).get(name)
    if cfg is None:
        raise ConfigError(f"the model has no adapter named {name!r}; its adapters: {list(adapter_configs(model))}")
    if not isinstance(cfg, SoraConfig):
        raise ConfigError(f"adapter {name!r} is a {cfg.method} adapter, not SoRA; only SoRA has gates to prune")
    return [(path, lay.adapters[name]) for path, lay in adapter_layers(model) if name in lay.adapters]


def prune_sora_(model: nn.Module, name: str = "default") -> nn.Module:
    """Remove the zero-gated ranks of SoRA adapter ``name`` in every layer (outputs unchanged; a merged adapter
    stays merged, its update is the same); return the model. Optimizers built before hold the old parameters."""
    kept = {path: ad.prune_() for path, ad in _sora_modules(model, name)}
    log.info("SoRA adapter %r pruned: ranks per layer %s (total %d)", name, kept, sum(kept.values()))
    return model


# ------------------------------------------------------------------------------------------ training callback
class SoraProximal(Callback):
    """The proximal step of every gate of one SoRA adapter after each optimizer step.

    ``metrics()``: ``sora_mean_rank`` (non-zero gates per layer, averaged), ``sora_zero_fraction`` (of all gates) and
    ``sora_lambda`` (the current ``lambda``).
    """

    name = "sora"

    def __init__(self, model: nn.Module, cfg: SoraConfig) -> None:
        self.model, self.cfg = model, cfg
        self.lam = cfg.sparsity_lambda
        self._gates: list[nn.Parameter] | None = None

    def gates(self) -> list[nn.Parameter]:
        if self._gates is None:
            self._gates = [ad.lora_gate for _, ad in _sora_modules(self.model, self.cfg.name)]
        return self._gates

    def on_session_start(self, state: TrainState) -> None:
        self._gates = None

    @torch.no_grad()
    def after_optimizer_step(self, state: TrainState) -> None:
        if state.skip_step:
            return
        self.lam = sora_lambda(self.cfg.sparsity_lambda, self.cfg.lambda_end, self.cfg.lambda_schedule,
                               state.progress)
        lr = {id(p): group["lr"] for group in state.optimizer.param_groups for p in group["params"]}
        for g in self.gates():
            if id(g) in lr:  # a gate the optimizer does not train is left alone
                g.copy_(soft_threshold(g, float(lr[id(g)]) * self.lam))

    def metrics(self) -> dict[str, float]:
        gates = self.gates()
        if not gates:
            return {}
        nonzero = [int((g != 0).sum()) for g in gates]
        total = sum(g.numel() for g in gates)
        return {"sora_mean_rank": sum(nonzero) / len(gates), "sora_zero_fraction": 1 - sum(nonzero) / max(1, total),
                "sora_lambda": self.lam}


def sora_callbacks(model: nn.Module, cfg: AdapterConfig, total_steps: int, steps_per_epoch: int) -> list[Callback]:
    """The proximal gate step of a SoRA adapter (the ``callbacks`` entry of its registration)."""
    if not isinstance(cfg, SoraConfig):
        raise ConfigError(f"sora_callbacks needs a SoraConfig, got {type(cfg).__name__}")
    return [SoraProximal(model, cfg)]


ADAPTERS.add("sora", SoraAdapter, config=SoraConfig, callbacks=sora_callbacks,
             summary="SoRA (Ding et al. 2023): LoRA with a gate on its ranks, sparsified by a proximal L1 step")
