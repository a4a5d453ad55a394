"""The merge-method base class and the state-dict driver every merge method shares.

A merge method is a :class:`Merger`: it is built from its config and maps the tensors one key holds in each
model (plus the base model's, for methods on task vectors ``tau_i = theta_i - theta_0``) to one merged tensor.
:func:`merge_state_dicts` checks the whole input up front (keys, shapes, base, weights, density, integer buffers)
so a bad input raises one :class:`ConfigError` naming the problem before any tensor is merged, then merges key
by key. Since each key is merged on its own (DARE's randomness is seeded by the key's name), a streaming driver
that loads one key at a time gets the same result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.merging.config import MERGERS, MergeConfig

__all__ = ["Merger", "check_inputs", "check_options", "copy_buffer", "merge", "merge_state_dicts", "merger_for"]

log = logging.getLogger(__name__)

_SHOW = 3  # keys named in a message before "(+N more)"


class Merger:
    """One merge method; subclasses implement :meth:`combine` on floating tensors.

    needs_base: the method works on task vectors and needs the base model the models were fine-tuned from.
    commutative: the result does not depend on the order of the models (given weights in matching order).
    density_option: the name of the option giving the fraction of each task vector kept, checked in (0, 1].
    takes_weights: the method takes one weight per model (``weights``).
    whole_model: the method needs every tensor of every model at once (re-basin aligns whole models before the
        key-by-key merge, in :meth:`prepare`): it cannot stream.
    data_aware: the method needs the model and data (Fisher, RegMean, AdaMerging, safety):
        :func:`edgetune.merging.merge_with_data`, or a merge stage, which has both.
    """

    needs_base: ClassVar[bool] = True
    commutative: ClassVar[bool] = True
    density_option: ClassVar[str | None] = None
    takes_weights: ClassVar[bool] = True
    whole_model: ClassVar[bool] = False
    data_aware: ClassVar[bool] = False

    def __init__(self, cfg: MergeConfig) -> None:
        self.cfg = cfg

    def weights(self, n: int) -> list[float]:
        """The weight of each of ``n`` models: the config's, or 1 each."""
        return list(self.cfg.weights) if self.cfg.weights is not None else [1.0] * n

    def prepare(self, models: Sequence[Mapping[str, Tensor]],
                base: Mapping[str, Tensor] | None) -> Sequence[Mapping[str, Tensor]]:
        """Whole-model work before the key-by-key merge (checked inputs in, the models to merge out)."""
        return models

    def merge_tensor(self, name: str, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
        """Merge the tensors one key ``name`` holds in each model (same shape ``S``) into one tensor ``S``.

        Pure: the inputs are not modified and the result shares no memory with them. Floating tensors are merged
        in float32 (float64 stays float64) and returned in the first model's dtype, or ``cfg.dtype``. Other
        tensors (integer buffers) must be equal in every model and are copied.
        """
        if not tensors:
            raise ConfigError(f"no tensors to merge for {name!r}; give at least one model")
        first = tensors[0]
        if not first.is_floating_point():
            return copy_buffer(name, tensors)
        if base is None and self.needs_base:
            raise ConfigError(f"method {self.cfg.method!r} needs a base model: pass base=... / `base:` in the merge "
                              "config (the model the merged models were fine-tuned from)")
        compute = torch.promote_types(first.dtype, torch.float32)
        xs = [t.to(compute) for t in tensors]
        b = None if base is None else base.to(compute)
        out = self.combine(name, xs, b)
        if any(out is x for x in (*xs, b)):  # a method may hand back an input unchanged: never alias it
            out = out.clone()
        if name.endswith("running_var") and bool((out < 0).any()):  # e.g. a negated task vector on batch norms
            log.warning("%s: the merge gives negative running variances (%d entries); clamped to 0 so the batch norm "
                        "stays finite. Recompute the statistics on data after such a merge", name, int((out < 0).sum()))
            out = out.clamp_min(0)
        return out.to(self.cfg.torch_dtype or first.dtype)

    def combine(self, name: str, xs: list[Tensor], base: Tensor | None) -> Tensor:
        """The method's maths on float tensors of one shape; ``base`` is None only when not ``needs_base``."""
        raise NotImplementedError


def copy_buffer(name: str, tensors: Sequence[Tensor]) -> Tensor:
    """A non-floating tensor (an integer buffer): equal in every model, copied.

    ``num_batches_tracked`` of batch norms is the exception: it counts the fine-tune's steps, which differ
    whenever the fine-tunes ran for different numbers of steps; the first model's count is kept.
    """
    first = tensors[0]
    if name.endswith("num_batches_tracked"):
        return first.clone()
    for i, t in enumerate(tensors[1:], 1):
        if t.dtype != first.dtype or not torch.equal(t, first):
            raise ConfigError(
                f"{name!r} is a {str(first.dtype).removeprefix('torch.')} tensor (not floating, so it cannot be "
                f"averaged) and differs between model 0 and model {i}; such buffers (position ids, counters, "
                "indices) must be equal in every model: set them equal, or drop the key from the state dicts")
    return first.clone()


def merger_for(cfg: MergeConfig | Mapping[str, Any]) -> Merger:
    """The :class:`Merger` of a config (a mapping is validated against :class:`MergeConfig` first)."""
    if not isinstance(cfg, MergeConfig):
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"the merge config must be a MergeConfig or a mapping, got {type(cfg).__name__}")
        cfg = validate(MergeConfig, cfg, "merge")
    merger: Merger = MERGERS.get(cfg.method)(cfg)
    return merger


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOW])
    return shown + (f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_like(ref: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str) -> None:
    """``other`` has exactly ``ref``'s keys (model 0's), with the same shapes."""
    missing = [k for k in ref if k not in other]
    extra = [k for k in other if k not in ref]
    if missing or extra:
        parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has extra {_names(extra)}"] if extra else [])
        raise ConfigError(f"{what} has other keys than model 0: it {' and '.join(parts)}. Merge only models of one "
                          "architecture, or drop / rename the differing keys in the state dicts first")
    bad = [k for k in ref if tuple(ref[k].shape) != tuple(other[k].shape)]
    if bad:
        shown = "; ".join(f"{k!r} is {_shape(ref[k])} in model 0 but {_shape(other[k])} in {what}" for k in bad[:_SHOW])
        more = f" (+{len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        raise ConfigError(f"shapes differ: {shown}{more}. Merge only models of one architecture (same layer sizes, "
                          "vocabulary and number of classes)")


def check_options(merger: Merger, n_models: int, has_base: bool) -> None:
    """The checks that need no tensor: a base where the method needs one, one weight per model, the density."""
    cfg = merger.cfg
    if not has_base and merger.needs_base:
        raise ConfigError(f"method {cfg.method!r} needs a base model: pass base=... / `base:` in the merge config "
                          "(the model the merged models were fine-tuned from)")
    if cfg.weights is not None:
        if not merger.takes_weights:
            raise ConfigError(f"method {cfg.method!r} takes no weights; remove `weights`")
        if len(cfg.weights) != n_models:
            raise ConfigError(f"weights has {len(cfg.weights)} entries for {n_models} models; give one weight per "
                              "model, in the order of the models (or leave weights out for equal weights)")
        bad = [w for w in cfg.weights if not math.isfinite(w)]
        if bad:
            raise ConfigError(f"weights must be finite numbers, got {bad[0]!r}; give one finite weight per model")
    if merger.density_option is not None:
        density = getattr(cfg, merger.density_option)
        if not (math.isfinite(density) and 0 < density <= 1):
            raise ConfigError(f"{merger.density_option} = {density!r} must be in (0, 1]: the fraction of each task "
                              f"vector kept (1 keeps all of it)")


def check_inputs(merger: Merger, models: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None) -> None:
    if isinstance(models, Mapping) or not isinstance(models, Sequence):
        raise ConfigError(f"models must be a list of state dicts (model.state_dict()), one per model, got a "
                          f"{type(models).__name__}; wrap a single state dict in a list")
    if not models:
        raise ConfigError("no models to merge: pass a list of state dicts (model.state_dict()), one per model")
    for i, m in enumerate(models):
        if not isinstance(m, Mapping):
            raise ConfigError(f"model {i} is a {type(m).__name__}, not a state dict; pass model.state_dict()")
    if base is not None and not isinstance(base, Mapping):
        raise ConfigError(f"base is a {type(base).__name__}, not a state dict; pass base=model.state_dict()")
    for i, m in enumerate(models[1:], 1):
        _check_like(models[0], m, f"model {i}")
    if base is not None:
        _check_like(models[0], base, "the base model")
    check_options(merger, len(models), base is not None)
    for k, t in models[0].items():
        floating = [m[k].is_floating_point() for m in models]
        if any(floating) and not all(floating):
            raise ConfigError(f"{k!r} is a floating tensor in some models and not in others "
                              f"({', '.join(str(m[k].dtype) for m in models)}); give it one kind of dtype everywhere")
        if not t.is_floating_point():
            copy_buffer(k, [m[k] for m in models])


def merge_state_dicts(models: Sequence[Mapping[str, Tensor]], cfg: MergeConfig | Mapping[str, Any],
                      base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Merge the state dicts ``models`` (one architecture) into one with the method ``cfg`` names.

    ``base``: the state dict the models were fine-tuned from (needed by the task-vector methods). Every input is
    checked before any tensor is merged; a bad one raises :class:`ConfigError` and nothing is returned. The
    result has model 0's keys in its order; its floating tensors are in ``cfg.dtype`` or model 0's dtype.
    """
    merger = merger_for(cfg)
    check_inputs(merger, models, base)
    models = merger.prepare(models, base)
    out = {k: merger.merge_tensor(k, [m[k] for m in models], None if base is None else base[k]) for k in models[0]}
    log.info("merged %d models (%d tensors) with %s", len(models), len(out), merger.cfg.method)
    return out


#: the short name of :func:`merge_state_dicts`
merge = merge_state_dicts
