"""LoRA-FA: LoRA with a frozen A (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large
Language Models Fine-tuning").

``W' = W + s * B @ A`` as in LoRA, but ``A`` ``(r, in)`` stays at its random initialisation and only ``B``
``(out, r)`` (zeros at the start) trains. B's gradient is ``s * grad_y^T @ h`` with ``h = A x`` ``(..., r)``, so
the backward needs the r-dimensional projection, not the layer's input ``x`` ``(..., in)``: the adapter's
activation memory falls by about ``in / r`` per layer.

What PyTorch's autograd saves on its own (measured with ``torch.autograd.graph.saved_tensors_hooks``,
torch 2.13): ``F.linear(x, A)`` with ``A`` frozen keeps only ``A``, not ``x`` (the input is saved only when the
weight needs a gradient); ``F.conv2d(x, A)`` keeps ``x`` whatever ``A`` needs; and dropout keeps its mask, a
full-size float tensor on the CPU (a bool one on CUDA). :func:`frozen_projection` is therefore a small autograd
Function: it saves ``A`` and, under dropout, an integer seed from which the backward draws the same mask again,
so no tensor of the input's size outlives the forward on any of these paths. It never gives ``A`` a gradient,
so ``A`` cannot move even if someone sets ``requires_grad`` on it.

Embeddings (integer inputs: no activation to spare) and grouped convolutions (whose LoRA update is computed
through the merged weight) use LoRA's own update with ``A`` detached; there the input is kept as in LoRA.
On an embedding ``A`` ``(r, num)`` is drawn N(0, 1) and ``B`` ``(dim, r)`` starts at zero (the reverse of
LoRA's embedding layout, which would leave a frozen all-zero ``A``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import LayerInfo
from edgetune.adapters.lora import LoraAdapter, draw_factor, factor_shapes, lora_update

__all__ = ["LoraFaAdapter", "LoraFaConfig", "draw_seed", "dropout_keep", "frozen_projection", "lora_fa_update"]


class LoraFaConfig(AdapterConfig):
    """LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
    Fine-tuning"): A frozen at its random initialisation, only B trained; the backward keeps the rank-r
    projection ``A x`` instead of the input ``x``.

    init_a: how the frozen A is drawn on linear and conv layers (kaiming: PEFT's Kaiming-uniform; gaussian:
    N(0, 1/r); orthogonal: orthonormal rows). Embeddings draw A from N(0, 1).
    """

    method: Literal["lora_fa"] = "lora_fa"
    init_a: Literal["kaiming", "gaussian", "orthogonal"] = "kaiming"


# ------------------------------------------------------------------------------------------ pure maths
def draw_seed() -> int:
    """A seed for one dropout mask, drawn from torch's global CPU generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_keep(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """The keep-mask ``(shape)`` (bool) of dropout with probability ``p``, the same every time for one ``seed``."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) >= p


