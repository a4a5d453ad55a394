"""Merging LoRA adapters of one base model in factor space: linear / concat (exact) and SVD (re-compressed).

An adapter is read as its per-layer factors (:class:`LayerLora`: ``A`` ``(r, in)``, ``B`` ``(out, r)`` and the scale
``s``, so the layer's update is ``s B A``), either from a model that holds it under a name or from a PEFT-format
folder (:func:`read_loras`). The merges are pure functions on those factors:

- :func:`lora_concat`: ``sum_i w_i s_i B_i A_i`` exactly, as one LoRA of rank ``sum_i r_i`` (``A`` the stacked
  ``A_i``, ``B`` the side-by-side ``w_i s_i B_i``); default weights 1 (task arithmetic of LoRAs). PEFT's
  ``add_weighted_adapter(combination_type="cat")``.
- :func:`lora_linear`: the same exact concatenation with default weights ``1/N``: the weighted average of the
  updates (not PEFT's ``linear``, which averages ``A`` and ``B`` separately and so is not the average update).
- :func:`lora_svd`: the weighted sum re-compressed to rank ``k`` by a truncated SVD (the best rank-``k``
  approximation in Frobenius norm, Eckart-Young), ``sqrt(S)`` on each side; computed through QR of the
  concatenated factors, never forming the dense update. Returns the relative Frobenius error of each layer.

Merged factors carry scale 1 (the weights and scales sit in ``B``). :func:`add_lora_` puts a merged LoRA on the
base model as a ``lora`` adapter (``rank_pattern`` where ranks differ per layer) and :func:`save_lora` writes it as
a PEFT folder through :func:`~edgetune.adapters.io.save_adapter`, which :func:`~edgetune.adapters.load_adapter_`
loads back. ZipLoRA and LoRA.rar (learned coefficients) are in ``ziplora.py`` / ``lorarar.py``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from edgetune.adapters.io import load_adapter_, save_adapter
from edgetune.adapters.layer import AdapterLayer, LayerInfo, layer_info
from edgetune.adapters.lora import LoraConfig, factor_shapes, max_rank
from edgetune.adapters.model import (
    adapter_configs,
    adapter_layers,
    adapter_names,
    add_adapter_,
    load_adapter_state_,
    remove_adapters_,
)
from edgetune.core.errors import ConfigError

__all__ = ["LayerLora", "Lora", "SvdMerge", "add_lora_", "check_loras", "concat_factors", "lora_concat",
           "lora_from_model", "lora_linear", "lora_svd", "read_loras", "save_lora", "svd_factors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerLora:
    """One layer's LoRA: the update is ``scale * B @ A``.

    a: ``(r, in)`` (a convolution's ``(r, in / groups, kh, kw)``); b: ``(out, r)`` (``(out, r, 1, 1)``). The maths
    works on the matrices :meth:`matrices` ``(r, fan_in)`` and ``(out, r)``, whatever the layer kind.
    """

    a: Tensor
    b: Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, fan_in)`` of the update seen as a matrix."""
        return int(self.b.shape[0]), math.prod(self.a.shape[1:])

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``(A (r, fan_in), B (out, r))``."""
        return self.a.reshape(self.a.shape[0], -1), self.b.reshape(self.b.shape[0], -1)

    def delta(self) -> Tensor:
        """``scale * B @ A`` as an ``(out, fan_in)`` matrix."""
        a, b = self.matrices()
        return self.scale * (b @ a)

    def like(self, a: Tensor, b: Tensor, scale: float = 1.0) -> LayerLora:
        """Factors ``a (k, fan_in)``, ``b (out, k)`` in this layer's tensor layout."""
        k = a.shape[0]
        return LayerLora(a.reshape(k, *self.a.shape[1:]).contiguous(),
                         b.reshape(self.b.shape[0], k, *self.b.shape[2:]).contiguous(), scale)


#: an adapter: adapted layer path -> its factors
Lora = dict[str, LayerLora]


@dataclass(frozen=True)
class SvdMerge:
    """What :func:`lora_svd` returns: the merged LoRA, each layer's relative Frobenius error
    ``||D - D_k|| / ||D||`` and the error over all layers together ``sqrt(sum ||D - D_k||^2 / sum ||D||^2)``."""

    lora: Lora
    errors: dict[str, float]
    error: float


# ------------------------------------------------------------------------------------------ checks
def _describe(lay: LayerLora) -> str:
    return f"A {tuple(lay.a.shape)}, B {tuple(lay.b.shape)}"


def check_loras(adapters: Sequence[Mapping[str, LayerLora]], weights: Sequence[float] | None = None,
                rank: int | None = None) -> list[float]:
    """Check adapters to merge (same layers, same base shapes, consistent factors), the weights (one finite number
    per adapter) and a target ``rank`` (``1 <= rank <= min(out, fan_in)`` of every layer); return the weights
    (1 each when None). Raises :class:`ConfigError` naming the first problem."""
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or not adapters:
        raise ConfigError("give the adapters to merge as a non-empty list, one {layer path: LayerLora} per adapter "
                          "(read_loras reads them from a model or from adapter folders)")
    for i, ad in enumerate(adapters):
        if not isinstance(ad, Mapping) or not ad:
            raise ConfigError(f"adapter {i} is {'empty' if isinstance(ad, Mapping) else type(ad).__name__}; each "
                              "adapter is a non-empty {layer path: LayerLora}")
        for path, lay in ad.items():
            if lay.a.shape[0] != lay.b.shape[1]:
                raise ConfigError(f"adapter {i}, layer {path!r}: A and B disagree on the rank ({_describe(lay)})")
    first = adapters[0]
    for i, ad in enumerate(adapters[1:], 1):
        missing = [p for p in first if p not in ad]
        if missing:
            raise ConfigError(f"the adapters sit on different layers: adapter 0 adapts {missing[0]!r}, adapter {i} "
                              "does not. Merge only adapters on the same layers of one base model")
        extra = [p for p in ad if p not in first]
        if extra:
            raise ConfigError(f"the adapters sit on different layers: adapter {i} adapts {extra[0]!r}, adapter 0 "
                              "does not. Merge only adapters on the same layers of one base model")
        for path, lay in first.items():
            other = ad[path]
            if (other.b.shape[0], *other.b.shape[2:]) != (lay.b.shape[0], *lay.b.shape[2:]) or \
                    other.a.shape[1:] != lay.a.shape[1:]:
                raise ConfigError(f"layer {path!r} has another base shape in adapter {i} ({_describe(other)}) than "
                                  f"in adapter 0 ({_describe(lay)}); the adapters were trained on different base "
                                  "models. Merge only adapters of one base model")
    if weights is None:
        out = [1.0] * len(adapters)
    else:
        out = [float(w) for w in weights]
        if len(out) != len(adapters):
            raise ConfigError(f"weights has {len(out)} entries for {len(adapters)} adapters; give one weight per "
                              "adapter, in the order of the adapters (or leave weights out)")
        bad = [w for w in out if not math.isfinite(w)]
        if bad:
            raise ConfigError(f"weights must be finite numbers, got {bad[0]!r}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank = {rank!r}: the merged adapter's rank must be a positive integer")
        for path, lay in first.items():
            limit = min(lay.shape)
            if rank > limit:
                raise ConfigError(f"rank {rank} is above what layer {path!r} allows (min(out, in) = {limit} for its "
                                  f"{lay.shape[0]} x {lay.shape[1]} update); choose rank <= {limit}")
    return out


# ------------------------------------------------------------------------------------------ pure maths
def concat_factors(factors: Sequence[LayerLora], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``(A (R, fan_in), B (out, R))`` with ``B @ A = sum_i w_i s_i B_i A_i`` exactly, ``R = sum_i r_i``."""
    mats = [f.matrices() for f in factors]
    a = torch.cat([m[0] for m in mats], dim=0)
    b = torch.cat([m[1] * (w * f.scale) for m, f, w in zip(mats, factors, weights, strict=True)], dim=1)
    return a, b


def svd_factors(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` factors of ``B @ A`` (``a (R, n)``, ``b (m, R)``): ``(A_k (k, n), B_k (m, k),
    relative Frobenius error)``, ``sqrt(S)`` in each factor.

    Through ``B = Q_b R_b``, ``A^T = Q_a R_a`` and the SVD of the small ``R_b R_a^T``, so the ``(m, n)`` product is
    never formed; computed in float64. Ranks above ``rank(B @ A)`` are padded with zero rows / columns.
    """
    dtype = a.dtype
    qb, rb = torch.linalg.qr(b.double())  # (m, p), (p, R)
    qa, ra = torch.linalg.qr(a.double().T)  # (n, q), (q, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # (p, t), (t,), (t, q)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root  # (m, k)
    a_k = root[:, None] * (vh[:k] @ qa.T)  # (k, n)
    if k < rank:
        a_k = torch.cat([a_k, a_k.new_zeros(rank - k, a_k.shape[1])])
        b_k = torch.cat([b_k, b_k.new_zeros(b_k.shape[0], rank - k)], dim=1)
    total = float(s.square().sum())
    err = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return a_k.to(dtype), b_k.to(dtype), err


# ------------------------------------------------------------------------------------------ merges
def lora_concat(adapters: Sequence[Mapping[str, LayerLora]], weights: Sequence[float] | None = None) -> Lora:
    """``sum_i w_i s_i B_i A_i`` per layer as one LoRA of rank ``sum_i r_i`` (exact; default weights 1)."""
    w = check_loras(adapters, weights)
    return {p: lay.like(*concat_factors([ad[p] for ad in adapters], w)) for p, lay in adapters[0].items()}


def lora_linear(adapters: Sequence[Mapping[str, LayerLora]], weights: Sequence[float] | None = None) -> Lora:
    """The weighted average ``sum_i w_i s_i B_i A_i`` of the updates (default ``w_i = 1/N``), exactly, by
    concatenation: a LoRA of rank ``sum_i r_i``."""
    check_loras(adapters, weights)
    w = list(weights) if weights is not None else [1.0 / len(adapters)] * len(adapters)
    return lora_concat(adapters, w)


def lora_svd(adapters: Sequence[Mapping[str, LayerLora]], weights: Sequence[float] | None = None, *,
             rank: int) -> SvdMerge:
    """``sum_i w_i s_i B_i A_i`` (default weights 1) re-compressed to rank ``rank`` per layer by truncated SVD, with
    the relative Frobenius error of each layer and of all layers together."""
    w = check_loras(adapters, weights, rank)
    out: Lora = {}
    errors: dict[str, float] = {}
    lost = kept = 0.0
    for p, lay in adapters[0].items():
        a, b = concat_factors([ad[p] for ad in adapters], w)
        a_k, b_k, err = svd_factors(a, b, rank)
        out[p], errors[p] = lay.like(a_k, b_k), err
        norm2 = float(torch.linalg.matrix_norm(b.double() @ a.double()).square())
        lost, kept = lost + err**2 * norm2, kept + norm2
    error = math.sqrt(lost / kept) if kept > 0 else 0.0
    log.info("SVD merge of %d LoRAs at rank %d: relative Frobenius error %.4g (worst layer %.4g)", len(adapters),
             rank, error, max(errors.values()))
    return SvdMerge(out, errors, error)


# ------------------------------------------------------------------------------------------ model plumbing
def lora_from_model(model: nn.Module, name: str = "default") -> Lora:
    """The factors of adapter ``name`` of ``model`` (any LoRA-like method, through its ``as_lora``; not DoRA)."""
    cfg = adapter_configs(model).get(name)
    if cfg is None:
        raise ConfigError(f"the model has no adapter named {name!r}; its adapters: {adapter_names(model) or '(none)'}")
    if cfg.method == "dora":
        raise ConfigError(f"adapter {name!r} is DoRA, whose update rescales the weight and is no LoRA product; LoRA "
                          "merging takes LoRA-like adapters only")
    out: Lora = {}
    for path, lay in adapter_layers(model):
        if name in lay.adapters:
            a, b, scale = lay.adapters[name].as_lora()
            if a.shape[0] > 0:
                out[path] = LayerLora(a.detach().clone(), b.detach().clone(), float(scale))
    return out


def read_loras(model: nn.Module, sources: Sequence[str | Path]) -> list[Lora]:
    """The factors of each source: the name of an adapter on ``model``, or a PEFT-format adapter folder (loaded on
    ``model`` through :func:`~edgetune.adapters.load_adapter_`, read, and taken off again)."""
    if isinstance(sources, (str, Path)):
        raise ConfigError("sources must be a list of adapter names or folders, not a single one")
    out = []
    for src in sources:
        if isinstance(src, str) and src in adapter_names(model):
            out.append(lora_from_model(model, src))
            continue
        folder = Path(src)
        if not folder.is_dir():
            raise ConfigError(f"{str(src)!r} is neither an adapter of the model (it has {adapter_names(model) or 'none'})"
                              " nor an adapter folder")
        tmp = "lora_merge_read"
        while tmp in adapter_names(model):
            tmp += "_"
        load_adapter_(model, folder, tmp, freeze=False)
        try:
            out.append(lora_from_model(model, tmp))
        finally:
            remove_adapters_(model, tmp)
    return out


def _layer_info(model: nn.Module, path: str) -> LayerInfo:
    try:
        m = model.get_submodule(path)
    except AttributeError:
        m = None
    info = m.info if isinstance(m, AdapterLayer) else (layer_info(m) if m is not None else None)
    if info is None:
        raise ConfigError(f"the merged LoRA adapts {path!r}, which is not an adaptable layer of this model; put it on "
                          "the base model the adapters were trained on")
    return info


def add_lora_(model: nn.Module, lora: Mapping[str, LayerLora], name: str = "merged", *, activate: bool = True
              ) -> nn.Module:
    """Put ``lora`` on ``model`` as a ``lora`` adapter named ``name`` (ranks and scales per layer through
    ``rank_pattern`` / ``alpha_pattern``, ``alpha = scale * rank``); leaves other parameters' ``requires_grad``."""
    if name in adapter_names(model):
        raise ConfigError(f"the model already has an adapter named {name!r}; choose another name")
    check_loras([lora])
    infos = {p: _layer_info(model, p) for p in lora}
    lora = dict(lora)
    for p, lay in lora.items():
        if lay.scale <= 0:  # alpha = scale * rank must be positive: the sign goes into B
            lora[p] = lay = LayerLora(lay.a, lay.b * lay.scale, 1.0)
        limit = max_rank(infos[p])
        if lay.rank > limit:  # a concatenation can outgrow the layer; its product has rank <= limit: exact
            a2, b2 = lay.matrices()
            a, b, _ = svd_factors(a2, b2 * lay.scale, limit)
            lora[p] = lay = lay.like(a, b)
            log.info("layer %r: merged rank above the layer's %d, re-factorised exactly at rank %d", p, limit, limit)
        want = factor_shapes(infos[p], lay.rank)
        if (tuple(lay.a.shape), tuple(lay.b.shape)) != want:
            raise ConfigError(f"layer {p!r}: the LoRA's {_describe(lay)} do not fit this model's layer (A {want[0]}, "
                              f"B {want[1]}); put it on the base model the adapters were trained on")
    ranks = {p: lay.rank for p, lay in lora.items()}
    alphas = {p: lay.scale * lay.rank for p, lay in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg = LoraConfig(name=name, rank=r, alpha=alpha, targets=[f"re:^{re.escape(p)}$" for p in lora],
                     kinds=sorted({infos[p].kind for p in lora}),
                     rank_pattern={p: v for p, v in ranks.items() if v != r},
                     alpha_pattern={p: v for p, v in alphas.items() if v != alpha})
    add_adapter_(model, cfg, freeze=False, activate=activate)
    state = {}
    for p, lay in lora.items():
        state[f"{p}.lora_A"], state[f"{p}.lora_B"] = lay.a, lay.b
    try:
        load_adapter_state_(model, state, name)
    except BaseException:
        remove_adapters_(model, name)
        raise
    return model


def save_lora(model: nn.Module, lora: Mapping[str, LayerLora], folder: str | Path, name: str = "merged"
              ) -> list[Path]:
    """Write ``lora`` as a PEFT-format adapter folder for ``model`` (its base model); the model is left as it was.
    Returns the files written; :func:`~edgetune.adapters.load_adapter_` loads them back."""
    add_lora_(model, lora, name, activate=False)
    try:
        return save_adapter(model, folder, name)
    finally:
        remove_adapters_(model, name)
