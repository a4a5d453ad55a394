"""AdaMerging (Yang, Wang, Shen, Liu, Guo, Wang, Tao 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning").

Task arithmetic with learned coefficients: ``theta = theta_0 + sum_i lambda_i tau_i`` with task vectors
``tau_i = theta_i - theta_0``, where the lambdas minimise the mean prediction entropy of the merged model on
unlabelled inputs (entropy as a surrogate of the test loss). ``granularity``: ``task`` learns one lambda per model;
``layer`` one per model per state-dict tensor. As in the paper: lambdas start at 0.3, Adam (lr 1e-3), clamped to
[0, 1] after each step, batches of 16 unlabelled inputs.

The merged parameters are built differentiably in the lambdas and the module is run on them with
``torch.func.functional_call`` (the module is not modified). :func:`learn_coefficients` is the engine, with any
objective over the merged model's logits; the safety-preserving merge (``safety.py``) reuses it.
Deterministic for a seed (the order batches are visited in).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.merging.base import Merger, check_inputs
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.data_aware import (
    DataAwareMerger,
    ModelBatch,
    check_module_keys,
    iter_batches,
    logits_of,
    mean_entropy,
    module_device,
)

__all__ = ["AdaMergingConfig", "AdaMergingMerger", "CoefficientResult", "adamerging", "batch_cycle", "config_of",
           "learn_coefficients", "merged_params", "prediction_entropy", "task_vector_stack"]

log = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]
Forward = Callable[[ModelBatch], Tensor]  # a batch -> the merged model's logits (..., C)
Objective = Callable[[Forward], Tensor]  # one step's loss, from the merged model's forward
_USE = "merging.adamerging.adamerging(module, base, state_dicts, data, cfg)"


class AdaMergingConfig(MergeConfig):
    """AdaMerging (Yang et al. 2024).

    granularity: ``task`` (one lambda per model) or ``layer`` (one per model per state-dict tensor).
    init: every lambda's start (the paper: 0.3). steps / lr: Adam steps and learning rate (the paper: 500, 1e-3).
    clamp: ``[low, high]`` each lambda is clamped to after every step (the paper: [0, 1]); None: unclamped.
    n_batches: batches of the data used (None: all), visited in a seeded order. batch_size: examples per batch
        when the data is a dataset or a tensor (the paper: 16).
    """

    method: Literal["adamerging"] = "adamerging"
    granularity: Literal["task", "layer"] = "task"
    init: float = 0.3
    steps: int = Field(default=500, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    clamp: tuple[float, float] | None = (0.0, 1.0)
    n_batches: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _clamp(self) -> AdaMergingConfig:
        if self.clamp is not None and not self.clamp[0] <= self.clamp[1]:
            raise ValueError(f"clamp {list(self.clamp)} must be [low, high] with low <= high")
        return self


@dataclass
class CoefficientResult:
    """Learned merge coefficients and the merged model.

    lambdas: ``(G, N)``: one row per group (``task``: G = 1, group ``"*"``; ``layer``: one per state-dict tensor),
        one column per model. groups: the group names (state-dict keys in ``layer`` mode). merged: the merged state
        dict (model 0's keys and dtypes). losses: the objective at each step (before that step's update).
    """

    lambdas: Tensor
    groups: list[str]
    merged: dict[str, Tensor]
    losses: list[float]


def task_vector_stack(base: StateDict, state_dicts: Sequence[StateDict],
                      device: torch.device | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The floating tensors of ``base`` ``S`` and their task vectors stacked ``(N, *S)`` (float32 or wider)."""
    base_f: dict[str, Tensor] = {}
    taus: dict[str, Tensor] = {}
    for k, b in base.items():
        if not b.is_floating_point():
            continue
        compute = torch.promote_types(b.dtype, torch.float32)
        b0 = b.detach().to(device=device, dtype=compute)
        base_f[k] = b0
        taus[k] = torch.stack([sd[k].detach().to(device=device, dtype=compute) - b0 for sd in state_dicts])
    return base_f, taus


def merged_params(base_f: Mapping[str, Tensor], taus: Mapping[str, Tensor], lambdas: Tensor,
                  group_of: Mapping[str, int]) -> dict[str, Tensor]:
    """``theta_0[k] + sum_i lambdas[group_of[k], i] * tau_i[k]`` per key (differentiable in ``lambdas`` ``(G, N)``)."""
    return {k: b + torch.tensordot(lambdas[group_of[k]].to(b.dtype), taus[k], dims=1) for k, b in base_f.items()}


def batch_cycle(batches: Sequence[ModelBatch], seed: int) -> Iterator[ModelBatch]:
    """Endless visits of ``batches``, in a fresh seeded order each pass."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[i]


def config_of(cfg: Any, cls: type[MergeConfig]) -> Any:
    """``cfg`` as a ``cls`` config: None gives the defaults, a mapping is validated (its `method` may be left out)."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, Mapping):
        return validate(cls, {"method": cls.model_fields["method"].default, **cfg}, cls.model_fields["method"].default)
    raise ConfigError(f"the config must be a {cls.__name__} or a mapping, got {type(cfg).__name__}")


