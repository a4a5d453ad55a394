"""Link-removal rules of dynamic sparse training: which active links to cut at a topology update.

Every rule takes a weight (or score) ``(out, in)``, the current boolean mask ``(out, in)`` and a count
``k``, and returns a boolean mask ``(out, in)`` of the links to remove: exactly ``k`` entries, all of them
active (an inactive link is never picked). Random rules draw from an explicit ``torch.Generator`` and are
deterministic for a given generator state. Only the active entries are scored, so the rules work on
matrices with more than 2^24 links (no ``torch.multinomial``; sampling without replacement is done with
Gumbel keys + top-k).

Rules (spec §1.4):
- :func:`magnitude_removal` — the ``k`` smallest ``|w|`` (SET, Mocanu et al. 2018; RigL; CHT).
- :func:`soft_magnitude_removal` — CHTs (Zhang et al. arXiv 2501.19107): the links to *keep* are sampled
  without replacement with probability ∝ ``|w|^T``; the ``k`` not kept are removed, so small weights are
  the likeliest to go. ``T`` (see ``schedules.removal_temperature``) → 0: uniform; large: hard magnitude.
- :func:`relative_importance_removal` / :func:`soft_relative_importance_removal` — the same on the
  relative importance ``|w|/Σ_row|w| + |w|/Σ_col|w|`` (CHTss ``ri`` / ``ri_soft``).
- :func:`remove_lowest` / :func:`remove_sampled` — the generic forms on any non-negative score
  (e.g. MEST's ``|w| + λ|g|``).
"""

from __future__ import annotations

import math

import torch

from edgetune.core.errors import ConfigError, ShapeError

__all__ = [
    "magnitude_removal",
    "relative_importance",
    "relative_importance_removal",
    "removal_count",
    "remove_lowest",
    "remove_sampled",
    "soft_magnitude_removal",
    "soft_relative_importance_removal",
]


def removal_count(nnz: int, zeta: float) -> int:
    """Number of links removed at an update: ``floor(ζ · nnz)`` (CHT/CHTs code, spec §1.4)."""
    if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0:
        raise ConfigError(f"nnz must be an integer >= 0, got {nnz!r}.")
    if not (isinstance(zeta, (int, float)) and math.isfinite(zeta) and 0.0 <= zeta <= 1.0):
        raise ConfigError(f"zeta (fraction of active links removed) must be in [0, 1], got {zeta!r}.")
    return min(nnz, math.floor(zeta * nnz + 1e-9))  # 1e-9: 0.29 * 100 = 28.999999999999996


