"""Safety-preserving merging (Hammoud, Michieli, Pizzati, Torr, Bibi, Ghanem, Ozay 2024, "Model Merging and
Safety Alignment: One Bad Model Spoils the Bunch").

Merging propagates misalignment: one fine-tune that broke the aligned behaviour carries the damage into a task
arithmetic or TIES merge. The paper's fix treats alignment as a skill the merged model must keep: a data-aware
merge whose coefficients are optimised on domain data *and* on alignment data. Here, as in AdaMerging
(``adamerging.py``, same engine and options), lambdas of ``theta_0 + sum_i lambda_i tau_i`` (task- or layer-wise)
minimise::

    domain loss (entropy of the predictions, or cross-entropy where the domain data has labels)
    + keep_weight * cross-entropy of the merged model on the must-keep set

The must-keep set holds inputs with the labels the aligned model gives them: pass it labelled, or build it with
:func:`must_keep_from_reference` (a reference model's predictions, e.g. the aligned base's).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from edgetune.core.errors import ConfigError
from edgetune.data.batches import TARGET_KEY
from edgetune.merging.adamerging import CoefficientResult, Forward, batch_cycle, config_of, learn_coefficients
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.data_aware import (
    DataAwareMerger,
    cross_entropy,
    iter_batches,
    logits_of,
    mean_entropy,
    module_device,
)

__all__ = ["SafetyConfig", "SafetyMerger", "must_keep_from_reference", "safety_merge"]

log = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]
_USE = "merging.safety.safety_merge(module, base, state_dicts, data, must_keep, cfg)"


class SafetyConfig(MergeConfig):
    """Safety-preserving merging (Hammoud et al. 2024): AdaMerging's options, plus

    keep_weight: the factor on the must-keep cross-entropy. domain_loss: ``entropy`` (unlabelled domain data),
    ``cross_entropy`` (labelled), or ``auto`` (cross-entropy on batches with labels, entropy on the others).
    granularity / init / steps / lr / clamp / n_batches / batch_size: as :class:`AdaMergingConfig` (n_batches and
    batch_size apply to the domain and the must-keep data alike).
    """

    method: Literal["safety"] = "safety"
    keep_weight: float = Field(default=1.0, ge=0)
    domain_loss: Literal["auto", "entropy", "cross_entropy"] = "auto"
    granularity: Literal["task", "layer"] = "task"
    init: float = 0.3
    steps: int = Field(default=500, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    clamp: tuple[float, float] | None = (0.0, 1.0)
    n_batches: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _clamp(self) -> SafetyConfig:
        if self.clamp is not None and not self.clamp[0] <= self.clamp[1]:
            raise ValueError(f"clamp {list(self.clamp)} must be [low, high] with low <= high")
        return self


@torch.no_grad()
def must_keep_from_reference(model: nn.Module, inputs: Any, *, state_dict: StateDict | None = None,
                             batch_size: int = 64, n_batches: int | None = None) -> list[Any]:
    """``inputs`` labelled with ``model``'s own predictions (argmax), as a list of batches for :func:`safety_merge`.

    ``inputs``: any data (labels, if present, are replaced). ``state_dict``: run ``model`` with these weights
    instead of its own (e.g. the aligned base's). Batches come back as ``[*inputs, labels]`` lists, or dicts with
    ``labels``; labels ``(...)`` have the logits' shape without the class axis. Eval mode, restored after.
    """
    was_training = model.training
    model.eval()
    out: list[Any] = []
    try:
        for b in iter_batches(inputs, n_batches=n_batches, batch_size=batch_size, device=module_device(model),
                              what="must-keep inputs"):
            raw = (model(*b.args, **b.kwargs) if state_dict is None
                   else functional_call(model, dict(state_dict), b.args, b.kwargs))
            y = logits_of(raw).argmax(-1)
            out.append({**b.kwargs, TARGET_KEY: y} if b.kwargs else [*b.args, y])
    finally:
        model.train(was_training)
    return out


def safety_merge(module: nn.Module, base: StateDict | None, state_dicts: Sequence[StateDict], data: Any,
                 must_keep: Any, cfg: SafetyConfig | Mapping[str, Any] | None = None) -> CoefficientResult:
    """Safety-preserving merge (Hammoud et al. 2024): lambdas of task arithmetic learned on ``data`` (domain) while
    the merged model keeps ``must_keep``'s labels.

    ``must_keep``: labelled data (e.g. :func:`must_keep_from_reference` of the aligned model on alignment inputs).
    ``module`` is the architecture (not modified); ``base``: theta_0's state dict. Returns lambdas and merged dict.
    """
    cfg = config_of(cfg, SafetyConfig)
    device = module_device(module)
    if must_keep is None:
        raise ConfigError("the safety merge needs a must-keep set: labelled inputs whose predictions the merged model "
                          "must keep (build one with must_keep_from_reference(aligned_model, inputs))")
    domain = list(iter_batches(data, n_batches=cfg.n_batches, batch_size=cfg.batch_size, device=device,
                               what="domain data"))
    keep = list(iter_batches(must_keep, n_batches=cfg.n_batches, batch_size=cfg.batch_size, device=device,
                             what="must-keep data"))
    if any(b.target is None for b in keep):
        raise ConfigError("the must-keep data has a batch without labels; give the labels the aligned model should "
                          "keep, or build the set with must_keep_from_reference(aligned_model, inputs)")
    if cfg.domain_loss == "cross_entropy" and any(b.target is None for b in domain):
        raise ConfigError("domain_loss='cross_entropy' needs labelled domain data; use 'entropy' or 'auto'")
    domain_stream = batch_cycle(domain, cfg.seed)
    keep_stream = batch_cycle(keep, cfg.seed + 1)

    def objective(forward: Forward) -> Tensor:
        d = next(domain_stream)
        logits = forward(d)
        use_ce = d.target is not None and cfg.domain_loss != "entropy"
        loss = cross_entropy(logits, d.target) if use_ce else mean_entropy(logits)
        if cfg.keep_weight > 0:
            k = next(keep_stream)
            loss = loss + cfg.keep_weight * cross_entropy(forward(k), k.target)
        return loss

    return learn_coefficients(module, base, state_dicts, objective, cfg, SafetyMerger(cfg))


class SafetyMerger(DataAwareMerger):
    """Safety-preserving merge: data-aware, so the per-tensor path refuses (see :func:`safety_merge`)."""

    takes_weights = False
    use = _USE
    cfg: SafetyConfig


MERGERS.add("safety", SafetyMerger, config=SafetyConfig, data_aware=True,
            summary="safety-preserving merging (Hammoud et al. 2024): learned task-arithmetic lambdas on domain data "
                    "plus a must-keep cross-entropy on alignment data")
