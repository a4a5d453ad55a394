"""Initial weight values for sparse linear layers, drawn only on a mask's active links.

Each function takes a boolean mask ``(out, in)`` and returns a values tensor ``(out, in)`` with normal
draws on the active links and exact zeros elsewhere (on ``generator.device``).

- :func:`sparse_weight_init` — SWI (CHT, Zhang et al. ICLR 2024; spec §1.9):
  ``σ = sqrt(2 / (d · fan_in))``, Kaiming with the fan-in replaced by the expected number of active inputs.
  Done right: the official scheduler uses ``d · out_features`` (wrong for non-square layers) and the old
  re-init of new links forgets the square root (spec §3 item 7).
- :func:`kaiming_active_init` — the Kaiming baseline ``σ = sqrt(2 / fan_in)``, dense-layer scale.
- :func:`degree_scaled_init` — per output neuron ``σ_a = sqrt(2 / deg_in(a))``: the exact fan-in of each
  neuron instead of the expected one.
"""

from __future__ import annotations

import math

import torch

from edgetune.core.errors import ConfigError, ShapeError

__all__ = ["degree_scaled_init", "kaiming_active_init", "sparse_weight_init", "swi_std"]


def _check_mask(mask: torch.Tensor) -> None:
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ShapeError(
            f"mask must be a 2-D bool tensor (out, in), got dtype={mask.dtype}, shape={tuple(mask.shape)}."
        )
    if not bool(mask.any()):
        raise ConfigError(f"mask of shape {tuple(mask.shape)} has no active link; nothing to initialise.")


def _normal_on(
    mask: torch.Tensor, std: torch.Tensor | float, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    z = torch.randn(tuple(mask.shape), generator=generator, device=generator.device, dtype=dtype)
    return z * std * mask.to(generator.device)


def swi_std(fan_in: int, density: float, gain: float = math.sqrt(2.0)) -> float:
    """SWI standard deviation ``gain / sqrt(density · fan_in)`` (= ``sqrt(2/(d·fan_in))`` for ReLU gain)."""
    if isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 1:
        raise ConfigError(f"fan_in must be an integer >= 1, got {fan_in!r}.")
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0.0 < density <= 1.0):
        raise ConfigError(f"density must be in (0, 1], got {density!r}.")
    return float(gain / math.sqrt(density * fan_in))


def sparse_weight_init(
    mask: torch.Tensor,
    generator: torch.Generator,
    density: float | None = None,
    gain: float = math.sqrt(2.0),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SWI values ``(out, in)``: ``N(0, σ²)`` on active links, ``σ = gain/sqrt(d · in)``, zeros elsewhere.

    ``density`` defaults to the mask's own density ``nnz / (out · in)``; ``fan_in = in`` (mask columns).
    """
    _check_mask(mask)
    d = float(mask.sum().item()) / mask.numel() if density is None else density
    return _normal_on(mask, swi_std(int(mask.shape[1]), d, gain), generator, dtype)


def kaiming_active_init(
    mask: torch.Tensor,
    generator: torch.Generator,
    gain: float = math.sqrt(2.0),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Kaiming-normal values ``(out, in)`` on active links: ``σ = gain / sqrt(in)`` (dense fan-in)."""
    _check_mask(mask)
    return _normal_on(mask, swi_std(int(mask.shape[1]), 1.0, gain), generator, dtype)


def degree_scaled_init(
    mask: torch.Tensor,
    generator: torch.Generator,
    gain: float = math.sqrt(2.0),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-neuron Kaiming on the actual in-degree: ``σ_a = gain / sqrt(deg_in(a))`` for row ``a``.

    Rows without links stay zero. Each output neuron's pre-activation gets variance ``gain²·Var(x)``.
    """
    _check_mask(mask)
    deg = mask.sum(dim=1, keepdim=True).to(device=generator.device, dtype=dtype)
    std = torch.where(deg > 0, gain / deg.clamp_min(1).sqrt(), torch.zeros_like(deg))
    return _normal_on(mask, std, generator, dtype)


# ----------------------------------------------------------------------------------- registered rules
def _register() -> None:
    from edgetune.sparse.strategies import WEIGHT_INITS, WeightInit, summary_of

    rules = {
        "swi": (
            WeightInit(
                lambda m, ctx: sparse_weight_init(
                    m, ctx.generator, density=ctx.density, dtype=ctx.weight.dtype
                )
            ),
            "SWI: std sqrt(2/(density*fan_in)) on the links (CHT)",
        ),
        "kaiming": (
            WeightInit(lambda m, ctx: kaiming_active_init(m, ctx.generator).to(ctx.weight.dtype)),
            "Kaiming: std sqrt(2/fan_in) on the links",
        ),
        "keep": (WeightInit(lambda m, ctx: ctx.weight), "the dense layer's own weights under the mask"),
    }
    for name, (rule, text) in rules.items():
        WEIGHT_INITS.add(name, rule, summary=summary_of(text, rule))


_register()
