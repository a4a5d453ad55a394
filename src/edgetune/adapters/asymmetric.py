"""Asymmetric LoRA (Zhu et al. 2024, "Asymmetry in Low-Rank Adapters of Foundation Models").

``W' = W + s * B @ A`` with one factor drawn at random and frozen, the other trained from zero. With the default
(``A`` random, only ``B`` trained) ``A`` is a fixed random feature extractor and ``B`` learns what to write
into the output: the paper finds training ``B`` alone nearly matches LoRA with half its trainable parameters and
a better generalisation bound. The update stays inside the fixed rank-``r`` subspace of the random factor, so
(unlike RAC-LoRA, :mod:`edgetune.adapters.rac_lora`) it cannot reach a full fine-tune.

:func:`draw_sketch` is the random factor of this method and of RAC-LoRA.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import LayerInfo
from edgetune.adapters.lora import LoraAdapter, draw_factor, factor_shapes

__all__ = ["AsymmetricAdapter", "AsymmetricConfig", "draw_sketch", "sketch_fan"]


class AsymmetricConfig(AdapterConfig):
    """Asymmetric LoRA (Zhu et al. 2024).

    random_factor: the factor drawn at random and frozen (``A``: the paper's choice, only ``B`` trains; ``B``:
        ``B`` random, only ``A`` trains). The other starts at zero, so the adapted model starts equal to the base.
    distribution: how the random factor is drawn (:func:`draw_sketch`): ``orthogonal`` (orthonormal rows of
        ``A`` / columns of ``B``, the paper's random orthogonal ``A``) or ``gaussian`` (i.i.d. with the same
        expected Gram matrix).
    """

    method: Literal["asymmetric"] = "asymmetric"
    random_factor: Literal["A", "B"] = "A"
    distribution: Literal["gaussian", "orthogonal"] = "orthogonal"


# ------------------------------------------------------------------------------------------ pure maths
def sketch_fan(shape: tuple[int, ...], factor: str) -> int:
    """The length of the vectors a random factor projects onto: ``A``'s rows (``prod(shape[1:])``: ``in``, or
    ``in / groups * kh * kw`` for a convolution) or ``B``'s columns (``shape[0]``: ``out``)."""
    return math.prod(shape[1:]) if factor == "A" else shape[0]


def draw_sketch(shape: tuple[int, ...], factor: str, distribution: str, generator: torch.Generator) -> Tensor:
    """A random factor ``A`` ``(r, *fan)`` or ``B`` ``(out, r, ...)`` (on the CPU) whose ``r`` sketch vectors (``A``'s
    rows, ``B``'s columns) are (near-)orthonormal.

    ``gaussian``: i.i.d. ``N(0, 1 / fan)``, so ``E[A A^T] = I_r`` (``E[B^T B] = I_r``); ``orthogonal``: exactly
    orthonormal (Haar-random); ``kaiming``: uniform on ``[-1/sqrt(fan), 1/sqrt(fan)]`` (for ``A``, LoRA's own
    Kaiming-uniform init), ``E[A A^T] = I_r / 3``. See :mod:`edgetune.adapters.rac_lora` for why this scale.
    """
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    fan = sketch_fan(shape, factor)
    if distribution == "gaussian":
        return torch.empty(shape).normal_(0.0, fan**-0.5, generator=generator)
    if distribution == "kaiming":
        return torch.empty(shape).uniform_(-(fan**-0.5), fan**-0.5, generator=generator)
    if distribution == "orthogonal":  # orthonormal rows of (r, fan) for A, columns of (out, r) for B
        return draw_factor(shape, "orthogonal", generator)
    raise ValueError(f"unknown sketch distribution {distribution!r}; use gaussian, orthogonal or kaiming")


def sketch_pair(info: LayerInfo, rank: int, random_factor: str, distribution: str, generator: torch.Generator
                ) -> tuple[Tensor, Tensor]:
    """``(A, B)``: ``random_factor`` drawn by :func:`draw_sketch`, the other zeros (so ``B A = 0``)."""
    sa, sb = factor_shapes(info, rank)
    if random_factor == "A":
        return draw_sketch(sa, "A", distribution, generator), torch.zeros(sb)
    return torch.zeros(sa), draw_sketch(sb, "B", distribution, generator)


# ------------------------------------------------------------------------------------------ module
class AsymmetricAdapter(LoraAdapter):
    """LoRA whose ``random_factor`` is a frozen random sketch; only the other factor trains."""

    frozen = ("A",)

    def __init__(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator,
                 reference: Tensor | None = None) -> None:
        super().__init__(info, cfg, generator, reference)
        self.frozen = (getattr(cfg, "random_factor", "A"),)
        self.lora_A.requires_grad_("A" not in self.frozen)
        self.lora_B.requires_grad_("B" not in self.frozen)

    def init_factors(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return sketch_pair(info, cfg.rank, getattr(cfg, "random_factor", "A"),
                           getattr(cfg, "distribution", "orthogonal"), generator)


ADAPTERS.add("asymmetric", AsymmetricAdapter, config=AsymmetricConfig,
             summary="asymmetric LoRA (Zhu et al. 2024): A random and frozen, only B trained")
