"""ZipLoRA (Shah, Ruiz, Cole, Lu, Lazebnik, Li, Jampani 2023, "ZipLoRA: Any Subject in Any Style by Effectively
Merging LoRAs"): merge two LoRAs with learned per-column coefficients.

Per adapted layer, with updates ``D_1 = s_1 B_1 A_1`` and ``D_2`` (``(out, in)``), learn ``m_1, m_2`` (``(in,)``):

    D = D_1 diag(m_1) + D_2 diag(m_2)
    L(m_1, m_2) = sum_i ||(W_0 + D) x_i - (W_0 + D_i) x_i||^2 / ||D_i x_i||^2  +  lambda |cos(m_1, m_2)|

with ``x_i`` the layer's inputs under adapter ``i``'s own data (so ``W_0`` cancels and each term is
``tr((D - D_i) G_i (D - D_i)^T)`` with the Gram matrix ``G_i = mean x_i x_i^T``), or Gaussian inputs when no data
is given. ``m`` starts at 1 (the plain sum) and Adam minimises ``L`` layer by layer.

Axis: ``m`` scales the *columns* of the ``(out, in)`` update, i.e. the input axis, as the paper's
``ΔW · diag(m)`` on PyTorch's weight layout and the public ZipLoRA code (mergers of size ``in_features``) do. A
column is what one input feature contributes, so the coefficient can keep adapter 1's column where adapter 1's
inputs put their energy and adapter 2's elsewhere, which is how the two can coexist. In factor form the
coefficients fold into ``A`` (``A_i diag(m_i)``; ``B`` keeps the scale): the merged LoRA has rank ``r_1 + r_2``,
exactly. Dividing each term by ``||D_i x_i||^2`` (``normalize``, on by default) makes ``lambda`` mean the same in
every layer and keeps one adapter with larger updates from drowning the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from edgetune.adapters.model import adapter_layers, adapter_names
from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.merging.lora_merge import LayerLora, Lora, check_loras

__all__ = ["Grams", "ZipLoraConfig", "ZipLoraResult", "column_merge", "gaussian_gram", "layer_grams",
           "pair_objective", "zip_factors", "ziplora", "ziplora_layer", "ziplora_objective"]

log = logging.getLogger(__name__)

#: layer path -> Gram matrix ``mean x x^T`` ``(in, in)`` of the layer's inputs
Grams = dict[str, Tensor]


class ZipLoraConfig(Config):
    """ZipLoRA (Shah et al. 2023). steps / lr: Adam on the coefficients of each layer; cos_weight: lambda on
    ``|cos(m_1, m_2)|``; samples / seed: Gaussian inputs when no data is given; normalize: divide each adapter's
    term by ``||D_i x_i||^2``."""

    steps: int = Field(default=200, ge=1)
    lr: float = Field(default=0.05, gt=0)
    cos_weight: float = Field(default=0.01, ge=0)
    samples: int = Field(default=256, ge=1)
    seed: int = Field(default=0, ge=0)
    normalize: bool = True


@dataclass(frozen=True)
class ZipLoraResult:
    """Per layer ``(m_1, m_2)``, the merged LoRA (rank ``r_1 + r_2``), the objective (mean over layers) at the plain
    sum and after optimisation, and the seconds the optimisation took."""

    coefficients: dict[str, tuple[Tensor, Tensor]]
    lora: Lora
    objective_before: float
    objective_after: float
    seconds: float


# ------------------------------------------------------------------------------------------ pure maths
def column_merge(d1: Tensor, d2: Tensor, m1: Tensor, m2: Tensor) -> Tensor:
    """``D_1 diag(m_1) + D_2 diag(m_2)``: ``(..., out, in)`` updates, ``(..., in)`` coefficients -> ``(..., out, in)``."""
    return d1 * m1.unsqueeze(-2) + d2 * m2.unsqueeze(-2)


def _energy(d: Tensor, g: Tensor) -> Tensor:
    """``tr(D G D^T)``: the mean squared output of ``D`` on inputs of Gram ``G`` (``(..., out, in)``, ``(..., in, in)``
    -> ``(...)``)."""
    return ((d @ g) * d).sum((-2, -1))


def ziplora_objective(d1: Tensor, d2: Tensor, m1: Tensor, m2: Tensor, g1: Tensor, g2: Tensor, *,
                      cos_weight: float = 0.01, normalize: bool = True) -> Tensor:
    """ZipLoRA's loss of one layer: ``sum_i tr((D - D_i) G_i (D - D_i)^T) [/ tr(D_i G_i D_i^T)] + lambda |cos(m_1,
    m_2)|`` with ``D = D_1 diag(m_1) + D_2 diag(m_2)``; ``d_i (out, in)``, ``m_i (in,)``, ``g_i (in, in)`` -> a scalar
    (with leading batch dimensions ``(...)`` on every input: one value per layer, ``(...)``)."""
    merged = column_merge(d1, d2, m1, m2)
    loss = F.cosine_similarity(m1, m2, dim=-1).abs() * cos_weight
    for d, g in ((d1, g1), (d2, g2)):
        term = _energy(merged - d, g)
        loss = loss + (term / _energy(d, g).clamp_min(1e-12) if normalize else term)
    return loss


def gaussian_gram(n: int, samples: int, generator: torch.Generator) -> Tensor:
    """The Gram matrix ``X^T X / N`` ``(n, n)`` of ``N = samples`` standard Gaussian inputs."""
    x = torch.randn(samples, n, generator=generator)
    return x.T @ x / samples


def zip_factors(l1: LayerLora, l2: LayerLora, m1: Tensor, m2: Tensor) -> LayerLora:
    """The merged update ``D_1 diag(m_1) + D_2 diag(m_2)`` as a LoRA of rank ``r_1 + r_2`` (scale 1): the
    coefficients fold into ``A``, the scales into ``B``."""
    (a1, b1), (a2, b2) = l1.matrices(), l2.matrices()
    a = torch.cat([a1 * m1.to(a1.dtype), a2 * m2.to(a2.dtype)], dim=0)
    b = torch.cat([b1 * l1.scale, b2 * l2.scale], dim=1)
    return l1.like(a, b)


def ziplora_layer(d1: Tensor, d2: Tensor, g1: Tensor, g2: Tensor, cfg: ZipLoraConfig) -> tuple[Tensor, Tensor]:
    """The coefficients ``(m_1, m_2)`` (``(in,)`` each) of one layer: Adam on :func:`ziplora_objective` from 1."""
    m1 = torch.ones(d1.shape[1], dtype=d1.dtype, requires_grad=True)
    m2 = torch.ones(d1.shape[1], dtype=d1.dtype, requires_grad=True)
    opt = torch.optim.Adam([m1, m2], lr=cfg.lr)
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        ziplora_objective(d1, d2, m1, m2, g1, g2, cos_weight=cfg.cos_weight, normalize=cfg.normalize).backward()
        opt.step()
    return m1.detach(), m2.detach()


# ------------------------------------------------------------------------------------------ pairs of adapters
def _pair_grams(pair: Sequence[Mapping[str, LayerLora]], grams: Sequence[Mapping[str, Tensor]] | None,
                samples: int, seed: int) -> tuple[Grams, Grams]:
    """The Gram matrices of both adapters' inputs (Gaussian ones, the same for both, where none are given)."""
    if grams is None:
        gen = torch.Generator().manual_seed(seed)
        g = {p: gaussian_gram(lay.shape[1], samples, gen).to(lay.a.dtype) for p, lay in pair[0].items()}
        return g, g
    if len(grams) != 2:
        raise ConfigError(f"grams must hold one {{layer: Gram}} per adapter (2), got {len(grams)}")
    out = []
    for i, gi in enumerate(grams):
        missing = [p for p in pair[0] if p not in gi]
        if missing:
            raise ConfigError(f"the input statistics of adapter {i} lack layer {missing[0]!r}; capture them on every "
                              "adapted layer (layer_grams), or leave grams out for Gaussian inputs")
        for p, lay in pair[0].items():
            if tuple(gi[p].shape) != (lay.shape[1], lay.shape[1]):
                raise ConfigError(f"the Gram matrix of adapter {i} at {p!r} is {tuple(gi[p].shape)}, the layer takes "
                                  f"{lay.shape[1]} inputs")
        out.append({p: gi[p].to(pair[0][p].a.dtype) for p in pair[0]})
    return out[0], out[1]


