"""Git Re-Basin, weight matching (Ainsworth, Hayase, Srinivasa 2023, "Git Re-Basin: merging models modulo
permutation symmetries").

Two networks trained from different seeds compute (about) the same function up to a permutation of each hidden
layer's units. Weight matching permutes model B's hidden units to maximize ``sum_l <W_l^A, P_l W_l^B P_{l-1}^T>``
by coordinate descent: each permutation in turn (a random order per sweep) is one linear assignment problem given
the others (scipy's ``linear_sum_assignment``), sweeping until no permutation changes. Averaging A with the
permuted B then stays in one loss basin: the loss barrier along the linear path drops.

- :class:`PermutationSpec`: which state-dict axes share a permutation; :func:`mlp_spec`, :func:`cnn_spec` (from a
  state dict or a model) and :func:`spec_from_model` (edgetune's MLP, ``nn.Sequential`` stacks) build one.
- :func:`weight_matching` and :func:`apply_permutation`: pure functions on state dicts.
- :func:`rebasin_align`: align models 1..N-1 to model 0; any merge method can follow on the aligned dicts.
- the ``rebasin`` merge method: align, then the weighted average (as ``linear``); :meth:`RebasinMerger.merge_models`.
- :func:`interpolation_barrier`: the loss along ``(1 - a) theta_A + a theta_B`` and its barrier.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from edgetune.core.errors import ConfigError
from edgetune.merging.base import Merger, check_inputs
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.linear import weighted_sum
from edgetune.models.mlp import MLP

__all__ = ["BarrierCurve", "PermutationSpec", "RebasinConfig", "RebasinMerger", "apply_permutation", "cnn_spec",
           "interpolate_state_dicts", "interpolation_barrier", "mlp_spec", "rebasin_align", "resolve_spec",
           "spec_from_model", "weight_matching"]

log = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]


# --------------------------------------------------------------------------------------------------- specs


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


# ------------------------------------------------------------------------------------------ weight matching


def _permute_axis(t: Tensor, axis: int, perm: Tensor) -> Tensor:
    """``t`` with its ``axis`` reordered by ``perm`` (``n`` units); an axis of ``n * b`` entries moves in blocks of
    ``b`` (a Linear after a channel-major flatten of ``C`` channels of ``H * W`` each)."""
    n, size = perm.numel(), t.shape[axis]
    perm = perm.to(t.device)
    if size != n:
        b = size // n
        perm = (perm[:, None] * b + torch.arange(b, device=t.device)).reshape(-1)  # (n * b,)
    return t.index_select(axis, perm)


def _unit_rows(t: Tensor, axis: int, n: int) -> Tensor:
    """``t`` as ``(n, rest)``: row ``i`` holds every entry that belongs to unit ``i`` of ``axis``."""
    return t.movedim(axis, 0).reshape(n, -1)


def _permute_all(spec: PermutationSpec, perms: Mapping[str, Tensor], key: str, t: Tensor,
                 skip_axis: int | None = None) -> Tensor:
    for axis, p in enumerate(spec.axes[key]):
        if p is not None and axis != skip_axis:
            t = _permute_axis(t, axis, perms[p])
    return t


def _check_perms(spec: PermutationSpec, perms: Mapping[str, Tensor]) -> None:
    missing = [p for p in spec.sizes if p not in perms]
    if missing:
        raise ConfigError(f"perms lacks the permutation(s) {missing[:3]} of the spec; give one per spec.sizes entry "
                          "(weight_matching returns them all)")
    for p, n in spec.sizes.items():
        got = perms[p]
        if got.ndim != 1 or got.numel() != n or not torch.equal(got.sort().values.cpu(), torch.arange(n)):
            raise ConfigError(f"perms[{p!r}] is not a permutation of {n} units (shape {tuple(got.shape)}); give a "
                              f"LongTensor holding each of 0..{n - 1} once")


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, Tensor], sd: StateDict) -> dict[str, Tensor]:
    """A permuted copy of ``sd``: every axis the spec names is reordered by its permutation (``new = old[perm]``).

    Pure: ``sd`` is not modified and the result shares no memory with it (keys outside the spec are cloned).
    """
    spec.check(sd)
    _check_perms(spec, perms)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        moved = _permute_all(spec, perms, k, v) if k in spec.axes else v
        out[k] = moved.clone() if moved is v else moved
    return out


def weight_matching(spec: PermutationSpec, sd_a: StateDict, sd_b: StateDict, max_iter: int = 100,
                    seed: int = 0) -> dict[str, Tensor]:
    """Permutations of ``sd_b``'s hidden units that best match ``sd_a`` (weight matching, Ainsworth et al. 2023).

    Coordinate descent from the identity: each sweep visits the permutations in a random order (seeded); for
    permutation ``p`` of ``n`` units, ``C = sum_(key, axis) A_key[axis] (B_key permuted on its other axes)[axis]^T``
    (``(n, n)``, in float64) and ``p`` becomes the assignment maximizing ``trace(C[:, p])``, kept only when it
    strictly raises the score. Stops when a sweep changes nothing, or after ``max_iter`` sweeps.
    Returns name -> LongTensor ``(n,)``; ``apply_permutation(spec, perms, sd_b)`` is B aligned to A.
    """
    from scipy.optimize import linear_sum_assignment

    if max_iter < 1:
        raise ConfigError(f"max_iter = {max_iter} must be at least 1 (sweeps over the permutations)")
    spec.check(sd_a)
    spec.check(sd_b)
    a = {k: sd_a[k].detach().to("cpu", torch.float64) for k in spec.axes}
    b = {k: sd_b[k].detach().to("cpu", torch.float64) for k in spec.axes}
    to_axes = spec.perm_to_axes()
    names = sorted(spec.sizes)
    perms = {p: torch.arange(spec.sizes[p]) for p in names}
    gen = torch.Generator().manual_seed(seed)
    for sweep in range(1, max_iter + 1):
        changed = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            p, n = names[i], spec.sizes[names[i]]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for key, axis in to_axes[p]:
                wb = _permute_all(spec, perms, key, b[key], skip_axis=axis)
                cost += _unit_rows(a[key], axis, n) @ _unit_rows(wb, axis, n).T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(n)
            old_score, new_score = cost[rows, perms[p]].sum().item(), cost[rows, new].sum().item()
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[p], changed = new, True
        if not changed:
            log.debug("weight matching converged after %d sweeps over %d permutations", sweep, len(names))
            break
    else:
        log.warning("weight matching stopped after max_iter=%d sweeps without converging; raise max_iter", max_iter)
    return perms


def _as_state_dict(m: nn.Module | StateDict, i: int) -> StateDict:
    if isinstance(m, nn.Module):
        return m.state_dict()
    if not isinstance(m, Mapping):
        raise ConfigError(f"model {i} is a {type(m).__name__}; pass an nn.Module or its state_dict()")
    return m


def resolve_spec(spec: SpecChoice, model: nn.Module | StateDict) -> PermutationSpec:
    """``spec`` itself, or the spec built from ``model`` (a module: traced; a state dict: read from its shapes)."""
    if isinstance(spec, PermutationSpec):
        return spec
    if spec == "auto":
        if isinstance(model, nn.Module):
            return spec_from_model(model)
        return cnn_spec(model) if any(v.ndim == 4 for v in model.values()) else mlp_spec(model)
    if spec in ("mlp", "cnn"):
        return mlp_spec(model) if spec == "mlp" else cnn_spec(model)
    raise ConfigError(f"spec {spec!r} is not a PermutationSpec nor one of 'auto', 'mlp', 'cnn'")


def rebasin_align(models: Sequence[nn.Module | StateDict], spec: SpecChoice = "auto", max_iter: int = 100,
                  seed: int = 0) -> list[dict[str, Tensor]]:
    """State dicts of ``models`` with models 1..N-1 permuted to match model 0 (a copy of model 0 comes first).

    Each model is matched to model 0 on its own (weight matching); any merge method may follow on the result,
    e.g. ``merge(rebasin_align([a, b]), TiesConfig(...), base=...)``. ``spec``: a :class:`PermutationSpec`, or
    built from model 0 (``auto``: traced from a module, else ``cnn`` when a 4-D weight is present, else ``mlp``).
    """
    if isinstance(models, (Mapping, nn.Module)) or not models:
        raise ConfigError("models must be a non-empty list of models or state dicts, one per model")
    sds = [_as_state_dict(m, i) for i, m in enumerate(models)]
    ps = resolve_spec(spec, models[0])
    ref = sds[0]
    out = [{k: v.clone() for k, v in ref.items()}]
    for i, sd in enumerate(sds[1:], 1):
        perms = weight_matching(ps, ref, sd, max_iter=max_iter, seed=seed)
        out.append(apply_permutation(ps, perms, sd))
        moved = sum(int((q != torch.arange(q.numel())).sum()) for q in perms.values())
        log.info("re-basin: model %d aligned to model 0 (%d of %d units moved)", i, moved, sum(ps.sizes.values()))
    return out


# ------------------------------------------------------------------------------------------- merge method


class RebasinConfig(MergeConfig):
    """Git Re-Basin (Ainsworth et al. 2023): align models 1..N-1 to model 0 by weight matching, then average.

    spec: how the hidden units are found: ``auto`` (``cnn`` when a 4-D weight is present, else ``mlp``; a module
    given to :meth:`RebasinMerger.merge_models` is traced), ``mlp`` (a stack of Linear layers), ``cnn`` (convs with
    batch norms, then Linear layers). max_iter: sweeps of the coordinate descent. weights: of the average (as
    ``linear``, normalised to sum to 1); ``seed``: the order of the coordinate descent.
    """

    method: Literal["rebasin"] = "rebasin"
    spec: Literal["auto", "mlp", "cnn"] = "auto"
    max_iter: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _sum(self) -> RebasinConfig:
        if self.weights is not None and sum(self.weights) == 0:
            raise ValueError(f"weights {self.weights} sum to 0, so they cannot be normalised to sum to 1")
        return self


class RebasinMerger(Merger):
    """Re-basin then weighted average. Needs whole models (``merge_state_dicts`` calls :meth:`prepare` to align
    them, or use :meth:`merge_models`); a key-by-key merge of tensors that were not aligned first is refused
    (averaging unaligned hidden units would silently break the model)."""

    needs_base = False
    commutative = False  # models are aligned to model 0
    whole_model: ClassVar[bool] = True  # needs every tensor at once: no streaming, no key-by-key merge
    cfg: RebasinConfig

    def __init__(self, cfg: RebasinConfig) -> None:
        super().__init__(cfg)
        self._aligned = False

    def prepare(self, models: Sequence[StateDict], base: StateDict | None = None) -> list[dict[str, Tensor]]:
        """The hook before the key-by-key merge: the models aligned to model 0 (:func:`rebasin_align`)."""
        aligned = rebasin_align(models, self.cfg.spec, max_iter=self.cfg.max_iter, seed=self.cfg.seed)
        self._aligned = True
        return aligned

    def merge_models(self, models: Sequence[nn.Module | StateDict],
                     base: StateDict | None = None) -> dict[str, Tensor]:
        """Merge whole models (modules or state dicts): check, align to model 0, weighted average key by key."""
        sds = [_as_state_dict(m, i) for i, m in enumerate(models)] if isinstance(models, Sequence) else models
        check_inputs(self, sds, base)
        spec = resolve_spec(self.cfg.spec, models[0])
        aligned = rebasin_align(sds, spec, max_iter=self.cfg.max_iter, seed=self.cfg.seed)
        self._aligned = True
        out = {k: self.merge_tensor(k, [m[k] for m in aligned], None) for k in aligned[0]}
        log.info("merged %d models (%d tensors) with rebasin", len(aligned), len(out))
        return out

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        if not self._aligned:
            raise ConfigError(f"method 'rebasin' cannot merge {name!r} on its own: it aligns whole models first. Use "
                              "RebasinMerger(cfg).merge_models(models), or rebasin_align(models) then another method")
        w = self.weights(len(xs))
        total = sum(w)
        return weighted_sum(xs, [x / total for x in w])


MERGERS.add("rebasin", RebasinMerger, config=RebasinConfig,
            summary="Git Re-Basin (Ainsworth et al. 2023): weight matching to model 0, then weighted average")


def interpolate_state_dicts(sd_a: StateDict, sd_b: StateDict, alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) sd_a + alpha sd_b`` on floating tensors (in their dtype); other tensors copied from ``sd_a``."""
    return {k: torch.lerp(v, sd_b[k].to(v.dtype), alpha) if v.is_floating_point() else v.clone()
            for k, v in sd_a.items()}