def learn_coefficients(module: nn.Module, base: StateDict | None, state_dicts: Sequence[StateDict],
                       objective: Objective, cfg: Any, merger: Merger) -> CoefficientResult:
    """Learn lambdas ``(G, N)`` minimising ``objective(forward)`` (Adam, clamped), where ``forward(batch)`` runs
    ``module`` on ``theta_0 + sum_i lambda_i tau_i``. ``cfg``: the AdaMerging-style options; ``merger``: checks
    the state dicts (keys, shapes, base). The module is run in eval mode and not modified.
    """
    if base is None:
        raise ConfigError(f"method {cfg.method!r} needs the base model the models were fine-tuned from: pass base=")
    check_inputs(merger, state_dicts, base)
    check_module_keys(module, base)
    device = module_device(module)
    base_f, taus = task_vector_stack(base, state_dicts, device)
    groups = ["*"] if cfg.granularity == "task" else list(base_f)
    group_of = {k: (0 if cfg.granularity == "task" else i) for i, k in enumerate(base_f)}
    fixed = {k: v.to(device) for k, v in base.items() if k not in base_f}  # integer buffers: the base's
    lam = torch.full((len(groups), len(state_dicts)), float(cfg.init), device=device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=cfg.lr)
    losses: list[float] = []
    was_training = module.training
    module.eval()
    try:
        for _ in range(cfg.steps):
            params = {**merged_params(base_f, taus, lam, group_of), **fixed}

            def forward(b: ModelBatch, params: dict[str, Tensor] = params) -> Tensor:
                return logits_of(functional_call(module, params, b.args, b.kwargs))

            loss = objective(forward)
            value = loss.detach().item()
            if not torch.isfinite(loss.detach()):
                raise ConfigError(f"the merge objective became {value} at step {len(losses)}; lower lr "
                                  f"({cfg.lr}) or keep clamp on")
            opt.zero_grad()
            loss.backward()
            opt.step()
            if cfg.clamp is not None:
                with torch.no_grad():
                    lam.clamp_(cfg.clamp[0], cfg.clamp[1])
            losses.append(value)
    finally:
        module.train(was_training)
    final = lam.detach()
    with torch.no_grad():
        values = {**merged_params(base_f, taus, final, group_of), **fixed}
    merged = {k: values[k].to(dtype=t.dtype, device=t.device).clone() for k, t in state_dicts[0].items()}
    if losses:
        log.info("%s: objective %.4f -> %.4f in %d steps; lambdas mean %s", cfg.method, losses[0], losses[-1],
                 len(losses), [round(x, 3) for x in final.mean(0).tolist()])
        _warn_if_collapsed(cfg, final, losses)
    return CoefficientResult(final.cpu(), groups, merged, losses)


def _warn_if_collapsed(cfg: Any, final: Tensor, losses: list[float]) -> None:
    """One warning when every lambda ended within 0.05 of the lower clamp: the merge is (almost) the base model."""
    if cfg.clamp is None or final.numel() == 0 or float(final.max()) > cfg.clamp[0] + 0.05:
        return
    log.warning(
        "%s drove every lambda to %.2f or less (objective %.4f -> %.4f): the merged model is (almost) the base. With "
        "the entropy objective this means the base is already as confident as the fine-tunes on this data, so "
        "entropy is no surrogate of their loss here (it is where each fine-tune is more confident than the base on "
        "its task). Check the entropy of the base and of each model on its task (prediction_entropy), or use "
        "labelled data: the safety merge with domain_loss='cross_entropy', or fisher / regmean",
        cfg.method, cfg.clamp[0] + 0.05, losses[0], losses[-1])


@torch.no_grad()
def prediction_entropy(module: nn.Module, state_dict: StateDict, data: Any, *, batch_size: int = 64,
                       n_batches: int | None = None) -> float:
    """Mean prediction entropy of ``module`` with ``state_dict`` over the examples of ``data`` (eval mode)."""
    was_training = module.training
    module.eval()
    total, n = 0.0, 0
    try:
        for b in iter_batches(data, n_batches=n_batches, batch_size=batch_size, device=module_device(module)):
            logits = logits_of(functional_call(module, dict(state_dict), b.args, b.kwargs))
            total += float(mean_entropy(logits)) * b.size
            n += b.size
    finally:
        module.train(was_training)
    return total / n


def adamerging(module: nn.Module, base: StateDict | None, state_dicts: Sequence[StateDict], data: Any,
               cfg: AdaMergingConfig | Mapping[str, Any] | None = None) -> CoefficientResult:
    """AdaMerging (Yang et al. 2024): lambdas minimising the merged model's mean prediction entropy on ``data``.

    ``module``: the architecture (not modified); ``base``: theta_0's state dict; ``state_dicts``: the fine-tunes;
    ``data``: unlabelled inputs (labels, if any, are ignored). Returns the lambdas and the merged state dict.
    """
    cfg = config_of(cfg, AdaMergingConfig)
    batches = list(iter_batches(data, n_batches=cfg.n_batches, batch_size=cfg.batch_size,
                                device=module_device(module), what="AdaMerging data"))
    stream = batch_cycle(batches, cfg.seed)

    def objective(forward: Forward) -> Tensor:
        return mean_entropy(forward(next(stream)))

    return learn_coefficients(module, base, state_dicts, objective, cfg, AdaMergingMerger(cfg))


class AdaMergingMerger(DataAwareMerger):
    """AdaMerging: data-aware, so the per-tensor path refuses (see :func:`adamerging`)."""

    takes_weights = False
    use = _USE
    cfg: AdaMergingConfig


MERGERS.add("adamerging", AdaMergingMerger, config=AdaMergingConfig, data_aware=True,
            summary="AdaMerging (Yang et al. 2024): task arithmetic with task- or layer-wise lambdas learned by "
                    "minimising the prediction entropy on unlabelled data")
