"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

Each model ``i`` gets a diagonal Fisher ``F_i`` (one non-negative number per parameter entry: how much the
model's predictions depend on it); the merge is, entry by entry,
``theta = sum_i w_i F_i theta_i / sum_i w_i F_i``. ``eps`` is added to every Fisher, so an entry no model's
Fisher weighs falls back to the weighted average. Keys without a Fisher (buffers) are averaged as ``linear`` does
(integer buffers copied).

:func:`fisher_diagonal` estimates ``F = E_x E_y [(d/dtheta log p(y | x))^2]`` over the examples of a dataset, with
per-example gradients (``torch.func.vmap``; ``per_example="loop"`` for models vmap cannot run). ``label`` chooses
``y``: ``"sample"`` (default, the paper's Fisher: ``y`` drawn from the model's own predictive distribution, seeded),
``"argmax"`` (the model's predicted label) or ``"true"`` (the dataset's label: the "empirical Fisher").
:func:`fisher_merge_tensor` is the pure per-tensor maths (so a streaming driver can apply it key by key).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.merging.base import check_inputs
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.data_aware import (
    IGNORE_INDEX,
    DataAwareMerger,
    ModelBatch,
    iter_batches,
    logits_of,
    module_device,
)
from edgetune.merging.linear import LinearConfig, LinearMerger

__all__ = ["FisherConfig", "FisherMerger", "fisher_diagonal", "fisher_merge", "fisher_merge_tensor",
           "normalize_fisher"]

log = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]
Label = Literal["sample", "argmax", "true"]
_USE = "merging.fisher.fisher_diagonal(model, data, ...) per model, then merging.fisher.fisher_merge(...)"


class FisherConfig(MergeConfig):
    """Fisher merging (Matena & Raffel 2022).

    label: the label the Fisher's log-likelihood is taken at: ``sample`` (drawn from the model's prediction, the
        paper's Fisher), ``argmax`` (the predicted label) or ``true`` (the data's label, the empirical Fisher).
    n_batches: batches of each model's data the Fisher is estimated on (None: all). batch_size: examples per batch
        when the data is a dataset or a tensor (per-example gradients take ``batch_size`` x the parameters' memory).
    eps: added to every Fisher entry (entries no model weighs fall back to the weighted average).
    normalize: divide each model's Fisher by the mean of all its entries first, so a model whose gradients are
        larger overall does not outweigh the others.
    """

    method: Literal["fisher"] = "fisher"
    label: Label = "sample"
    n_batches: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    eps: float = Field(default=1e-8, gt=0)
    normalize: bool = False


def _labels(logits: Tensor, batch: ModelBatch, label: Label, gen: torch.Generator) -> Tensor:
    """The labels ``(...)`` the log-likelihood is differentiated at, for logits ``(..., C)``."""
    if label == "true":
        if batch.target is None:
            raise ConfigError("label='true' needs labelled data ([x, y] batches or a 'labels' column); use "
                              "label='sample' or 'argmax' for unlabelled inputs")
        return batch.target.long()
    if label == "argmax":
        y = logits.argmax(-1)
    else:
        probs = F.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])  # (N, C)
        y = torch.multinomial(probs, 1, generator=gen).view(logits.shape[:-1])
    if batch.target is not None and tuple(batch.target.shape) == tuple(y.shape):
        y = y.masked_fill(batch.target == IGNORE_INDEX, IGNORE_INDEX)  # padding stays out
    return y


def _loglik_fn(model: nn.Module) -> Any:
    """``f(params, buffers, args, kwargs, y)``: ``sum log p(y | x)`` of ONE example (inputs without batch axis)."""

    def f(params: dict[str, Tensor], buffers: dict[str, Tensor], args: tuple[Tensor, ...], kwargs: dict[str, Tensor],
          y: Tensor) -> Tensor:
        args = tuple(a.unsqueeze(0) for a in args)
        kwargs = {k: v.unsqueeze(0) for k, v in kwargs.items()}
        logits = logits_of(functional_call(model, (params, buffers), args, kwargs))[0]  # (..., C)
        logp = F.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (...)
        return torch.where(y != IGNORE_INDEX, picked, torch.zeros_like(picked)).sum()

    return f


