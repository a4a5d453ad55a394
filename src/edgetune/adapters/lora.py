"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

``W' = W + s * B @ A`` with ``A`` ``(r, in)`` Kaiming-uniform, ``B`` ``(out, r)`` zeros (so the adapted model
starts equal to the base) and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023).
Dropout acts on the adapter's input. On a ``Conv2d`` ``A`` is a convolution ``(r, in / groups, kh, kw)`` with the
base's geometry and ``B`` a 1x1 convolution ``(out, r, 1, 1)``; on an ``nn.Embedding`` ``A`` is ``(r, num)``
(zeros) and ``B`` ``(dim, r)`` (normal), as PEFT lays them out, so the update is a lookup in ``A^T`` times
``B^T``. :class:`LoraAdapter` is also the base of every variant (one level of inheritance).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import LayerInfo
from edgetune.core.errors import ConfigError

__all__ = ["LoraAdapter", "LoraConfig", "draw_factor", "factor_shapes", "lora_delta_weight", "lora_update",
           "max_rank"]


class LoraConfig(AdapterConfig):
    """LoRA (Hu et al. 2021). init_a: how A is drawn (kaiming: PEFT's Kaiming-uniform; gaussian: N(0, 1/r))."""

    method: Literal["lora"] = "lora"
    init_a: Literal["kaiming", "gaussian"] = "kaiming"


# ------------------------------------------------------------------------------------------ pure maths
def max_rank(info: LayerInfo) -> int:
    """The largest rank a layer allows: ``min(out, fan_in)`` of its weight seen as a matrix."""
    if info.kind == "conv2d":
        fan_in = info.in_features // info.groups * info.kernel_size[0] * info.kernel_size[1]
        return min(info.out_features, fan_in)
    return min(info.in_features, info.out_features)


def factor_shapes(info: LayerInfo, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(A, B)`` for a layer (PEFT's layout)."""
    if info.kind == "conv2d":
        return (rank, info.in_features // info.groups, *info.kernel_size), (info.out_features, rank, 1, 1)
    if info.kind == "embedding":
        return (rank, info.in_features), (info.out_features, rank)
    return (rank, info.in_features), (info.out_features, rank)


def draw_factor(shape: tuple[int, ...], how: str, generator: torch.Generator) -> Tensor:
    """A random factor on the CPU: ``kaiming`` (uniform, a = sqrt(5), fan-in = prod(shape[1:])), ``gaussian``
    (N(0, 1 / shape[0])), ``orthogonal`` (orthonormal rows or columns), or ``zeros``."""
    t = torch.empty(shape)
    if how == "zeros":
        return t.zero_()
    if how == "kaiming":
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    if how == "gaussian":
        return t.normal_(0.0, 1.0 / math.sqrt(shape[0]), generator=generator)
    if how == "orthogonal":
        flat = t.view(shape[0], -1)
        nn.init.orthogonal_(flat, generator=generator)
        return t
    if how == "normal":
        return t.normal_(0.0, 1.0, generator=generator)
    raise ValueError(f"unknown factor distribution {how!r}")


def lora_delta_weight(info: LayerInfo, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``s * B @ A`` in the base weight's shape: ``(out, in)``, ``(out, in / groups, kh, kw)`` or ``(num, dim)``."""
    if info.kind == "conv2d":
        return scale * (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
    if info.kind == "embedding":
        return scale * (b @ a).T
    return scale * (b @ a)


def lora_update(info: LayerInfo, x: Tensor, a: Tensor, b: Tensor, scale: float, *, padding_idx: int | None = None
                ) -> Tensor:
    """``s * B A x``: the adapter's additive output for an input ``x`` of the base layer (``(..., in)`` for a linear
    layer, ``(N, C, H, W)`` for a convolution, integer ids for an embedding)."""
    if info.kind == "linear":
        return F.linear(F.linear(x, a), b) * scale
    if info.kind == "embedding":
        return F.linear(F.embedding(x, a.T, padding_idx=padding_idx), b) * scale
    if info.groups == 1:
        h = F.conv2d(x, a, None, info.stride, info.padding, info.dilation)
        return F.conv2d(h, b) * scale
    return F.conv2d(x, lora_delta_weight(info, a, b, scale), None, info.stride, info.padding, info.dilation,
                    info.groups)


# ------------------------------------------------------------------------------------------ module
class LoraAdapter(nn.Module):
    """One LoRA on one layer: ``lora_A``, ``lora_B`` parameters and the scale.

    Subclasses change the initialisation (:meth:`init_factors`), which factors train (``frozen``), or the
    forward and merge (DoRA). ``forward(layer, x, y)`` returns the layer's new output.
    """

    #: factors that do not train ("A", "B"); set by variants
    frozen: tuple[str, ...] = ()

    def __init__(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator,
                 reference: Tensor | None = None) -> None:
        super().__init__()
        limit = max_rank(info)
        if cfg.rank > limit:
            raise ConfigError(f"rank {cfg.rank} is larger than this {info.type_name} ({info.kind} {info.in_features}"
                              f" -> {info.out_features}) allows ({limit}); lower adapter.rank to at most {limit}, or "
                              "exclude the layer")
        self.info, self.rank, self.scale = info, cfg.rank, cfg.scale
        self.padding_idx: int | None = None
        ref = reference if reference is not None else torch.empty(0)
        self._factory = {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else torch.float32}
        a, b = self.init_factors(info, cfg, generator)
        self.lora_A = nn.Parameter(a.to(**self._factory), requires_grad="A" not in self.frozen)
        self.lora_B = nn.Parameter(b.to(**self._factory), requires_grad="B" not in self.frozen)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and info.kind != "embedding" else nn.Identity()

    def init_factors(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(A, B)`` at the start: ``B A = 0`` so the adapted layer equals its base."""
        sa, sb = factor_shapes(info, cfg.rank)
        if info.kind == "embedding":
            return draw_factor(sa, "zeros", generator), draw_factor(sb, "normal", generator)
        return draw_factor(sa, getattr(cfg, "init_a", "kaiming"), generator), draw_factor(sb, "zeros", generator)

    def update(self, x: Tensor) -> Tensor:
        """The additive output ``s * B A dropout(x)``."""
        return lora_update(self.info, self.dropout(x), self.lora_A, self.lora_B, self.scale,
                           padding_idx=self.padding_idx)

    def forward(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return y + self.update(x).to(y.dtype)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        """``W' - W`` in the base weight's shape. ``weight``: the layer's current weight, for variants whose change
        depends on it (DoRA); LoRA's does not."""
        return lora_delta_weight(self.info, self.lora_A, self.lora_B, self.scale)

    def merge_into(self, layer: nn.Module) -> None:
        w = layer.base_weight()
        w.add_(self.delta_weight().to(w.dtype))

    def unmerge_from(self, layer: nn.Module) -> None:
        w = layer.base_weight()
        w.sub_(self.delta_weight().to(w.dtype))

    def as_lora(self) -> tuple[Tensor, Tensor, float]:
        """``(A, B, scale)`` in LoRA's layout that compute this adapter's current update (what a PEFT file holds).

        Variants whose trained state is not a plain pair (a chain's links, a gate, a sampled rank) return the
        equivalent plain LoRA, whose rank may differ from ``cfg.rank``.
        """
        return self.lora_A.detach(), self.lora_B.detach(), self.scale


ADAPTERS.add("lora", LoraAdapter, config=LoraConfig, summary="LoRA (Hu et al. 2021): W + (alpha/r) B A")