def _active_index(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Validate the arguments and return the flat indices of the active links, shape (nnz,)."""
    if mask.dtype != torch.bool:
        raise ShapeError(f"mask must be a bool tensor, got dtype={mask.dtype}.")
    if scores.shape != mask.shape:
        raise ShapeError(
            f"weight/scores shape {tuple(scores.shape)} does not match mask shape {tuple(mask.shape)}."
        )
    idx = mask.reshape(-1).nonzero().squeeze(1)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= idx.numel():
        raise ConfigError(
            f"k (links to remove) must be an integer in [0, nnz={idx.numel()}], got {k!r}; "
            "a mask cannot lose more links than it has."
        )
    return idx


def _to_removed(flat_idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[flat_idx.to(mask.device)] = True
    return out.view(mask.shape)


def relative_importance(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relative importance ``(out, in)`` of each link: ``|w_ak|/Σ_j|w_aj| + |w_ak|/Σ_b|w_bk|``.

    Sums run over active links only (row ``a`` = output neuron, column ``k`` = input neuron), so a link
    is judged against the strength of the two nodes it joins (CHTss ``ri`` score). A zero node strength
    contributes 0 (the official code adds ``1e-5`` to the denominators instead). Inactive entries are 0.
    """
    if weight.shape != mask.shape:
        raise ShapeError(f"weight shape {tuple(weight.shape)} does not match mask shape {tuple(mask.shape)}.")
    w = weight.detach().abs() * mask
    row = w.sum(dim=1, keepdim=True)
    col = w.sum(dim=0, keepdim=True)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    rel_row = torch.where(row > 0, w / row.clamp_min(1e-38), zero)  # |w| / strength of the output node
    rel_col = torch.where(col > 0, w / col.clamp_min(1e-38), zero)  # |w| / strength of the input node
    return rel_row + rel_col


def remove_lowest(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Remove the ``k`` active links with the lowest score; returns the removed mask ``(out, in)``."""
    idx = _active_index(scores, mask, k)
    vals = scores.detach().reshape(-1)[idx]
    pick = torch.topk(vals, k, largest=False, sorted=False).indices
    return _to_removed(idx[pick], mask)


def remove_sampled(
    scores: torch.Tensor, mask: torch.Tensor, k: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Keep ``nnz − k`` active links sampled without replacement ∝ ``score^T``; remove the other ``k``.

    Sequential sampling without replacement (Plackett–Luce) is drawn as Gumbel-top-k: each active link
    gets the key ``T·log(score) + G``, ``G = −log(E) ~ Gumbel(0, 1)`` with ``E ~ Exp(1)``; the ``nnz − k`` largest keys are kept, the
    ``k`` smallest removed (Kool et al. 2019). Scores must be ``>= 0``; a zero score is the least likely to
    be kept (ties among zeros fall at random). ``T = 0`` removes uniformly at random.
    The noise is drawn on ``generator.device`` in float64 and moved to the scores' device.
    """
    idx = _active_index(scores, mask, k)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0.0):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    vals = scores.detach().reshape(-1)[idx].double()
    if bool((vals < 0).any()):
        raise ConfigError("soft removal scores must be >= 0 (e.g. |w|); got negative scores.")
    tiny = torch.finfo(torch.float64).tiny
    # Gumbel noise G = −log(E), E ~ Exp(1); keys = T·log(score) + G, built in place
    expo = torch.empty(idx.numel(), device=generator.device, dtype=torch.float64).exponential_(
        generator=generator
    )
    keys = vals.clamp_min_(tiny).log_().mul_(temperature)
    keys.sub_(expo.clamp_min_(tiny).log_().to(keys.device))
    pick = torch.topk(keys, k, largest=False, sorted=False).indices
    return _to_removed(idx[pick], mask)


def magnitude_removal(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Remove the ``k`` active links of smallest ``|w|`` (SET/RigL/CHT); removed mask ``(out, in)``."""
    return remove_lowest(weight.detach().abs(), mask, k)


def soft_magnitude_removal(
    weight: torch.Tensor, mask: torch.Tensor, k: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """CHTs soft removal: keep ``nnz − k`` links sampled ∝ ``|w|^T`` without replacement, remove the rest."""
    return remove_sampled(weight.detach().abs(), mask, k, temperature, generator)


def relative_importance_removal(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Remove the ``k`` active links of lowest :func:`relative_importance` (CHTss ``ri``)."""
    return remove_lowest(relative_importance(weight, mask), mask, k)


def soft_relative_importance_removal(
    weight: torch.Tensor, mask: torch.Tensor, k: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Soft removal on :func:`relative_importance` (CHTss ``ri_soft``): keep ∝ ``RI^T``, remove ``k``."""
    return remove_sampled(relative_importance(weight, mask), mask, k, temperature, generator)


# ----------------------------------------------------------------------------------- registered rules
def _register() -> None:
    from edgetune.sparse.strategies import REMOVALS, RemovalRule, summary_of

    rules = {
        "magnitude": (
            RemovalRule(lambda w, m, k, ctx: magnitude_removal(w, m, k)),
            "the k smallest |w| (SET, RigL, CHT)",
        ),
        "soft_magnitude": (
            RemovalRule(lambda w, m, k, ctx: soft_magnitude_removal(w, m, k, ctx.temperature, ctx.generator)),
            "keep links sampled by |w|^T, remove the rest (CHTs; T: sparse.temperature)",
        ),
        "relative_importance": (
            RemovalRule(lambda w, m, k, ctx: relative_importance_removal(w, m, k)),
            "the k lowest |w|/row strength + |w|/column strength (CHTss ri)",
        ),
        "soft_relative_importance": (
            RemovalRule(
                lambda w, m, k, ctx: soft_relative_importance_removal(w, m, k, ctx.temperature, ctx.generator)
            ),
            "keep links sampled by relative importance^T, remove the rest (CHTss ri_soft)",
        ),
    }
    for name, (rule, text) in rules.items():
        REMOVALS.add(name, rule, summary=summary_of(text, rule))


_register()