def _square_grads_vmap(f: Any, params: dict[str, Tensor], buffers: dict[str, Tensor], b: ModelBatch,
                       y: Tensor) -> dict[str, Tensor]:
    """``sum_b g_b^2`` over the batch, per parameter (per-example gradients by vmap(grad))."""
    per = vmap(grad(f), in_dims=(None, None, 0, 0, 0))(params, buffers, b.args, b.kwargs, y)  # k -> (B, *S)
    return {k: g.float().pow(2).sum(0) for k, g in per.items()}


def _square_grads_loop(f: Any, params: dict[str, Tensor], buffers: dict[str, Tensor], b: ModelBatch,
                       y: Tensor) -> dict[str, Tensor]:
    """``sum_b g_b^2`` with one backward pass per example (for models vmap cannot run)."""
    out = {k: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for k, p in params.items()}
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    for i in range(b.size):
        ll = f(leaves, buffers, tuple(a[i] for a in b.args), {k: v[i] for k, v in b.kwargs.items()}, y[i])
        gs = torch.autograd.grad(ll, list(leaves.values()), allow_unused=True)
        for k, g in zip(leaves, gs, strict=True):
            if g is not None:
                out[k] += g.float().pow(2)
    return out


def fisher_diagonal(model: nn.Module, data: Any, n_batches: int | None = None, *, label: Label = "sample",
                    batch_size: int = 32, seed: int = 0,
                    per_example: Literal["vmap", "loop"] = "vmap") -> dict[str, Tensor]:
    """Diagonal Fisher of ``model``'s parameters on ``data`` (Matena & Raffel 2022).

    ``F[k] = mean over examples of (d/dparam_k sum_t log p(y_t | x))^2``, shape of parameter ``k``, float32 (on the
    model's device), keyed like the state dict. An example is one row of the batch (a sequence counts once, its
    positions' log-likelihoods summed). The model runs in eval mode (restored after) and is not modified.
    ``label``: see :class:`FisherConfig`; ``seed`` seeds the sampled labels.
    """
    if label not in ("sample", "argmax", "true"):
        raise ConfigError(f"label = {label!r} must be 'sample', 'argmax' or 'true'")
    if per_example not in ("vmap", "loop"):
        raise ConfigError(f"per_example = {per_example!r} must be 'vmap' or 'loop'")
    params = {k: p.detach() for k, p in model.named_parameters()}
    if not params:
        raise ConfigError(f"{type(model).__name__} has no parameters to compute a Fisher for")
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    device = module_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    f = _loglik_fn(model)
    sums = {k: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for k, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for b in iter_batches(data, n_batches=n_batches, batch_size=batch_size, device=device, what="Fisher data"):
            with torch.no_grad():
                y = _labels(logits_of(functional_call(model, (params, buffers), b.args, b.kwargs)), b, label, gen)
            step = _square_grads_vmap if per_example == "vmap" else _square_grads_loop
            for k, sq in step(f, params, buffers, b, y).items():
                sums[k] += sq
            count += b.size
    finally:
        model.train(was_training)
    log.info("Fisher (%s labels) of %d parameter tensors over %d examples", label, len(sums), count)
    return {k: v / count for k, v in sums.items()}


def normalize_fisher(fisher: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``fisher`` divided by the mean of all its entries (mean 1); all-zero Fishers are returned unchanged."""
    total = sum(float(v.double().sum()) for v in fisher.values())
    n = sum(v.numel() for v in fisher.values())
    if total <= 0 or n == 0:
        return dict(fisher)
    return {k: v * (n / total) for k, v in fisher.items()}


def fisher_merge_tensor(xs: Sequence[Tensor], fishers: Sequence[Tensor], weights: Sequence[float],
                        eps: float = 1e-8) -> Tensor:
    """``sum_i w_i (F_i + eps) x_i / sum_i w_i (F_i + eps)`` for N tensors and Fishers of one shape ``S`` -> ``S``."""
    num = torch.zeros_like(xs[0])
    den = torch.zeros_like(xs[0])
    for x, f, w in zip(xs, fishers, weights, strict=True):
        wf = (f.to(x) + eps) * w
        num += wf * x
        den += wf
    return num / den


def _check_fishers(models: Sequence[StateDict], fishers: Sequence[Mapping[str, Tensor]]) -> list[str]:
    if isinstance(fishers, Mapping) or not isinstance(fishers, Sequence) or len(fishers) != len(models):
        got = len(fishers) if isinstance(fishers, Sequence) and not isinstance(fishers, Mapping) else "a mapping"
        raise ConfigError(f"give one Fisher (a dict like fisher_diagonal returns) per model: {len(models)} models, "
                          f"got {got}")
    keys = list(fishers[0])
    if not keys:
        raise ConfigError("the Fishers are empty; compute them with fisher_diagonal(model, data)")
    for i, fi in enumerate(fishers):
        if set(fi) != set(keys):
            missing = [k for k in keys if k not in fi] or [k for k in fi if k not in keys]
            raise ConfigError(f"the Fisher of model {i} has other keys than model 0's (e.g. {missing[0]!r}); compute "
                              "every Fisher on the same architecture")
    for k in keys:
        if k not in models[0]:
            raise ConfigError(f"the Fishers hold {k!r}, which the models do not; compute them on these models")
        for i, fi in enumerate(fishers):
            if tuple(fi[k].shape) != tuple(models[0][k].shape):
                raise ConfigError(f"the Fisher of {k!r} in model {i} is {tuple(fi[k].shape)} but the tensor is "
                                  f"{tuple(models[0][k].shape)}")
            if (fi[k] < 0).any():
                raise ConfigError(f"the Fisher of {k!r} in model {i} has negative entries; a Fisher is a mean of squares")
    return keys


def fisher_merge(state_dicts: Sequence[StateDict], fishers: Sequence[Mapping[str, Tensor]],
                 weights: Sequence[float] | None = None, eps: float = 1e-8) -> dict[str, Tensor]:
    """Fisher-weighted average of ``state_dicts`` (Matena & Raffel 2022), key by key.

    ``fishers[i]``: model ``i``'s diagonal Fisher (:func:`fisher_diagonal`). Keys with a Fisher:
    :func:`fisher_merge_tensor`; the others (buffers) the ``weights``-weighted average, integer buffers copied.
    Weights (default 1 each) must be non-negative, not all 0. Output dtypes: model 0's.
    """
    cfg = validate(FisherConfig, {"weights": None if weights is None else list(weights), "eps": eps}, "fisher")
    check_inputs(FisherMerger(cfg), state_dicts, None)
    w = [1.0] * len(state_dicts) if weights is None else [float(x) for x in weights]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"weights {w} must be non-negative and not all 0 for a Fisher-weighted average")
    fisher_keys = set(_check_fishers(state_dicts, fishers))
    linear = LinearMerger(LinearConfig(weights=w))
    out: dict[str, Tensor] = {}
    for k, first in state_dicts[0].items():
        tensors = [sd[k] for sd in state_dicts]
        if k in fisher_keys and first.is_floating_point():
            compute = torch.promote_types(first.dtype, torch.float32)
            merged = fisher_merge_tensor([t.to(compute) for t in tensors], [f[k] for f in fishers], w, eps)
            out[k] = merged.to(first.dtype)
        else:
            out[k] = linear.merge_tensor(k, tensors, None)
    log.info("Fisher-merged %d models (%d tensors weighted by Fisher)", len(state_dicts), len(fisher_keys))
    return out


class FisherMerger(DataAwareMerger):
    """Fisher merging: data-aware, so the per-tensor path refuses (see :func:`fisher_merge`)."""

    needs_base = False
    use = _USE
    cfg: FisherConfig


MERGERS.add("fisher", FisherMerger, config=FisherConfig, data_aware=True,
            summary="Fisher merging (Matena & Raffel 2022): per-entry average weighted by each model's diagonal Fisher")
