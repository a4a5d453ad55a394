"""SWI as the official CHT/CHTs scheduler computes it: ``σ = sqrt(2 / (d · out_features))``.

``DSTScheduler.reset_parameters`` divides the layer's link count ``d·out·in`` by ``in`` and so scales by
the expected *out*-degree, not the fan-in (spec §3 item 7). For square layers both agree; for the first
layer of the 784-1568-... MLP (``out = 2·in``) the official weights are ``sqrt(2)`` times smaller than
edgetune's ``swi``. Recipe: ``sparse.weight_init=swi_out``.
"""

from __future__ import annotations

import math

import torch

from edgetune.sparse.init import _check_mask, _normal_on, swi_std
from edgetune.sparse.strategies import WEIGHT_INITS, InitContext, WeightInit, summary_of

__all__ = ["swi_out_init"]


def swi_out_init(mask: torch.Tensor, generator: torch.Generator, density: float, dtype: torch.dtype) -> torch.Tensor:
    """``N(0, 2/(density·out))`` on the links of ``mask`` ``(out, in)``, zeros elsewhere."""
    _check_mask(mask)
    return _normal_on(mask, swi_std(int(mask.shape[0]), density, math.sqrt(2.0)), generator, dtype)


def _rule(mask: torch.Tensor, ctx: InitContext) -> torch.Tensor:
    return swi_out_init(mask, ctx.generator, ctx.density, ctx.weight.dtype)


_RULE = WeightInit(_rule)
WEIGHT_INITS.add(
    "swi_out",
    _RULE,
    summary=summary_of("SWI as the official code: std sqrt(2/(density*out_features))", _RULE),
)
