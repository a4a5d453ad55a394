"""Initial sparse topologies of a linear layer: boolean masks ``(out, in)`` with an exact link count.

Every builder returns a ``torch.bool`` mask of shape ``(out_features, in_features)`` (``nn.Linear``
layout) with exactly :func:`link_count` ``= round(density · out · in)`` links, drawn with the explicit
``generator`` (the mask lives on ``generator.device``). Topologies (spec §1.10):

- :func:`erdos_renyi` — uniform random links (SET/RigL/CHT default);
- :func:`bipartite_small_world` — BSW, ring lattice + rewiring with probability β (CHTs Transformer);
- :func:`bipartite_receptive_field` — BRF, distance-decaying receptive fields (CHTs/CHTss LLM code);
- :func:`correlated_sparse_topology` — CSTI, links = strongest input-feature correlations (CHT,
  Zhang et al. ICLR 2024).

The official builders miss the link count in several ways (truncated degree lists, thresholds that keep
ties, capped degrees); here the count is exact by construction and ties are broken at random.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, ShapeError

__all__ = [
    "bipartite_receptive_field",
    "bipartite_small_world",
    "correlated_sparse_topology",
    "erdos_renyi",
    "input_correlation",
    "link_count",
]


def link_count(out_features: int, in_features: int, density: float) -> int:
    """Number of links ``round(density · out · in)`` (halves round up) of a layer, validated.

    Raises :class:`ConfigError` when the shape is not positive, the density is outside (0, 1], or the
    layer would get fewer links than it has neurons on its larger side (``< max(out, in)``), which would
    leave neurons unconnected from the start.
    """
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0.0 < density <= 1.0):
        raise ConfigError(f"density must be in (0, 1] (fraction of links kept), got {density!r}.")
    total = out_features * in_features
    n = math.floor(density * total + 0.5)
    need = max(out_features, in_features)
    if n < need:
        raise ConfigError(
            f"a layer too small for the requested density (fewer links than neurons): shape "
            f"({out_features}, {in_features}) at density={density!r} gets {n} links but has {need} neurons on "
            f"its larger side. Use density >= {need / total:.6g} for this layer, or keep it dense."
        )
    return n


def _scatter_mask(flat_idx: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    mask = torch.zeros(out_features * in_features, dtype=torch.bool, device=flat_idx.device)
    mask[flat_idx] = True
    return mask.view(out_features, in_features)


def _gumbel(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)`` (float64) on the generator's device."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    u = u.clamp(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    return -torch.log(-torch.log(u))


def _top_n_random_ties(scores: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Flat indices of the ``n`` largest entries of ``scores`` (any shape), ties broken uniformly at random."""
    flat = scores.reshape(-1)
    perm = torch.randperm(flat.numel(), generator=generator, device=generator.device).to(flat.device)
    order = torch.argsort(flat[perm], descending=True, stable=True)
    return perm[order[:n]]


def erdos_renyi(
    out_features: int, in_features: int, density: float, generator: torch.Generator
) -> torch.Tensor:
    """Erdős–Rényi bipartite mask ``(out, in)``: a uniformly random set of exactly ``link_count`` links."""
    n = link_count(out_features, in_features, density)
    idx = torch.randperm(out_features * in_features, generator=generator, device=generator.device)[:n]
    return _scatter_mask(idx, out_features, in_features)