class BarrierCurve(NamedTuple):
    """losses: one per alpha; barrier: ``max_a loss(a) - ((1 - a) loss(0) + a loss(1))``."""

    barrier: float
    losses: list[float]


@torch.no_grad()
def interpolation_barrier(model_fn: Callable[[], nn.Module], sd_a: StateDict, sd_b: StateDict,
                          loss_fn: Callable[[nn.Module], float | Tensor], alphas: Sequence[float]) -> BarrierCurve:
    """The loss along the linear path ``(1 - a) sd_a + a sd_b`` and its barrier (Frankle et al. 2020; as used by
    Ainsworth et al. 2023). ``model_fn()``: a fresh module to load each point into (put in eval mode);
    ``loss_fn(model)``: its loss. The end points are evaluated too when ``alphas`` lacks 0 or 1."""
    cache: dict[float, float] = {}

    def loss_at(alpha: float) -> float:
        if alpha not in cache:
            model = model_fn()
            model.load_state_dict(interpolate_state_dicts(sd_a, sd_b, alpha))
            cache[alpha] = float(loss_fn(model.eval()))
        return cache[alpha]

    losses = [loss_at(float(a)) for a in alphas]
    lo, hi = loss_at(0.0), loss_at(1.0)
    barrier = max(loss - ((1 - a) * lo + a * hi) for a, loss in zip(alphas, losses, strict=True))
    return BarrierCurve(float(barrier), losses)
