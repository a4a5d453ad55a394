"""MEST removal (Yuan et al., NeurIPS 2021, "MEST: Accurate and Fast Memory-Economic Sparse Training").

At an update, the ``k`` active links with the lowest ``|w| + λ·|g|`` are removed, ``g`` the dense gradient
of the loss on the batch before the update: a small weight that the loss is still pushing is kept.
``λ = 0`` is magnitude removal; the CHT code's MEST baseline uses ``λ = 0.01`` (the default here).
Recipe: ``sparse.removal=mest sparse.removal_options.lambda=0.01`` (MEST's own growth is random:
``sparse.regrowth=random``, with ``sparse.density_schedule=em_s`` for its elastic mutation schedule).
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field, field_validator

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.sparse.removal import remove_lowest
from edgetune.sparse.strategies import REMOVALS, RemovalRule, RuleContext, summary_of

__all__ = ["MestOptions", "mest_removal", "mest_scores"]


class MestOptions(Config):
    """lambda: weight of the gradient magnitude in the removal score, >= 0."""

    model_config = ConfigDict(**Config.model_config, populate_by_name=True)

    lambda_: float = Field(default=0.01, alias="lambda")

    @field_validator("lambda_")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if not v >= 0 or v == float("inf"):
            raise ValueError(
                f"MEST's lambda must be a finite number >= 0 (0 is plain magnitude removal; the CHT "
                f"code uses 0.01), got {v!r}"
            )
        return float(v)


def mest_scores(weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """``|w| + λ·|g|`` on the active links, 0 elsewhere, ``(out, in)``."""
    return (weight.detach().abs() + lam * grad.detach().abs().to(weight.dtype)) * mask


def mest_removal(weight: torch.Tensor, mask: torch.Tensor, k: int, ctx: RuleContext) -> torch.Tensor:
    """Remove the ``k`` active links of lowest MEST score; ``ctx.grad`` is the dense gradient ``(out, in)``."""
    if ctx.grad is None:
        raise ConfigError(
            f"sparse layer {ctx.layer!r}: mest removal at step {ctx.step} found no dense gradient; the update must "
            "follow a training batch (forward + backward in train mode), or choose removal=magnitude"
        )
    if ctx.grad.shape != weight.shape:
        raise ConfigError(
            f"sparse layer {ctx.layer!r}: gradient shape {tuple(ctx.grad.shape)} does not match the "
            f"weight {tuple(weight.shape)}; pass the dense (out, in) gradient of this layer"
        )
    lam = ctx.options.lambda_ if ctx.options is not None else MestOptions().lambda_
    return remove_lowest(mest_scores(weight, ctx.grad, mask, lam), mask, k)


_RULE = RemovalRule(mest_removal, options=MestOptions, needs_gradients=True)
REMOVALS.add(
    "mest", _RULE, summary=summary_of("MEST: the k lowest |w| + lambda*|g| (Yuan et al. 2021)", _RULE)
)