def _conv_padding(info: LayerInfo) -> tuple[int, int] | None:
    """The conv's padding as two integers (``valid`` / symmetric ``same`` resolved); None when asymmetric."""
    pad = info.padding
    if isinstance(pad, int):
        return pad, pad
    if pad == "valid":
        return 0, 0
    if pad == "same":
        totals = [d * (k - 1) for d, k in zip(info.dilation, info.kernel_size)]
        return (totals[0] // 2, totals[1] // 2) if all(t % 2 == 0 for t in totals) else None
    return int(pad[0]), int(pad[1])


def _projects(info: LayerInfo) -> bool:
    """Whether :func:`frozen_projection` handles this layer (linear, or a conv with groups 1 and known padding)."""
    return info.kind == "linear" or (info.kind == "conv2d" and info.groups == 1 and _conv_padding(info) is not None)


def _project(info: LayerInfo, x: Tensor, a: Tensor) -> Tensor:
    """``A x``: ``(..., in) -> (..., r)``, or ``(N, C, H, W) -> (N, r, H', W')`` for a convolution."""
    if info.kind == "linear":
        return F.linear(x, a)
    return F.conv2d(x, a, None, info.stride, _conv_padding(info), info.dilation)


def _project_back(info: LayerInfo, grad_h: Tensor, a: Tensor, x_shape: torch.Size) -> Tensor:
    """``A^T grad_h``: the gradient of :func:`_project` with respect to its input, of shape ``x_shape``."""
    if info.kind == "linear":
        return grad_h @ a  # (..., r) @ (r, in) -> (..., in)
    return torch.nn.grad.conv2d_input(x_shape, a, grad_h, info.stride, _conv_padding(info), info.dilation)


class _FrozenProjection(torch.autograd.Function):
    """``h = A (keep * x / (1 - p))`` saving only ``A`` and the mask's seed; no gradient for ``A``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, info: LayerInfo, p: float, seed: int | None) -> Tensor:
        if seed is not None:
            x = x * dropout_keep(x.shape, p, seed, x.device) * (1.0 / (1.0 - p))
        ctx.save_for_backward(a)
        ctx.info, ctx.p, ctx.seed, ctx.x_shape = info, p, seed, x.shape
        return _project(info, x, a)

    @staticmethod
    def backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (a,) = ctx.saved_tensors
        grad_x = _project_back(ctx.info, grad_h, a, ctx.x_shape)
        if ctx.seed is not None:
            grad_x = grad_x * dropout_keep(ctx.x_shape, ctx.p, ctx.seed, grad_x.device) * (1.0 / (1.0 - ctx.p))
        return grad_x, None, None, None, None


def frozen_projection(info: LayerInfo, x: Tensor, a: Tensor, p: float = 0.0, seed: int | None = None) -> Tensor:
    """``A dropout(x)`` for a linear layer (``(..., in) -> (..., r)``) or a groups-1 convolution
    (``(N, C, H, W) -> (N, r, H', W')``), differentiable in ``x`` only.

    ``seed`` (with ``0 < p < 1``) turns dropout on: the keep-mask is :func:`dropout_keep` of that seed, drawn
    again in the backward instead of being stored. The backward keeps ``A`` and nothing of ``x``'s size.
    """
    return _FrozenProjection.apply(x, a, info, p, seed if p > 0 else None)


def lora_fa_update(info: LayerInfo, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float = 0.0,
                   seed: int | None = None) -> Tensor:
    """``s * B A dropout(x)`` with ``A`` frozen: the adapter's additive output, of the base layer's output shape."""
    h = frozen_projection(info, x, a, p, seed) * scale  # (..., r) or (N, r, H', W'): what B's gradient keeps
    return F.linear(h, b) if info.kind == "linear" else F.conv2d(h, b)  # the scale on r channels, not on out


# ------------------------------------------------------------------------------------------ module
class LoraFaAdapter(LoraAdapter):
    """LoRA-FA on one layer: ``lora_A`` frozen (no gradient ever), ``lora_B`` trained."""

    frozen = ("A",)

    def init_factors(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A random, B zeros on every kind (so ``B A = 0`` at the start and the frozen A is not all zero)."""
        sa, sb = factor_shapes(info, cfg.rank)
        how = "normal" if info.kind == "embedding" else getattr(cfg, "init_a", "kaiming")
        return draw_factor(sa, how, generator), draw_factor(sb, "zeros", generator)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def update(self, x: Tensor) -> Tensor:
        """``s * B A dropout(x)``; only B's gradient flows, and only ``A x`` is kept for it."""
        if not _projects(self.info):
            return lora_update(self.info, self.dropout(x), self.lora_A.detach(), self.lora_B, self.scale,
                               padding_idx=self.padding_idx)
        p = self.dropout_p if self.training else 0.0
        return lora_fa_update(self.info, x, self.lora_A, self.lora_B, self.scale, p, draw_seed() if p > 0 else None)


ADAPTERS.add("lora_fa", LoraFaAdapter, config=LoraFaConfig,
             summary="LoRA-FA (Zhang et al. 2023): frozen random A, only B trains; keeps A x, not x, for backward")
