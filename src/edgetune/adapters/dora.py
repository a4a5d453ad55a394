"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The adapted weight is split into a magnitude and a direction; a LoRA moves the direction, a trained vector ``m``
sets the magnitude of each output unit::

    W' = m * (W + s B A) / ||W + s B A||

The norm is taken per output unit over its inputs, as PEFT takes it: over the row of a ``Linear`` weight
``(out, in)``, over ``(in / groups, kh, kw)`` of a ``Conv2d`` weight, and for an ``nn.Embedding`` (weight
``(num, dim)``) per embedding dimension over the vocabulary; ``m`` has one entry per output unit (``(out,)``, or
``(dim,)``) and starts at ``||W||``, so the adapted layer starts equal to its base. As the paper proposes (its
Sec. 4.3), the norm is detached from the backward: it follows ``B A`` in the forward but is a constant for the
gradient, so the backward keeps no ``(out, in)`` activation of the norm (PEFT does the same).

With the layer's output ``y = W x + bias`` the forward is ``y + (m / n - 1) * (y - bias) + (m / n) * s B A x``: the
bias is left out of the rescaling and the base output is not recomputed. Dropout acts on the LoRA branch's input
only (PEFT, with dropout in training, recomputes ``W dropout(x)`` instead; both agree outside training). When DoRA
sits after other unmerged adapters on one layer, ``y`` holds their outputs and they are rescaled too; give DoRA a
layer of its own. A merge writes ``W'`` into the weight and keeps the norm it used (``(out,)``), so an unmerge
restores ``W`` up to float rounding. Output units whose weight row is all zero have ``m = 0`` and stay zero.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import LayerInfo
from edgetune.adapters.lora import LoraAdapter
from edgetune.core.errors import ConfigError

__all__ = ["DoraAdapter", "DoraConfig", "dora_norm", "dora_weight", "scale_output", "scale_weight"]

_EPS = 1e-12  # floor of a norm (an all-zero output unit): m / n stays finite


class DoraConfig(AdapterConfig):
    """DoRA (Liu et al. 2024): a trained magnitude per output unit times the LoRA-updated, normalised direction."""

    method: Literal["dora"] = "dora"


# ------------------------------------------------------------------------------------------ pure maths
def dora_norm(info: LayerInfo, weight: Tensor) -> Tensor:
    """The norm of each output unit of a weight in its layer's shape: ``(out,)`` (``(dim,)`` for an embedding)."""
    if info.kind == "embedding":  # (num, dim): per embedding dimension, over the vocabulary
        return torch.linalg.vector_norm(weight, dim=0)
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)  # (out, in) or (out, in / groups * kh * kw)


def scale_weight(info: LayerInfo, weight: Tensor, f: Tensor) -> Tensor:
    """Each output unit's weights times its ``f`` entry (``f``: ``(out,)``)."""
    if info.kind == "embedding":
        return weight * f.view(1, -1)
    return weight * f.view(-1, *([1] * (weight.dim() - 1)))


def scale_output(info: LayerInfo, y: Tensor, f: Tensor) -> Tensor:
    """Each output unit of a layer output times its ``f`` entry: ``(..., out)``, or ``(N, out, H, W)`` for a conv."""
    if info.kind == "conv2d":
        return y * f.view(-1, 1, 1)
    return y * f


def dora_weight(info: LayerInfo, weight: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """``m * (W + dW) / ||W + dW||`` per output unit (``delta`` = ``s B A`` in the weight's shape)."""
    v = weight + delta
    return scale_weight(info, v, magnitude / dora_norm(info, v).clamp_min(_EPS))


# ------------------------------------------------------------------------------------------ module
class DoraAdapter(LoraAdapter):
    """A LoRA on the direction plus ``lora_magnitude_vector`` ``(out,)`` (PEFT's tensor name), set from the base
    weight when the adapter is attached to its layer."""

    def __init__(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator,
                 reference: Tensor | None = None) -> None:
        if not info.mergeable:
            raise ConfigError(f"DoRA needs the dense weight of the layer for its norm, and this {info.type_name} has "
                              "none (a sparse layer?); use lora on it, or exclude it from adapter.targets")
        super().__init__(info, cfg, generator, reference)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(info.out_features, **self._factory))
        self.register_buffer("merged_norm", None, persistent=False)  # the norm a merge used, for its unmerge

    @torch.no_grad()
    def attach(self, base: nn.Module) -> None:
        """Set ``m = ||W + s B A||`` (``= ||W||`` at the start) from the base layer's weight."""
        self.lora_magnitude_vector.copy_(self.weight_norm(base.weight))

    @property
    def magnitude(self) -> Tensor:
        """The magnitude vector ``m`` (detached), one entry per output unit."""
        return self.lora_magnitude_vector.detach()

    @torch.no_grad()
    def weight_norm(self, weight: Tensor) -> Tensor:
        """``||W + s B A||`` per output unit, in float32, without gradient (the paper's detached norm)."""
        return dora_norm(self.info, weight.float() + super().delta_weight().float())

    def _factor(self, norm: Tensor) -> Tensor:
        return self.lora_magnitude_vector.float() / norm.clamp_min(_EPS)

    def forward(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        f = self._factor(self.weight_norm(layer.weight)).to(y.dtype)
        bias = layer.bias
        base = y if bias is None else y - (bias.view(-1, 1, 1) if self.info.kind == "conv2d" else bias).to(y.dtype)
        return y + scale_output(self.info, base, f - 1) + scale_output(self.info, self.update(x).to(y.dtype), f)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        """``W' - W``: what this adapter changes in the base weight ``weight`` (DoRA's change depends on it)."""
        if weight is None:
            raise ConfigError("DoRA's change to a weight depends on that weight: call delta_weight(layer.weight); "
                              "as_lora() gives the LoRA of the direction and .magnitude the magnitudes")
        w = weight.float()
        return dora_weight(self.info, w, super().delta_weight().float(), self.lora_magnitude_vector.float()) - w

    def merge_into(self, layer: nn.Module) -> None:
        w = layer.base_weight()
        norm = self.weight_norm(w)
        v = w.float() + super().delta_weight().float()
        w.copy_(scale_weight(self.info, v, self._factor(norm)).to(w.dtype))
        self.merged_norm = norm

    def unmerge_from(self, layer: nn.Module) -> None:
        if self.merged_norm is None:
            raise ConfigError("this DoRA adapter has no record of its merge (the model was reloaded or copied while "
                              "merged?), so the base weight cannot be recovered; reload the base model instead")
        w = layer.base_weight()
        v = scale_weight(self.info, w.float(), 1 / self._factor(self.merged_norm))
        w.copy_((v - super().delta_weight().float()).to(w.dtype))
        self.merged_norm = None

    def as_lora(self) -> tuple[Tensor, Tensor, float]:
        """``(A, B, scale)`` of the direction's LoRA; a PEFT file adds :attr:`magnitude` as ``lora_magnitude_vector``."""
        return self.lora_A.detach(), self.lora_B.detach(), self.scale


ADAPTERS.add("dora", DoraAdapter, config=DoraConfig,
             summary="DoRA (Liu et al. 2024): trained magnitude times the LoRA-updated, normalised weight direction")
