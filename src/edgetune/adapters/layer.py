"""``AdapterLayer``: a wrapper that holds a base layer and any number of named adapters on it.

``forward(x) = base(x)`` passed through each active, unmerged adapter in turn: an adapter module gets the
layer, the input and the output so far, and returns the new output (LoRA adds ``scale * B A x``; DoRA
rescales). The base layer's parameters stay where they were under ``base_layer`` (as in PEFT), so the
module path of a wrapped layer is unchanged and its adapter's tensors sit at ``<path>.adapters.<name>.*``.

What an adapter needs to know about the layer is a :class:`LayerInfo`: its kind (``linear``, ``conv2d``,
``embedding``), the shape of its weight, its convolution geometry, and whether its weight can take a merge.
A ``linear`` layer is ``nn.Linear`` or any module with integer ``in_features`` / ``out_features`` mapping
``(..., in)`` to ``(..., out)``, such as edgetune's ``SparseLinear`` (reached through that protocol, not an
import): adapters train on it, but merging into its sparse storage would make it dense, so it refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from edgetune.core.errors import ConfigError

__all__ = ["AdapterLayer", "LayerInfo", "layer_info"]


@dataclass(frozen=True)
class LayerInfo:
    """What an adapter sees of its base layer.

    kind: ``linear`` (weight ``(out, in)``), ``conv2d`` (weight ``(out, in / groups, kh, kw)``) or
    ``embedding`` (weight ``(num_embeddings, dim)``). in_features / out_features: for an embedding, the
    number of embeddings and the embedding dimension. mergeable: the layer has a dense ``weight`` to merge into.
    """

    kind: str
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: Any = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    mergeable: bool = True
    type_name: str = ""


def layer_info(module: nn.Module) -> LayerInfo | None:
    """The :class:`LayerInfo` of ``module``, or None when no adapter kind fits it."""
    name = type(module).__name__
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":  # the adapter's own convolution pads with zeros
            return None
        return LayerInfo("conv2d", module.in_channels, module.out_channels, tuple(module.kernel_size),
                         tuple(module.stride), module.padding, tuple(module.dilation), module.groups, type_name=name)
    if isinstance(module, nn.Embedding):
        return LayerInfo("embedding", module.num_embeddings, module.embedding_dim, type_name=name)
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", module.in_features, module.out_features, type_name=name)
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int) and not isinstance(module, AdapterLayer):
        w = getattr(module, "weight", None)
        dense = isinstance(w, Tensor) and tuple(w.shape) == (fout, fin)
        return LayerInfo("linear", fin, fout, mergeable=dense, type_name=name)
    return None


class AdapterLayer(nn.Module):
    """A base layer plus named adapters (``adapters``), of which ``active`` ones apply, in order.

    ``merged`` lists adapters whose update sits inside the base weight (they are skipped in forward);
    ``disabled`` makes the layer its base (set by :func:`edgetune.adapters.disable_adapters`).
    """

    def __init__(self, base: nn.Module, info: LayerInfo) -> None:
        super().__init__()
        self.base_layer = base
        self.info = info
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    # the base layer's attributes that surrounding code reads (HF reads .weight for tied embeddings, dtype...)
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        return self.info.in_features

    @property
    def out_features(self) -> int:
        return self.info.out_features

    def base_weight(self) -> nn.Parameter:
        """The dense weight adapters merge into; a clear error for layers that have none."""
        if not self.info.mergeable:
            raise ConfigError(
                f"this {self.info.type_name} has no dense weight to merge an adapter into (merging would turn its "
                "sparse storage dense); keep the adapter unmerged, or convert the layer to nn.Linear first")
        return self.base_layer.weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        for name in self.active:
            if name not in self.merged:
                y = self.adapters[name](self, x, y)
        return y

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            raise ConfigError(f"adapter {name!r} is already merged into this layer; merging it twice would add its "
                              "update twice. Call unmerge_ first, or skip the second merge")
        self.adapters[name].merge_into(self)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            raise ConfigError(f"adapter {name!r} is not merged into this layer, so there is nothing to unmerge")
        # merges are undone in reverse order (DoRA's rescaling does not commute with the others)
        later = self.merged[self.merged.index(name) + 1:]
        for other in reversed(later):
            self.adapters[other].unmerge_from(self)
        self.adapters[name].unmerge_from(self)
        self.merged.remove(name)
        for other in later:
            self.adapters[other].merge_into(self)

    def extra_repr(self) -> str:
        return f"kind={self.info.kind}, active={self.active}, merged={self.merged}"
