"""Permutation specs of Git Re-Basin (see :mod:`edgetune.merging.rebasin`): which state-dict axes share one
permutation of hidden units, read from a model (edgetune's MLP, ``nn.Sequential`` stacks of Linear / Conv2d with
norms and activations between) or from a state dict's key pattern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from edgetune.core.errors import ConfigError
from edgetune.models.mlp import MLP

__all__ = ["PermutationSpec", "SpecChoice", "cnn_spec", "mlp_spec", "spec_from_model"]

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """Which state-dict axes share a permutation of hidden units.

    axes: state-dict key -> one entry per axis of that tensor: the name of the permutation acting on that axis, or
        None (not permuted). Keys not in ``axes`` are never permuted.
    sizes: permutation name -> its number of units ``n``. An axis of ``n * b`` entries (a Linear reading a flattened
        ``(C, H, W)`` map of ``n = C`` channels) is permuted in contiguous blocks of ``b = H * W``.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    sizes: Mapping[str, int]

    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name -> every ``(key, axis)`` it acts on."""
        out: dict[str, list[tuple[str, int]]] = {p: [] for p in self.sizes}
        for key, ax in self.axes.items():
            for i, p in enumerate(ax):
                if p is not None:
                    out[p].append((key, i))
        return out

    def check(self, sd: StateDict) -> None:
        """Raise :class:`ConfigError` unless every key and axis the spec names fits ``sd``."""
        for key, ax in self.axes.items():
            if key not in sd:
                raise ConfigError(f"the permutation spec names {key!r}, which the state dict lacks; build the spec "
                                  "from this model (spec_from_model, mlp_spec or cnn_spec)")
            t = sd[key]
            if t.ndim != len(ax):
                raise ConfigError(f"the permutation spec gives {len(ax)} axes for {key!r}, which has {t.ndim}")
            for i, p in enumerate(ax):
                if p is not None and (p not in self.sizes or t.shape[i] % self.sizes[p]):
                    raise ConfigError(f"axis {i} of {key!r} ({t.shape[i]} entries) does not fit permutation {p!r} "
                                      f"({self.sizes.get(p)} units); its size must be a multiple of the units")


@dataclass(frozen=True)
class _Layer:
    """One layer of a traced stack: ``keys`` are its floating state-dict keys (a weight layer's weight first)."""

    prefix: str
    kind: Literal["linear", "conv", "norm"]
    n_in: int
    n_out: int
    keys: tuple[str, ...]


_PASS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Mish, nn.Hardswish,
         nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d,
         nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # act on each unit alone (or pool within a channel)
_SUPPORTED = ("re-basin supports sequential MLP/CNN stacks (edgetune's MLP; nn.Sequential of Linear, Conv2d, "
              "BatchNorm, activation, pooling and Flatten layers); residual connections, attention and other custom "
              "modules are not: give a PermutationSpec by hand for those")


def _build(layers: Sequence[_Layer], where: str) -> PermutationSpec:
    """Chain the layers: each hidden weight layer's outputs get a permutation (named by its prefix), which also
    acts on its bias, on the norms after it and on the inputs of the next weight layer; the last layer's outputs
    and the first's inputs stay fixed."""
    heavy = [l for l in layers if l.kind != "norm"]
    if not heavy:
        raise ConfigError(f"{where}: no Linear or Conv2d weight found, so no hidden units to permute. {_SUPPORTED}")
    axes: dict[str, tuple[str | None, ...]] = {}
    sizes: dict[str, int] = {}
    cur: str | None = None  # the permutation of the features flowing between layers
    prev: _Layer | None = None
    for layer in layers:
        if layer.kind == "norm":
            if cur is None:  # on the inputs, or after the output layer: nothing to permute
                continue
            if layer.n_out != sizes[cur]:
                raise ConfigError(f"{where}: {layer.prefix!r} has {layer.n_out} features but follows {cur!r} with "
                                  f"{sizes[cur]} outputs. {_SUPPORTED}")
            axes.update({k: (cur,) for k in layer.keys})
            continue
        if prev is not None:
            flat = prev.kind == "conv" and layer.kind == "linear" and layer.n_in % prev.n_out == 0
            if (layer.n_in != prev.n_out and not flat) or (prev.kind == "linear" and layer.kind == "conv"):
                raise ConfigError(f"{where}: {layer.prefix!r} ({layer.kind}, {layer.n_in} inputs) cannot follow "
                                  f"{prev.prefix!r} ({prev.kind}, {prev.n_out} outputs). {_SUPPORTED}")
        out = None if layer is heavy[-1] else layer.prefix
        if out is not None:
            sizes[out] = layer.n_out
        axes[layer.keys[0]] = (out, cur) + (None, None) * (layer.kind == "conv")
        axes.update({k: (out,) for k in layer.keys[1:] if out is not None})
        cur, prev = out, layer
    return PermutationSpec({k: v for k, v in axes.items() if any(p is not None for p in v)}, sizes)


_SAFE_NAME = re.compile(r"(?:(?:.*\.)?(?:layers|norms)\.\d+|head|\d+(?:\.\d+)*)")


def _module_order(prefix: str) -> tuple[bool, list[tuple[int, int | str]]]:
    """Sort key restoring module order from sorted names: numbers compared as numbers (``2`` before ``10``), the
    ``head`` last. Only used where every name is one whose order it knows (:data:`_SAFE_NAME`)."""
    parts = [(0, int(p)) if p.isdigit() else (1, p) for p in prefix.split(".")]
    return prefix == "head" or prefix.endswith(".head"), parts


def _layers_from_state_dict(sd: StateDict, allow_conv: bool, where: str) -> list[_Layer]:
    """Layers read from the keys' module prefixes and shapes (2-D weight: Linear, 4-D: Conv2d, only 1-D: a norm)."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, v in sd.items():
        if v.is_floating_point() and v.ndim > 0:
            prefix, _, leaf = key.rpartition(".")
            groups.setdefault(prefix, {})[leaf] = v
    order = list(groups)
    if len(order) > 1 and list(sd) == sorted(sd):  # read from a safetensors file: the module order is lost
        unknown = [p for p in order if not _SAFE_NAME.fullmatch(p)]
        if unknown:
            raise ConfigError(f"{where}: the state dict's keys are sorted by name (as a safetensors file stores them), "
                              f"so the order of its layers is lost, and names like {unknown[0]!r} do not say it. Give "
                              "the models as modules (spec_from_model traces them), or a PermutationSpec built from "
                              "a module of the architecture (spec_from_model(model)) and rebasin_align(..., spec=...)")
        order.sort(key=_module_order)
    layers: list[_Layer] = []
    for prefix in order:
        params = groups[prefix]
        full = {leaf: f"{prefix}.{leaf}" if prefix else leaf for leaf in params}
        w = params.get("weight")
        if w is not None and w.ndim in (2, 4):
            if w.ndim == 4 and not allow_conv:
                raise ConfigError(f"{where}: {full['weight']!r} is a 4-D (conv) weight; mlp_spec reads stacks of "
                                  "Linear layers: use cnn_spec (spec: cnn)")
            others = [leaf for leaf in params if leaf != "weight"]
            if all(params[o].shape == (w.shape[0],) for o in others):
                kind: Literal["linear", "conv"] = "conv" if w.ndim == 4 else "linear"
                layers.append(_Layer(prefix, kind, w.shape[1], w.shape[0], tuple(full[k] for k in ["weight", *others])))
                continue
        elif all(v.ndim == 1 for v in params.values()) and len({v.shape for v in params.values()}) == 1:
            n = next(iter(params.values())).shape[0]
            layers.append(_Layer(prefix, "norm", n, n, tuple(full.values())))
            continue
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in params.items())
        raise ConfigError(f"{where}: cannot read module {prefix!r} ({shapes}) as a Linear, Conv2d or norm layer. "
                          f"{_SUPPORTED} (spec_from_model(model) traces a model)")
    # edgetune's MLP lists `norms.i` after every `layers.j`: move each right after its `layers.i`
    weights = {l.prefix for l in layers if l.kind != "norm"}
    partner = {l.prefix: m.group(1) + "layers." + m.group(2) for l in layers
               if l.kind == "norm" and (m := re.fullmatch(r"(.*?)norms\.(\d+)", l.prefix))
               and m.group(1) + "layers." + m.group(2) in weights}
    ordered: list[_Layer] = []
    for layer in layers:
        if layer.prefix not in partner:
            ordered.append(layer)
            ordered.extend(n for n in layers if partner.get(n.prefix) == layer.prefix)
    return ordered


def _leaf(prefix: str, m: nn.Module) -> _Layer | None:
    """The :class:`_Layer` of a supported module (Linear, Conv2d without groups, BatchNorm, 1-D LayerNorm)."""
    keys = tuple(f"{prefix}.{k}" for k, v in m.state_dict().items() if v.is_floating_point() and v.ndim > 0)
    if isinstance(m, nn.Linear):
        return _Layer(prefix, "linear", m.in_features, m.out_features, keys)
    if isinstance(m, nn.Conv2d) and m.groups == 1:
        return _Layer(prefix, "conv", m.in_channels, m.out_channels, keys)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _Layer(prefix, "norm", m.num_features, m.num_features, keys)
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return _Layer(prefix, "norm", m.normalized_shape[0], m.normalized_shape[0], keys)
    return None


def _unsupported(name: str, m: nn.Module) -> ConfigError:
    return ConfigError(f"re-basin cannot infer the permutation spec: module {name!r} ({type(m).__name__}) is not "
                       f"supported; {_SUPPORTED}")


def _trace(seq: nn.Sequential, prefix: str, out: list[_Layer]) -> None:
    for name, child in seq.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            _trace(child, full, out)
        elif not isinstance(child, _PASS):
            layer = _leaf(full, child)
            if layer is None:
                raise _unsupported(full, child)
            out.append(layer)


def spec_from_model(model: nn.Module) -> PermutationSpec:
    """The spec of edgetune's :class:`~edgetune.models.MLP` (with or without batch norm) or of an ``nn.Sequential``
    of Linear / Conv2d / BatchNorm / activation / pooling / Flatten layers, traced in module order. Anything else
    raises :class:`ConfigError` naming the first unsupported module."""
    layers: list[_Layer] = []
    if isinstance(model, MLP):
        for i, lin in enumerate(model.layers):
            layers.append(_Layer(f"layers.{i}", "linear", lin.in_features, lin.out_features,
                                 (f"layers.{i}.weight", f"layers.{i}.bias")))
            if model.norms is not None:
                layers.append(_leaf(f"norms.{i}", model.norms[i]))  # type: ignore[arg-type]
        layers.append(_Layer("head", "linear", model.head.in_features, model.head.out_features,
                             ("head.weight", "head.bias")))
    elif isinstance(model, nn.Sequential):
        _trace(model, "", layers)
    else:
        for name, m in model.named_modules():
            if name and not isinstance(m, (nn.Sequential, *_PASS)) and _leaf(name, m) is None:
                raise _unsupported(name, m)
        raise _unsupported("<the model>", model)
    return _build(layers, f"spec_from_model({type(model).__name__})")


def mlp_spec(model_or_sd: nn.Module | StateDict) -> PermutationSpec:
    """The spec of a stack of Linear layers (with biases, norms): each hidden layer's units share a permutation;
    the input and output layers' outer axes stay fixed. A module is traced (:func:`spec_from_model`); a state dict
    is read from its keys in order (edgetune's MLP names: ``layers.i``, ``norms.i``, ``head``)."""
    if isinstance(model_or_sd, nn.Module):
        return spec_from_model(model_or_sd)
    return _build(_layers_from_state_dict(model_or_sd, False, "mlp_spec"), "mlp_spec")


def cnn_spec(model_or_sd: nn.Module | StateDict) -> PermutationSpec:
    """The spec of a plain conv stack with batch norms, then Linear layers after a flatten or global pool: each
    conv's out-channels permute its weight (axis 0), bias and batch norm (weight, bias, running mean and variance),
    and the next conv's axis 1, or the first Linear's inputs (in blocks of ``H * W`` after a flatten)."""
    if isinstance(model_or_sd, nn.Module):
        return spec_from_model(model_or_sd)
    return _build(_layers_from_state_dict(model_or_sd, True, "cnn_spec"), "cnn_spec")


SpecChoice = PermutationSpec | Literal["auto", "mlp", "cnn"]
