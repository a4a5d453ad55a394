"""RAC-LoRA (Malinovsky, Michieli et al. 2024, "Randomized Asymmetric Chain of LoRA: The First Meaningful
Theoretical Framework for Low-Rank Adaptation").

A chain (:mod:`edgetune.adapters.chain`) whose every link draws one factor afresh at random and freezes it, and
trains the other from zero: the *right sketch* (``A`` random, ``B`` trained: the update ``B A`` lives in the
row space of ``A``) or the *left sketch* (``B`` random, ``A`` trained). After the link its product is folded in
and a new link draws new sketches. Each link is then a gradient method on the full weight restricted to a random
rank-``r`` subspace, and the chain converges to the full-parameter fine-tuning (FPFT) solution of a smooth
problem, at a rate set by ``lambda_min(E[H])`` with ``H = A^T (A A^T)^+ A`` the projection onto the sketch
(``B (B^T B)^+ B^T`` for the left sketch); plain LoRA, asymmetric LoRA and COLA carry no such guarantee.

Scale of the random factor (``distribution``, :func:`edgetune.adapters.asymmetric.draw_sketch`). Gaussian and
Haar-orthogonal sketches are rotation invariant, so ``E[H] = (r / n) I`` with ``n`` the sketched dimension
(``in`` for ``A``, ``out`` for ``B``): the best-conditioned expected projection there is, and what the rate
needs. ``H`` does not depend on the sketch's scale, but the steps do: a gradient step on ``B`` moves the weight
by ``-lr * s^2 * G A^T A``. We draw the sketch with unit-scale directions, ``N(0, 1 / n)`` entries
(``E[A A^T] = I_r``) or exactly orthonormal rows, so that ``E[A^T A] = E[H]`` and ``A^T A`` is close to the
projection itself: a link takes (``s^2`` times) the FPFT step restricted to the sketched subspace, whatever the
layer's width. LoRA's ``N(0, 1 / r)`` init would instead multiply every step by ``n / r`` (hundreds for a
transformer layer), and LoRA's Kaiming-uniform ``A`` (``kaiming`` here) by ``1 / 3``.

``random_factor="alternate"`` switches sketch per link (``A`` random in even links, ``B`` in odd ones). The
training loop builds its optimizer once, from the parameters that have ``requires_grad`` when the adapter is
added, so in this mode both factors are trainable parameters for the whole chain; in each link
:class:`edgetune.adapters.chain.ChainCallback` sets the frozen factor's ``.grad`` to None in ``after_backward``
and the optimizer (SGD, Adam, AdamW: they skip parameters without a gradient, weight decay included) leaves it
unchanged. Its gradient is still computed (wasted work); with ``A`` or ``B`` the frozen factor has
``requires_grad=False`` and costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from edgetune.adapters.asymmetric import sketch_pair
from edgetune.adapters.chain import ChainAdapter, LinkPolicy, chain_callbacks
from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import LayerInfo

__all__ = ["RacLoraConfig", "SketchLinks", "random_factor_of"]


class RacLoraConfig(AdapterConfig):
    """RAC-LoRA (Malinovsky, Michieli et al. 2024).

    links: number of links; the chain approaches the FPFT solution as links accrue (rate ``~ r / n`` per link on
        a well-conditioned problem), so use many more than COLA's few.
    steps_per_link: optimizer steps per link; None: ``total_steps // links``.
    random_factor: the factor drawn at random and frozen in each link: ``A`` (right sketch, the default),
        ``B`` (left sketch), or ``alternate`` (``A`` in even links, ``B`` in odd ones).
    distribution: how the random factor is drawn: ``gaussian`` (``N(0, 1/n)``), ``orthogonal``
        (orthonormal sketch vectors) or ``kaiming`` (LoRA's uniform init); see the module docstring.
    """

    method: Literal["rac_lora"] = "rac_lora"
    links: int = Field(default=8, ge=1)
    steps_per_link: int | None = Field(default=None, ge=1)
    random_factor: Literal["A", "B", "alternate"] = "A"
    distribution: Literal["gaussian", "orthogonal", "kaiming"] = "gaussian"

    def link_policy(self) -> LinkPolicy:
        return SketchLinks(self.random_factor, self.distribution)


def random_factor_of(mode: str, link: int) -> str:
    """The factor drawn at random (and frozen) in ``link``: ``mode`` itself, or ``A``/``B`` alternating."""
    return ("A", "B")[link % 2] if mode == "alternate" else mode


@dataclass(frozen=True)
class SketchLinks:
    """RAC-LoRA's link policy: a fresh random sketch per link, the other factor trained from zero."""

    random_factor: str = "A"
    distribution: str = "gaussian"

    @property
    def trainable(self) -> tuple[str, ...]:
        return {"A": ("B",), "B": ("A",)}.get(self.random_factor, ("A", "B"))

    def draw(self, info: LayerInfo, cfg: AdapterConfig, link: int, generator: torch.Generator
             ) -> tuple[Tensor, Tensor]:
        return sketch_pair(info, cfg.rank, random_factor_of(self.random_factor, link), self.distribution, generator)

    def frozen(self, link: int) -> tuple[str, ...]:
        return (random_factor_of(self.random_factor, link),)


ADAPTERS.add("rac_lora", ChainAdapter, config=RacLoraConfig, callbacks=chain_callbacks,
             summary="RAC-LoRA (Malinovsky, Michieli et al. 2024): a chain of random frozen sketches, the other "
                     "factor trained; converges to full fine-tuning")