def _check_pair(pair: Sequence[Mapping[str, LayerLora]]) -> None:
    if isinstance(pair, Mapping) or len(pair) != 2:
        raise ConfigError(f"ZipLoRA and LoRA.rar merge a pair of adapters; got "
                          f"{len(pair) if not isinstance(pair, Mapping) else 'a single adapter'}")
    check_loras(pair)


def pair_objective(pair: Sequence[Mapping[str, LayerLora]], coefficients: Mapping[str, tuple[Tensor, Tensor]] | None,
                   grams: Sequence[Mapping[str, Tensor]] | None = None, cfg: ZipLoraConfig | None = None) -> float:
    """ZipLoRA's objective of a pair, averaged over its layers, at ``coefficients`` (None: the plain sum, all 1)."""
    cfg = cfg or ZipLoraConfig()
    _check_pair(pair)
    g1, g2 = _pair_grams(pair, grams, cfg.samples, cfg.seed)
    total = 0.0
    with torch.no_grad():
        for p, l1 in pair[0].items():
            d1, d2 = l1.delta(), pair[1][p].delta()
            m1, m2 = coefficients[p] if coefficients is not None else (d1.new_ones(d1.shape[1]),) * 2
            total += float(ziplora_objective(d1, d2, m1, m2, g1[p], g2[p], cos_weight=cfg.cos_weight,
                                             normalize=cfg.normalize))
    return total / len(pair[0])


