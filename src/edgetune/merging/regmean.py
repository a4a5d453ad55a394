"""RegMean (Jin, Ren, Preotiuc-Pietro, Cheng 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models").

For each linear layer ``y = x W^T`` (``W``: ``(out, in)``), the merged ``W`` minimises
``sum_i w_i || X_i W^T - X_i W_i^T ||^2`` over each model's own layer inputs ``X_i``, in closed form:
``W^T = (sum_i w_i G_i)^-1 sum_i w_i G_i W_i^T`` with the input Gram matrices ``G_i = X_i^T X_i / n_i``
``(in, in)``. ``alpha`` scales the Grams' off-diagonal entries (``G~ = alpha G + (1 - alpha) diag(G)``; the paper
finds alpha ~ 0.9 stabler than 1; 0 gives a per-input-column weighted average). Every other tensor (biases,
norms, embeddings, convolutions) is averaged as ``linear`` does.

- :func:`gram_matrices`: ``X^T X`` and the row count of every ``nn.Linear``'s input on some data (forward
  pre-hooks; inputs ``(..., in)`` are flattened to rows), keyed by the layer's weight key (``"fc.weight"``).
- :func:`regmean_weight`: the pure per-layer solve (float64 ``torch.linalg.solve``); a singular system gets a tiny
  ridge pulling the unconstrained directions to the weighted average.
- :func:`regmean_merge`: over state dicts.

Each model's Gram is its mean over its rows (``sum / count``), so each model counts once whatever the amount of
data it was measured on (with equal counts this is exactly the paper's sum).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor, nn

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.merging.base import check_inputs
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.data_aware import DataAwareMerger, iter_batches, module_device
from edgetune.merging.linear import LinearConfig, LinearMerger

__all__ = ["Gram", "RegMeanConfig", "RegMeanMerger", "check_grams_cover", "gram_matrices", "linear_weight_keys",
           "regmean_merge", "regmean_weight"]

log = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]
_USE = "merging.regmean.gram_matrices(model, data) per model, then merging.regmean.regmean_merge(...)"
_SINGULAR = 1e-12  # a pivot below this fraction of the largest diagonal entry counts as singular
_RIDGE = 1e-8  # the ridge added then, relative to the mean diagonal entry


class RegMeanConfig(MergeConfig):
    """RegMean (Jin et al. 2023).

    alpha: factor on the Gram matrices' off-diagonal entries, in [0, 1] (the paper: 0.9 is stabler than 1).
    n_batches: batches of each model's data its Grams are measured on (None: all). batch_size: examples per batch
        when the data is a dataset or a tensor.
    """

    method: Literal["regmean"] = "regmean"
    alpha: float = Field(default=0.9, ge=0, le=1)
    n_batches: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)


class Gram(NamedTuple):
    """``sum`` ``(in, in)`` float64: ``X^T X`` over ``count`` input rows of one linear layer."""

    sum: Tensor
    count: int

    @property
    def mean(self) -> Tensor:
        """``X^T X / count`` (zeros when the layer saw no row)."""
        return self.sum / max(self.count, 1)


def linear_weight_keys(module: nn.Module) -> list[str]:
    """The state-dict keys of the weights of every ``nn.Linear`` in ``module`` (``"fc.weight"``)."""
    return [f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def gram_matrices(model: nn.Module, data: Any, n_batches: int | None = None, *,
                  batch_size: int = 32) -> dict[str, Gram]:
    """Input Gram matrices of every ``nn.Linear`` of ``model`` on ``data``, keyed by the layer's weight key.

    A layer's input ``(..., in)`` is flattened to rows ``(n, in)``; ``G = sum X^T X`` (float64, on the model's
    device) and ``count`` = rows. A layer the data never reaches keeps count 0 (the merge then averages it). The model
    runs in eval mode (restored after) and is not modified.
    """
    names = {name: f"{name}.weight" if name else "weight" for name, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    if not names:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer; RegMean merges linear layers only")
    mods = dict(model.named_modules())
    sums = {k: torch.zeros(mods[n].in_features, mods[n].in_features, dtype=torch.float64,
                           device=mods[n].weight.device) for n, k in names.items()}
    counts = dict.fromkeys(names.values(), 0)

    def hook(key: str) -> Any:
        def pre(_: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            rows = x.reshape(-1, x.shape[-1]).double()  # (n, in)
            sums[key] += rows.T @ rows
            counts[key] += rows.shape[0]
        return pre

    handles = [mods[n].register_forward_pre_hook(hook(k)) for n, k in names.items()]
    was_training = model.training
    model.eval()
    try:
        for b in iter_batches(data, n_batches=n_batches, batch_size=batch_size, device=module_device(model),
                              what="RegMean data"):
            model(*b.args, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unseen = [k for k, c in counts.items() if c == 0]
    if unseen:
        log.warning("RegMean: the data never reached %d linear layer(s) (%s); they will be averaged", len(unseen),
                    ", ".join(unseen[:3]))
    return {k: Gram(sums[k], counts[k]) for k in names.values()}


def _scaled(g: Tensor, alpha: float) -> Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: off-diagonal entries times alpha, diagonal kept."""
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def regmean_weight(ws: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 0.9,
                   weights: Sequence[float] | None = None) -> Tensor:
    """Merged weight ``(out, in)`` of N linear weights ``(out, in)`` with their input Grams ``(in, in)``.

    ``W^T = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T``, solved in float64; returned in ``ws[0]``'s dtype. If the
    summed Gram is singular, ``ridge * I`` is added to it and ``ridge * W_avg^T`` to the right side, so directions
    no input reaches take the weighted average ``W_avg``.
    """
    w = [1.0] * len(ws) if weights is None else list(weights)
    a = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(ws[0].shape[1], ws[0].shape[0], dtype=torch.float64, device=ws[0].device)  # (in, out)
    avg = torch.zeros_like(ws[0], dtype=torch.float64)  # (out, in)
    for wi, g, c in zip(ws, grams, w, strict=True):
        gt = _scaled(g.to(torch.float64), alpha)
        a += c * gt
        rhs += c * (gt @ wi.to(torch.float64).T)  # (in, in) @ (in, out)
        avg += c * wi.to(torch.float64)
    avg /= sum(w)
    diag = torch.diagonal(a)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 or float(torch.diagonal(chol).min()) ** 2 <= _SINGULAR * float(diag.max().clamp_min(0)):
        scale = float(diag.mean())
        ridge = _RIDGE * scale if scale > 0 else 1.0
        log.debug("RegMean: singular Gram (in=%d); ridge %.3g toward the average", a.shape[0], ridge)
        a = a + ridge * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        rhs = rhs + ridge * avg.T
    return torch.linalg.solve(a, rhs).T.to(ws[0].dtype)  # (out, in)