def bipartite_small_world(
    out_features: int, in_features: int, density: float, beta: float, generator: torch.Generator
) -> torch.Tensor:
    """Bipartite small-world (BSW) mask ``(out, in)``: ring lattice, then rewiring (CHTs, ``--WS``).

    With ``L = max(out, in)`` nodes on the larger side and ``S = min(out, in)`` on the smaller, larger-side
    node ``j`` gets degree ``k_j ∈ {⌊n/L⌋, ⌊n/L⌋ + 1}`` (the ``n mod L`` nodes with the extra link chosen at
    random, so that the degrees sum to ``n`` exactly) and links to the contiguous ring window of ``k_j``
    smaller-side nodes centred at ``j·S/L`` (first node ``⌊j·S/L − (k_j − 1)/2 + 1/2⌋`` mod ``S``).
    Then, as in the released code, every link is dropped with probability ``beta`` and the same number of
    links is added uniformly among the non-links; ``beta=0`` is the pure lattice, ``beta=1`` an
    Erdős–Rényi graph. Transformer scripts use ``beta=0.25``.
    """
    n = link_count(out_features, in_features, density)
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ConfigError(f"beta (rewiring probability) must be in [0, 1], got {beta!r}; CHTs uses 0.25.")
    dev = generator.device
    big, small = max(out_features, in_features), min(out_features, in_features)
    degree = torch.full((big,), n // big, dtype=torch.long, device=dev)
    extra = torch.randperm(big, generator=generator, device=dev)[: n % big]
    degree[extra] += 1
    j = torch.arange(big, device=dev)
    # window of k_j nodes centred at j·S/L: start = round(c - (k - 1)/2), halves rounded up
    start = torch.floor(j.double() * small / big - (degree.double() - 1.0) / 2.0 + 0.5).long()
    offsets = torch.arange(small, device=dev)
    cols = (start[:, None] + offsets[None, :]) % small  # (big, small) ring window per node
    adj = torch.zeros(big, small, dtype=torch.bool, device=dev)
    adj.scatter_(1, cols, offsets[None, :] < degree[:, None])
    if beta > 0.0:
        active = adj.reshape(-1).nonzero().squeeze(1)  # row-major order: deterministic
        u = torch.rand(active.numel(), generator=generator, device=dev, dtype=torch.float64)
        dropped = active[u < beta]
        flat = adj.reshape(-1)
        flat[dropped] = False
        keys = torch.rand(flat.numel(), generator=generator, device=dev, dtype=torch.float64)
        keys[flat] = -1.0  # existing links are never picked
        flat[torch.topk(keys, dropped.numel()).indices] = True
    return adj if out_features >= in_features else adj.t().contiguous()


def bipartite_receptive_field(
    out_features: int,
    in_features: int,
    density: float,
    r: float,
    generator: torch.Generator,
    degree_dist: Literal["uniform", "balanced"] = "uniform",
) -> torch.Tensor:
    """Bipartite receptive-field (BRF) mask ``(out, in)`` (CHTs/CHTss, ``--BRF --brf_r r``).

    Each of the ``S = min(out, in)`` smaller-side nodes ``i`` gets a degree ``k_i`` and is centred at
    ``c_i = ⌊i·L/S⌋`` on the ring of the ``L = max(out, in)`` larger-side nodes; it picks ``k_i`` distinct
    neighbours ``j`` with probability ∝ ``(1 + dist(j, c_i))^(−α)``, ``α = (1 − r)/r``, ``dist`` the ring
    distance (sequential sampling without replacement, done as Gumbel-top-k). ``r = 0``: the nearest
    window (ties at random); ``r = 1``: uniform. README value ``r = 0.3``.

    Degrees sum to ``n`` exactly: ``"uniform"`` (the README's ``--degree_dist uniform``) gives every node one
    link plus ``n − S`` extra links spread uniformly at random (capped at ``L`` per node), ``"balanced"`` gives
    ``⌊n/S⌋`` or ``⌊n/S⌋ + 1``. The released code centres at ``i·⌊L/S⌋``, which crowds the centres when
    ``S`` does not divide ``L``; here centres are evenly spread.
    """
    n = link_count(out_features, in_features, density)
    if not (isinstance(r, (int, float)) and 0.0 <= r <= 1.0):
        raise ConfigError(f"r (BRF randomness) must be in [0, 1], got {r!r}; the CHTs README uses 0.3.")
    if degree_dist not in ("uniform", "balanced"):
        raise ConfigError(f'degree_dist must be "uniform" or "balanced", got {degree_dist!r}.')
    dev = generator.device
    big, small = max(out_features, in_features), min(out_features, in_features)
    if degree_dist == "balanced":
        degree = torch.full((small,), n // small, dtype=torch.long, device=dev)
        degree[torch.randperm(small, generator=generator, device=dev)[: n % small]] += 1
    else:
        degree = torch.ones(small, dtype=torch.long, device=dev)
        if n > small:  # n - S extra slots out of S·(L-1): uniform random extras, capacity-capped
            slots = torch.randperm(small * (big - 1), generator=generator, device=dev)[: n - small]
            degree += torch.bincount(slots // (big - 1), minlength=small)
    centre = torch.floor(torch.arange(small, device=dev, dtype=torch.float64) * big / small).long()
    j = torch.arange(big, device=dev)
    dist = (j[None, :] - centre[:, None]).abs()
    dist = torch.minimum(dist, big - dist).double()  # (small, big) ring distance
    if r == 0.0:
        u = torch.rand(small, big, generator=generator, device=dev, dtype=torch.float64)
        keys = -dist + 0.5 * u  # integer distances: noise only breaks ties
    else:
        alpha = (1.0 - r) / r
        keys = -alpha * torch.log1p(dist) + _gumbel((small, big), generator)
    order = torch.argsort(keys, dim=1, descending=True)
    adj = torch.zeros(small, big, dtype=torch.bool, device=dev)
    adj.scatter_(1, order, j[None, :] < degree[:, None])
    return adj.t().contiguous() if out_features >= in_features else adj


def input_correlation(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation ``(F, F)`` (float64) of the columns of data ``x`` ``(N, F)``.

    Constant features (zero variance) get correlation 0 with everything (the official code maps NaN to 0).
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ShapeError(
            f"x must be training data of shape (N, F) with N >= 2 samples, got {tuple(x.shape)}."
        )
    xc = x.double() - x.double().mean(dim=0, keepdim=True)
    cov = xc.t() @ xc
    std = cov.diagonal().clamp_min(0).sqrt()
    denom = std[:, None] * std[None, :]
    return torch.where(denom > 0, cov / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def correlated_sparse_topology(
    x: torch.Tensor,
    out_features: int,
    density: float,
    generator: torch.Generator,
    soft: bool = False,
) -> torch.Tensor:
    """Correlated sparse topological initialisation (CSTI; CHT, Zhang et al. ICLR 2024) ``(out, in)``.

    ``x`` is training data ``(N, in)`` (flattened inputs of the layer). The Pearson correlation ``C``
    ``(in, in)`` of the input features is computed, its diagonal (self-correlation) set to 0, and tiled
    along the output axis (row ``a`` uses ``C[a mod in]``: the official ``dim=2`` tiling for layers wider
    than their input). The links are the ``link_count`` entries of largest ``|C|`` (ties at random), or with
    ``soft=True`` a sample without replacement with probability ∝ ``|C|`` (the official ``soft_csti``).
    """
    if x.dim() != 2:
        raise ShapeError(f"x must be training data of shape (N, in_features), got shape {tuple(x.shape)}.")
    in_features = int(x.shape[1])
    n = link_count(out_features, in_features, density)
    corr = input_correlation(x).to(generator.device)
    corr.fill_diagonal_(0.0)
    reps = -(-out_features // in_features)
    score = corr.abs().repeat(reps, 1)[:out_features]  # (out, in)
    if soft:
        keys = torch.log(score.clamp_min(torch.finfo(torch.float64).tiny)) + _gumbel(
            tuple(score.shape), generator
        )
        idx = torch.topk(keys.reshape(-1), n).indices
    else:
        idx = _top_n_random_ties(score, n, generator)
    return _scatter_mask(idx, out_features, in_features)


# ----------------------------------------------------------------------------------- registered rules
class CstiOptions(Config):
    """hidden: what layers not fed by the data get: ``er`` (Erdos-Renyi) or ``tiled`` (the input-feature
    correlation tiled over the layer, as the official MLP code does with ``--dim 2``; see
    :mod:`edgetune.sparse.rules.csti_tiled`). samples: training inputs used for the correlation."""

    hidden: Literal["er", "tiled"] = "er"
    samples: int = Field(default=10_000, ge=2)


def _csti(out_f: int, in_f: int, density: float, ctx: Any) -> torch.Tensor:
    """CSTI on the layer's inputs when they are the data (first ``samples`` inputs); hidden layers per
    ``hidden``: Erdős–Rényi, or the data's correlation tiled (official)."""
    opts = ctx.options if ctx.options is not None else CstiOptions()
    if ctx.train_inputs is not None:
        x = ctx.train_inputs.reshape(ctx.train_inputs.shape[0], -1)
        if opts.hidden == "tiled":
            from edgetune.sparse.rules.csti_tiled import data_correlation, tiled_correlated_topology

            corr = data_correlation(ctx.train_inputs, opts.samples)
            return tiled_correlated_topology(corr, out_f, in_f, density, ctx.generator)
        if x.shape[1] == in_f:
            return correlated_sparse_topology(x[: opts.samples].double(), out_f, density, ctx.generator)
    elif opts.hidden == "tiled":
        raise ConfigError(
            f"sparse layer {ctx.layer!r}: topology csti with hidden=tiled needs the training inputs (the feature "
            "correlation), but none were given; run it from a recipe (the runner passes them), call "
            "sparsify_(..., train_inputs=x), or choose topology=er"
        )
    return erdos_renyi(out_f, in_f, density, ctx.generator)


def _register() -> None:
    from edgetune.sparse.strategies import TOPOLOGIES, TopologyRule, summary_of

    rules = {
        "er": (
            TopologyRule(lambda o, i, d, ctx: erdos_renyi(o, i, d, ctx.generator)),
            "Erdos-Renyi: uniform random links",
        ),
        "bsw": (
            TopologyRule(
                lambda o, i, d, ctx: bipartite_small_world(o, i, d, ctx.params["beta"], ctx.generator),
                params=("beta",),
            ),
            "bipartite small world: ring lattice rewired with probability beta",
        ),
        "brf": (
            TopologyRule(
                lambda o, i, d, ctx: bipartite_receptive_field(o, i, d, ctx.params["brf_r"], ctx.generator),
                params=("brf_r",),
            ),
            "bipartite receptive field: links decay with ring distance (randomness brf_r)",
        ),
        "csti": (
            TopologyRule(_csti, options=CstiOptions, needs_data=True),
            (
                "correlated sparse topology from the training inputs (layers not fed by the data: er, or the "
                "correlation tiled with hidden=tiled, as the official MLP code)"
            ),
        ),
    }
    for name, (rule, text) in rules.items():
        TOPOLOGIES.add(name, rule, summary=summary_of(text, rule))


_register()
