"""DyLoRA: a LoRA usable at every rank up to its own (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of
Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation").

Each training step samples one rank ``b`` uniformly in ``[min_rank, rank]`` (the same ``b`` for every layer of the
step) and the forward uses the first ``b`` rows of ``A`` and columns of ``B``::

    W' = W + (alpha / b) * B[:, :b] @ A[:b]

With ``update="last"`` (the paper's Eq. 7) only the ``b``-th row of ``A`` and column of ``B`` train, so the
components below ``b`` keep what lower ranks learnt; ``update="all"`` trains all of the first ``b``. The components a
step does not train get no gradient, and the sampler puts them back after the optimizer step, so that momentum or
weight decay (which move a parameter whose gradient is zero) cannot change them either. After training any rank ``<= rank`` is a working LoRA without
retraining: :func:`set_adapter_rank_` picks the rank the model uses outside training, :func:`truncate_adapter_`
cuts the factors to it for good, and :meth:`DyLoraAdapter.as_lora` gives the plain LoRA of that rank.

The rank sampler is :class:`DyLoraSampler`, a training callback seeded by the config's ``seed`` (else by
``torch.initial_seed()`` when it is built, which a seeded run sets); its ``state_dict`` holds the generator and the rank of the next step, so a
resumed run draws the ranks the uninterrupted one would have.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import LayerInfo
from edgetune.adapters.lora import LoraAdapter, lora_delta_weight, lora_update
from edgetune.adapters.model import set_adapter_config_
from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.hooks import Callback, TrainState

__all__ = ["DyLoraAdapter", "DyLoraConfig", "DyLoraSampler", "dylora_callbacks", "dylora_scale", "nested_factors",
           "sample_rank", "set_adapter_rank_", "truncate_adapter_"]

log = logging.getLogger(__name__)


class DyLoraConfig(AdapterConfig):
    """DyLoRA (Valipour et al. 2023): LoRA trained at a rank ``b`` sampled in ``[min_rank, rank]`` each step.

    min_rank: the smallest rank sampled. update: ``last`` trains only the sampled ``b``-th component (the paper's
    rule), ``all`` trains the first ``b``. eval_rank: the rank used outside training and by merges and exports
    (None: ``rank``). seed: also seeds the rank sampler.
    """

    method: Literal["dylora"] = "dylora"
    min_rank: int = Field(default=1, ge=1)
    update: Literal["last", "all"] = "last"
    eval_rank: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _ranks(self) -> DyLoraConfig:
        if self.min_rank > self.rank:
            raise ValueError(f"min_rank={self.min_rank} is larger than rank={self.rank}; DyLoRA samples ranks in "
                             "[min_rank, rank], so set min_rank <= rank")
        if self.eval_rank is not None and self.eval_rank > self.rank:
            raise ValueError(f"eval_rank={self.eval_rank} is larger than rank={self.rank}; pick a rank in [1, "
                             f"{self.rank}] (or None for {self.rank})")
        return self


# ------------------------------------------------------------------------------------------ pure maths
def dylora_scale(alpha: float, b: int, rslora: bool = False) -> float:
    """The factor on ``B[:, :b] @ A[:b]``: ``alpha / b`` (``alpha / sqrt(b)`` with rsLoRA)."""
    return alpha / (b**0.5 if rslora else b)


def nested_factors(a: Tensor, b_mat: Tensor, b: int, *, only_last: bool = False) -> tuple[Tensor, Tensor]:
    """The first ``b`` components: ``A[:b]`` (rows, ``(b, ...)``) and ``B[:, :b]`` (columns, ``(out, b, ...)``).

    ``only_last``: components ``< b`` are detached, so gradients reach only the ``b``-th (the paper's Eq. 7).
    """
    a_b, b_b = a[:b], b_mat[:, :b]
    if only_last and b > 1:
        a_b = torch.cat([a_b[:-1].detach(), a_b[-1:]], 0)
        b_b = torch.cat([b_b[:, :-1].detach(), b_b[:, -1:]], 1)
    return a_b, b_b


def sample_rank(low: int, high: int, generator: torch.Generator) -> int:
    """A rank drawn uniformly in ``[low, high]``."""
    return low + int(torch.randint(high - low + 1, (1,), generator=generator))


# ------------------------------------------------------------------------------------------ module
class DyLoraAdapter(LoraAdapter):
    """A LoRA of rank ``rank`` used at a sampled rank in training and at ``eval_rank`` otherwise (``scale`` is
    that of ``eval_rank``).

    ``sampled_rank`` is set by :class:`DyLoraSampler` for the coming step; None (no sampler, or after training)
    makes training use ``eval_rank`` too.
    """

    def __init__(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator,
                 reference: Tensor | None = None) -> None:
        super().__init__(info, cfg, generator, reference)
        if not isinstance(cfg, DyLoraConfig):
            raise ConfigError(f"DyLoraAdapter needs a DyLoraConfig, got {type(cfg).__name__}")
        self.alpha, self.rslora, self.only_last = cfg.alpha, cfg.rslora, cfg.update == "last"
        self.sampled_rank: int | None = None
        self._held: tuple[Tensor, Tensor] | None = None
        self.use_rank_(cfg.eval_rank or cfg.rank)

    @property
    def current_rank(self) -> int:
        """The rank the next forward uses (a layer of a smaller rank, from ``rank_pattern``, uses all of its own)."""
        b = self.sampled_rank if (self.training and self.sampled_rank is not None) else self.eval_rank
        return min(b, self.rank)

    def update(self, x: Tensor) -> Tensor:
        b = self.current_rank
        a, bm = nested_factors(self.lora_A, self.lora_B, b, only_last=self.only_last and self.training)
        return lora_update(self.info, self.dropout(x), a, bm, dylora_scale(self.alpha, b, self.rslora),
                           padding_idx=self.padding_idx)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        a, bm = nested_factors(self.lora_A, self.lora_B, self.eval_rank)
        return lora_delta_weight(self.info, a, bm, self.scale)

    def as_lora(self) -> tuple[Tensor, Tensor, float]:
        """The plain LoRA of rank ``eval_rank``: ``(A[:k], B[:, :k], alpha / k)``."""
        k = self.eval_rank
        return self.lora_A[:k].detach(), self.lora_B[:, :k].detach(), self.scale

    def use_rank_(self, k: int) -> None:
        """Use rank ``k`` outside training, in merges and exports."""
        self.eval_rank = min(k, self.rank)
        self.scale = dylora_scale(self.alpha, self.eval_rank, self.rslora)

    @torch.no_grad()
    def hold_(self) -> None:
        """Remember the factors before an optimizer step (see :meth:`restore_untrained_`)."""
        self._held = (self.lora_A.detach().clone(), self.lora_B.detach().clone())

    @torch.no_grad()
    def restore_untrained_(self) -> None:
        """Put back the components the step at rank ``sampled_rank`` did not train (all but the ``b``-th with
        ``update="last"``, those above ``b`` with ``"all"``)."""
        held, self._held = self._held, None
        if held is None or self.sampled_rank is None:
            return
        b = min(self.sampled_rank, self.rank)
        lo = b - 1 if self.only_last else 0
        self.lora_A[:lo] = held[0][:lo]
        self.lora_A[b:] = held[0][b:]
        self.lora_B[:, :lo] = held[1][:, :lo]
        self.lora_B[:, b:] = held[1][:, b:]

    @torch.no_grad()
    def truncate_(self, k: int) -> None:
        """Keep only the first ``k`` components (new, smaller parameters)."""
        self.lora_A = nn.Parameter(self.lora_A[:k].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(self.lora_B[:, :k].clone(), requires_grad=self.lora_B.requires_grad)
        self.rank = k
        self.sampled_rank = None
        self.use_rank_(k)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, eval_rank={self.eval_rank}, update={'last' if self.only_last else 'all'}"


# ------------------------------------------------------------------------------------------ model verbs
def _dylora_modules(model: nn.Module, name: str) -> tuple[DyLoraConfig, list[tuple[Any, DyLoraAdapter]]]:
    from edgetune.adapters.model import adapter_configs, adapter_layers

    cfg = adapter_configs(model).get(name)
    if cfg is None:
        raise ConfigError(f"the model has no adapter named {name!r}; its adapters: {list(adapter_configs(model))}")
    if not isinstance(cfg, DyLoraConfig):
        raise ConfigError(f"adapter {name!r} is a {cfg.method} adapter, not DyLoRA; only a DyLoRA adapter can "
                          "change its rank without retraining")
    return cfg, [(lay, lay.adapters[name]) for _, lay in adapter_layers(model) if name in lay.adapters]


def _check_rank(cfg: DyLoraConfig, layers: list[tuple[Any, DyLoraAdapter]], rank: int, verb: str) -> int:
    limit = min((ad.rank for _, ad in layers), default=cfg.rank)
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ConfigError(f"{verb}: rank {rank!r} is outside [1, {limit}] (adapter {cfg.name!r} was trained up to "
                          f"rank {limit})")
    merged = [lay for lay, _ in layers if cfg.name in lay.merged]
    if merged:
        raise ConfigError(f"{verb}: adapter {cfg.name!r} is merged into the weights at rank "
                          f"{layers[0][1].eval_rank}; unmerge_ it first, then merge again at the new rank")
    return rank


def set_adapter_rank_(model: nn.Module, rank: int, name: str = "default") -> nn.Module:
    """Use DyLoRA adapter ``name`` at ``rank`` (any rank up to the trained one) outside training, in merges and
    exports; return the model. The stored config's ``eval_rank`` follows."""
    cfg, layers = _dylora_modules(model, name)
    rank = _check_rank(cfg, layers, rank, "set_adapter_rank_")
    for _, ad in layers:
        ad.use_rank_(rank)
    set_adapter_config_(model, cfg.replace(eval_rank=rank))
    log.info("DyLoRA adapter %r now used at rank %d", name, rank)
    return model


def truncate_adapter_(model: nn.Module, rank: int, name: str = "default") -> nn.Module:
    """Cut DyLoRA adapter ``name`` to its first ``rank`` components for good (a smaller adapter that is the plain
    LoRA of that rank); return the model. Optimizers built before hold the old parameters: build a new one."""
    cfg, layers = _dylora_modules(model, name)
    rank = _check_rank(cfg, layers, rank, "truncate_adapter_")
    for _, ad in layers:
        ad.truncate_(rank)
    set_adapter_config_(model, cfg.replace(rank=rank, eval_rank=None, min_rank=min(cfg.min_rank, rank)))
    log.info("DyLoRA adapter %r truncated to rank %d", name, rank)
    return model


# ------------------------------------------------------------------------------------------ training callback
class DyLoraSampler(Callback):
    """Draws each step's rank and sets it on every layer of one DyLoRA adapter.

    The rank of the coming step is drawn at the start of training and after each optimizer step; its state (the
    generator and that rank) makes a resumed run draw the same ranks. Around each optimizer step it keeps the
    components the step does not train as they were (a copy of the factors lives during the step; a loop that
    fires no ``before_optimizer_step`` skips this). ``metrics()``: the mean rank drawn this epoch.
    """

    name = "dylora"

    def __init__(self, model: nn.Module, cfg: DyLoraConfig, seed: int | None = None) -> None:
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.initial_seed())
        self.current: int | None = None
        self._sum = self._count = 0
        self._modules: list[DyLoraAdapter] | None = None

    def _set(self, rank: int | None) -> None:
        if self._modules is None:  # found once per session (walking a large model every step costs)
            self._modules = [ad for _, ad in _dylora_modules(self.model, self.cfg.name)[1]]
        for ad in self._modules:
            ad.sampled_rank = rank

    def _draw(self) -> None:
        self.current = sample_rank(self.cfg.min_rank, self.cfg.rank, self.generator)
        self._set(self.current)

    def on_session_start(self, state: TrainState) -> None:
        self._modules = None
        if self.current is None:
            self._draw()
        else:
            self._set(self.current)

    def on_epoch_start(self, state: TrainState) -> None:
        self._sum = self._count = 0

    def before_optimizer_step(self, state: TrainState) -> None:
        for ad in self._modules or []:
            ad.hold_()

    def after_optimizer_step(self, state: TrainState) -> None:
        for ad in self._modules or []:
            ad.restore_untrained_()
        self._sum += self.current or 0
        self._count += 1
        self._draw()

    def on_fit_end(self, state: TrainState) -> None:
        self._set(None)

    def metrics(self) -> dict[str, float]:
        return {"dylora_mean_rank": self._sum / self._count} if self._count else {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "current": -1 if self.current is None else self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gen, current = state.get("generator"), state.get("current")
        if not isinstance(gen, Tensor) or not isinstance(current, int):
            raise CheckpointError(f"the DyLoRA sampler state holds {sorted(state)}, not a generator and a rank; the "
                                  "checkpoint was written by another method")
        if current > self.cfg.rank:
            raise CheckpointError(f"the checkpoint's DyLoRA rank {current} is above this adapter's rank "
                                  f"{self.cfg.rank}; resume with the recipe that wrote it")
        self.generator.set_state(gen.to(torch.uint8).cpu())
        self.current = None if current < 0 else current
        if self.current is not None:
            self._set(self.current)


def dylora_callbacks(model: nn.Module, cfg: AdapterConfig, total_steps: int, steps_per_epoch: int) -> list[Callback]:
    """The sampler of a DyLoRA adapter (the ``callbacks`` entry of its registration)."""
    if not isinstance(cfg, DyLoraConfig):
        raise ConfigError(f"dylora_callbacks needs a DyLoraConfig, got {type(cfg).__name__}")
    return [DyLoraSampler(model, cfg, cfg.seed)]


ADAPTERS.add("dylora", DyLoraAdapter, config=DyLoraConfig, callbacks=dylora_callbacks,
             summary="DyLoRA (Valipour et al. 2023): LoRA trained at a rank sampled each step, usable at any rank")