def _gram_tensor(g: Gram | Tensor) -> Tensor:
    return g.mean if isinstance(g, Gram) else g


def check_grams_cover(module: nn.Module, grams: Sequence[Mapping[str, Gram | Tensor]],
                      skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Every ``nn.Linear`` of ``module`` (but ``skip``) has a Gram in every model's ``grams``; else
    :class:`ConfigError`."""
    for i, gi in enumerate(grams):
        missing = [k for k in linear_weight_keys(module) if k not in gi and k not in skip]
        if missing:
            raise ConfigError(f"no Gram for the linear layer {missing[0]!r} in model {i} ({len(missing)} missing); "
                              "compute them with gram_matrices(model, data) on each model")


def _check_grams(models: Sequence[StateDict], grams: Sequence[Mapping[str, Gram | Tensor]]) -> list[str]:
    if isinstance(grams, Mapping) or not isinstance(grams, Sequence) or len(grams) != len(models):
        got = len(grams) if isinstance(grams, Sequence) and not isinstance(grams, Mapping) else "a mapping"
        raise ConfigError(f"give one dict of Grams (as gram_matrices returns) per model: {len(models)} models, got {got}")
    keys = list(dict.fromkeys(k for gi in grams for k in gi))
    if not keys:
        raise ConfigError("the Grams are empty; compute them with gram_matrices(model, data)")
    for k in keys:
        for i, gi in enumerate(grams):
            if k not in gi:
                raise ConfigError(f"no Gram for the linear layer {k!r} in model {i} (other models have one); compute "
                                  "every model's Grams with gram_matrices(model, data) on one architecture")
        t = models[0].get(k)
        if t is None or t.dim() != 2 or not t.is_floating_point():
            raise ConfigError(f"a Gram is given for {k!r}, which is not a linear weight (out, in) of the models")
        for i, gi in enumerate(grams):
            g = _gram_tensor(gi[k])
            if tuple(g.shape) != (t.shape[1], t.shape[1]):
                raise ConfigError(f"the Gram of {k!r} in model {i} is {tuple(g.shape)}, but the layer has "
                                  f"{t.shape[1]} inputs: expected ({t.shape[1]}, {t.shape[1]})")
    return keys


def regmean_merge(state_dicts: Sequence[StateDict], grams: Sequence[Mapping[str, Gram | Tensor]],
                  alpha: float = 0.9, weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """RegMean merge of ``state_dicts`` (Jin et al. 2023): each weight with a Gram by :func:`regmean_weight`, every
    other tensor the weighted average (``linear``). ``grams[i]``: model ``i``'s :func:`gram_matrices` (or plain
    ``(in, in)`` tensors, used as given). Weights (default 1 each) must be non-negative, not all 0.
    """
    cfg = validate(RegMeanConfig, {"weights": None if weights is None else list(weights), "alpha": alpha}, "regmean")
    check_inputs(RegMeanMerger(cfg), state_dicts, None)
    w = [1.0] * len(state_dicts) if weights is None else [float(x) for x in weights]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"weights {w} must be non-negative and not all 0 for RegMean")
    keys = set(_check_grams(state_dicts, grams))
    linear = LinearMerger(LinearConfig(weights=w))
    out: dict[str, Tensor] = {}
    for k in state_dicts[0]:
        tensors = [sd[k] for sd in state_dicts]
        if k in keys:
            out[k] = regmean_weight(tensors, [_gram_tensor(g[k]).to(tensors[0].device) for g in grams], alpha, w)
        else:
            out[k] = linear.merge_tensor(k, tensors, None)
    log.info("RegMean-merged %d models (%d linear weights solved, alpha %.2f)", len(state_dicts), len(keys), alpha)
    return out


class RegMeanMerger(DataAwareMerger):
    """RegMean: data-aware, so the per-tensor path refuses (see :func:`regmean_merge`)."""

    needs_base = False
    use = _USE
    cfg: RegMeanConfig


MERGERS.add("regmean", RegMeanMerger, config=RegMeanConfig, data_aware=True,
            summary="RegMean (Jin et al. 2023): each linear layer solved to match every model's outputs on its inputs")
