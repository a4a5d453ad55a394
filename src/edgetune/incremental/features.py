"""Frozen backbones as feature extractors: the features a model hands its classification head, or a pooled
feature map.

:class:`Backbone` wraps any module and turns batches of inputs into features ``(N, D)``, in eval mode, without
gradients, in batches:

- ``layer=None``: the input of the model's head (found by name: ``head``, the :class:`LoadedModel`'s head, or
  ``classifier.1`` for MobileNetV2), captured by a forward pre-hook, so edgetune models, torchvision-style
  networks and Hugging Face classifiers all give the features their head sees. A model without a head (task
  ``features``, e.g. MiniLM loaded as a sentence encoder) gives its output.
- ``layer="features"`` (any module name) with ``orders=(1, 2)``: that module's output, a ``(B, C, H, W)`` map
  or ``(B, L, D)`` tokens, moment-pooled (:func:`~edgetune.incremental.pooling.moment_pool`: mean, std, ...)
  over positions; for dict batches with an ``attention_mask`` the padding is left out, and ``skip_first=True``
  leaves out the first token ([CLS]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.data.batches import TARGET_KEY, BatchTransform, batch_inputs, take, to_device
from edgetune.incremental.pooling import check_orders, moment_pool

__all__ = ["Backbone", "find_head"]

_HEAD_NAMES = ("head", "classifier.1", "classifier", "fc", "score")


def find_head(model: nn.Module, head: str | None = None) -> str | None:
    """The qualified name of ``model``'s classification head: ``head`` if given, else the first of
    head / classifier.1 / classifier / fc / score that exists; None when there is none."""
    names = dict(model.named_modules())
    if head is not None:
        if head not in names:
            raise ConfigError(f"the model has no module {head!r} to take features from; its top-level modules "
                              f"are {', '.join(n for n, _ in model.named_children())}")
        return head
    return next((n for n in _HEAD_NAMES if n in names and n), None)


class Backbone:
    """A frozen feature extractor: ``backbone(batch) -> (B, D)``, ``backbone.extract(split) -> (z, y)``.

    model: the network; head: name of its classification head (default: found by :func:`find_head`);
    layer / orders: pool this module's output with these moment orders instead (see the module docstring);
    block_norm: L2-normalize each order's block before concatenating (equal say for every order in a cosine);
    transform: the per-batch preprocessing the model expects (a data bundle's or a LoadedModel's);
    device, batch_size: where and how many examples at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        head: str | None = None,
        layer: str | None = None,
        orders: Sequence[int] | None = None,
        skip_first: bool = False,
        block_norm: bool = False,
        transform: BatchTransform | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.transform = transform
        self.batch_size = batch_size
        self.skip_first = skip_first
        self.block_norm = block_norm
        self.orders = check_orders(orders) if orders is not None else None
        modules = dict(model.named_modules())
        if layer is not None and layer not in modules:
            close = [n for n in modules if n and n.split(".")[-1] == layer.split(".")[-1]][:5]
            raise ConfigError(f"the model has no module {layer!r} to pool; "
                              f"{'similar: ' + ', '.join(close) if close else 'see model.named_modules()'}")
        if layer is None and self.orders is not None:
            raise ConfigError("orders needs layer: name the module whose feature map is moment-pooled, e.g. "
                              "layer=features for MobileNetV2")
        self.layer = layer
        self.head = None if layer is not None else find_head(model, head)

    def describe(self) -> str:
        if self.layer is not None:
            return f"moments {list(self.orders or (1,))} of {self.layer}"
        return f"input of {self.head}" if self.head else "model output"

    @torch.no_grad()
    def __call__(self, batch: Any) -> Tensor:
        """Features ``(B, D)`` of one batch (a list ``[x, ..., y]``, a dict batch, or a bare input tensor)."""
        if isinstance(batch, Tensor):
            batch = [batch, torch.zeros(len(batch), dtype=torch.int64)]
        batch = to_device(batch, self.device)
        if self.transform is not None:
            batch = self.transform(batch)
        args, kwargs = batch_inputs(batch)
        captured: list[Tensor] = []
        target = self.layer or self.head
        handle = None
        if target is not None:
            module = dict(self.model.named_modules())[target]
            if self.layer is not None:
                handle = module.register_forward_hook(lambda _m, _i, out: captured.append(_first(out)))
            else:
                handle = module.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)
            if handle is not None:
                handle.remove()
        if target is None:
            feats = _first(out)
        else:
            if not captured:
                raise ShapeError(f"module {target!r} was not called by the model's forward; name another layer")
            feats = captured[0]
        if self.layer is not None:
            feats = self._pool(feats, batch)
        if feats.ndim != 2:
            raise ShapeError(f"features from {self.describe()} have shape {tuple(feats.shape)}, not (B, D): pool a "
                             "feature map with layer=... and orders=[1, 2]")
        return feats.float()

    def _pool(self, h: Tensor, batch: Any) -> Tensor:
        orders = self.orders or (1,)
        if h.ndim == 4:  # (B, C, H, W)
            return moment_pool(h, (2, 3), orders, block_norm=self.block_norm)
        if h.ndim == 3:  # (B, L, D) tokens
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            mask = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.clone()
            if self.skip_first:
                mask[:, 0] = 0
            return moment_pool(h, 1, orders, mask, block_norm=self.block_norm)
        raise ShapeError(f"cannot pool {self.layer!r} output of shape {tuple(h.shape)}: expected (B, C, H, W) or "
                         "(B, L, D)")

    def extract(self, split: Any) -> tuple[Tensor, Tensor]:
        """Features ``(N, D)`` (float32, CPU) and labels ``(N,)`` of a whole split (TensorDataset, DictDataset)."""
        n = len(split)
        if n == 0:
            raise ShapeError("the split is empty: there is nothing to extract features from")
        zs, ys = [], []
        for i in range(0, n, self.batch_size):
            batch = take(split, torch.arange(i, min(n, i + self.batch_size)))
            ys.append((batch[TARGET_KEY] if isinstance(batch, dict) else batch[-1]).cpu())
            zs.append(self(batch).cpu())
        return torch.cat(zs), torch.cat(ys).long()


def _first(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    raise ShapeError(f"cannot take features from a {type(out).__name__} output")