def ziplora(pair: Sequence[Mapping[str, LayerLora]], grams: Sequence[Mapping[str, Tensor]] | None = None,
            cfg: ZipLoraConfig | None = None) -> ZipLoraResult:
    """Merge two LoRAs of one base model with ZipLoRA: per layer, coefficients learnt on the layer's inputs under
    each adapter (``grams``: one ``{layer: Gram (in, in)}`` per adapter, see :func:`layer_grams`; None: Gaussian
    inputs). Returns the coefficients, the merged LoRA (rank ``r_1 + r_2``), the objective before and after, and
    the time taken."""
    cfg = cfg or ZipLoraConfig()
    _check_pair(pair)
    g1, g2 = _pair_grams(pair, grams, cfg.samples, cfg.seed)
    start = time.perf_counter()
    coefficients: dict[str, tuple[Tensor, Tensor]] = {}
    merged: Lora = {}
    for p, l1 in pair[0].items():
        l2 = pair[1][p]
        with torch.enable_grad():
            m1, m2 = ziplora_layer(l1.delta().detach(), l2.delta().detach(), g1[p], g2[p], cfg)
        coefficients[p] = (m1, m2)
        merged[p] = zip_factors(l1, l2, m1, m2)
    seconds = time.perf_counter() - start
    before = pair_objective(pair, None, (g1, g2), cfg)
    after = pair_objective(pair, coefficients, (g1, g2), cfg)
    log.info("ZipLoRA over %d layers in %.3f s: objective %.4g -> %.4g (plain sum)", len(merged), seconds, before,
             after)
    return ZipLoraResult(coefficients, merged, before, after, seconds)


# ------------------------------------------------------------------------------------------ model plumbing
@torch.no_grad()
def layer_grams(model: nn.Module, adapter: str, batches: Iterable[Tensor | Sequence[Tensor]],
                paths: Sequence[str] | None = None) -> Grams:
    """The Gram matrix ``mean x x^T`` ``(in, in)`` of the inputs of each linear layer adapter ``adapter`` sits on
    (or ``paths``), with only that adapter active, over ``batches`` (input tensors, or tuples whose first element
    is the input); the model's active adapters and mode are restored after."""
    if adapter not in adapter_names(model):
        raise ConfigError(f"the model has no adapter named {adapter!r}; its adapters: {adapter_names(model)}")
    layers = {p: lay for p, lay in adapter_layers(model) if adapter in lay.adapters}
    if paths is not None:
        unknown = [p for p in paths if p not in layers]
        if unknown:
            raise ConfigError(f"adapter {adapter!r} does not sit on {unknown[0]!r}; its layers: {list(layers)[:5]}")
        layers = {p: layers[p] for p in paths}
    odd = [p for p, lay in layers.items() if lay.info.kind != "linear"]
    if odd:
        raise ConfigError(f"input statistics are captured on linear layers only; {odd[0]!r} is a "
                          f"{layers[odd[0]].info.kind} layer: leave grams out for Gaussian inputs")
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook(path: str):
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, module.info.in_features).double()  # (N, in)
            sums[path] = sums[path] + x.T @ x if path in sums else x.T @ x
            counts[path] += x.shape[0]
        return fn

    all_layers = adapter_layers(model)
    saved = [(lay, list(lay.active)) for _, lay in all_layers]
    training = model.training
    with ExitStack() as stack:
        for p, lay in layers.items():
            stack.callback(lay.register_forward_pre_hook(hook(p)).remove)
        for _, lay in all_layers:
            lay.active = [adapter] if adapter in lay.adapters else []
        model.eval()
        try:
            for batch in batches:
                model(batch if isinstance(batch, Tensor) else batch[0])
        finally:
            model.train(training)
            for lay, active in saved:
                lay.active = active
    empty = [p for p, c in counts.items() if c == 0]
    if empty:
        raise ConfigError(f"no input reached layer {empty[0]!r}: give at least one batch that runs through it")
    return {p: (sums[p] / counts[p]).float() for p in layers}
