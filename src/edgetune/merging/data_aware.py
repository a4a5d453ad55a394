"""Data-aware merging: the plumbing the methods that need a model and data share, and one entry for all of them.

Fisher merging (``fisher.py``), RegMean (``regmean.py``), AdaMerging (``adamerging.py``) and safety-preserving
merging (``safety.py``) need statistics of the models on data (Fishers, input Gram matrices) or optimise merge
coefficients through the model, so they are functions over ``(nn.Module architecture, state dicts, data)`` rather
than per-tensor merges. Their registered :class:`~edgetune.merging.base.Merger` classes carry ``data_aware = True``
and refuse the per-tensor path with a :class:`ConfigError` naming the function to call; :func:`merge_with_data`
dispatches on ``cfg.method`` so a CLI verb or a merge stage calls one thing.

Data: what edgetune's loop evaluates (a ``TensorDataset`` with the target last, or a ``DictDataset``, read in order
in batches of ``batch_size``), an iterable of batches (a ``DataLoader``, a list of batches: ``[x, y]`` lists, or
dicts with an optional ``labels``), or a plain tensor of inputs ``(N, ...)``. A list batch of one tensor, and a
tensor, are inputs without labels. The model's logits (a tensor, or ``.logits`` of a Hugging Face output) are read
as ``(..., C)`` and aligned position by position with the labels (``-100`` ignored): a causal LM's labels must be
given already shifted.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from edgetune.core.errors import ConfigError
from edgetune.core.outputs import logits_of as _logits_of
from edgetune.data.batches import TARGET_KEY
from edgetune.merging.base import Merger

__all__ = ["IGNORE_INDEX", "DataAwareMerger", "ModelBatch", "check_module_keys", "cross_entropy", "data_aware_error", "iter_batches",
           "logits_of", "mean_entropy", "merge_with_data", "module_device"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
StateDict = Mapping[str, Tensor]


class ModelBatch(NamedTuple):
    """One batch, split into what the model is called with and the target (None: unlabelled)."""

    args: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]
    target: Tensor | None

    @property
    def size(self) -> int:
        """The number of examples (rows of the first input)."""
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return len(first)

    def to(self, device: torch.device) -> ModelBatch:
        return ModelBatch(tuple(a.to(device) for a in self.args), {k: v.to(device) for k, v in self.kwargs.items()},
                          None if self.target is None else self.target.to(device))


def _split(batch: Any, what: str) -> ModelBatch:
    if isinstance(batch, Tensor):
        return ModelBatch((batch,), {}, None)
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != TARGET_KEY}
        if not kwargs:
            raise ConfigError(f"a batch of {what} holds only {TARGET_KEY!r}; give the model's inputs too")
        return ModelBatch((), kwargs, batch.get(TARGET_KEY))
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(t, Tensor) for t in batch):
        if len(batch) == 1:
            return ModelBatch((batch[0],), {}, None)
        return ModelBatch(tuple(batch[:-1]), {}, batch[-1])
    raise ConfigError(f"a batch of {what} is a {type(batch).__name__}; give [inputs..., target] lists of tensors, "
                      "dicts of tensors (optional 'labels'), or tensors of inputs")


def _raw_batches(data: Any, batch_size: int, what: str) -> Iterator[Any]:
    if isinstance(data, Tensor):
        if data.dim() == 0:
            raise ConfigError(f"{what} is a 0-d tensor; give inputs of shape (N, ...)")
        yield from data.split(batch_size)
    elif hasattr(data, "take") or isinstance(data, torch.utils.data.TensorDataset):
        n = len(data)
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(n, i + batch_size))
            yield [t[idx] for t in data.tensors] if isinstance(data, torch.utils.data.TensorDataset) else data.take(idx)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        yield from data
    else:
        raise ConfigError(f"{what} is a {type(data).__name__}; give a TensorDataset or DictDataset, a DataLoader or "
                          "list of batches, or a tensor of inputs")


def iter_batches(data: Any, *, n_batches: int | None = None, batch_size: int = 32, device: torch.device | None = None,
                 what: str = "data") -> Iterator[ModelBatch]:
    """The first ``n_batches`` batches of ``data`` (all when None) as :class:`ModelBatch` on ``device``.

    Raises :class:`ConfigError` for no data (None), data with no example, or a bad ``n_batches`` / ``batch_size``.
    """
    if data is None:
        raise ConfigError(f"no {what} given: data-aware merging needs examples (a TensorDataset, DataLoader, list of "
                          "batches or a tensor of inputs)")
    if n_batches is not None and n_batches < 1:
        raise ConfigError(f"n_batches = {n_batches} must be at least 1 (or None for all the {what})")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size} must be at least 1")
    seen = 0
    for raw in _raw_batches(data, batch_size, what):
        if n_batches is not None and seen >= n_batches:
            break
        b = _split(raw, what)
        if b.size == 0:
            continue
        seen += 1
        yield b if device is None else b.to(device)
    if seen == 0:
        raise ConfigError(f"the {what} holds no example; give at least one batch")


def logits_of(out: Any) -> Tensor:
    """The logits in a model's output: a tensor, ``.logits`` (Hugging Face ``ModelOutput``), a dict, or a tuple."""
    return _logits_of(out, "data-aware merging needs a model returning logits (a tensor or an object with .logits)")


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean prediction entropy ``-sum_c p_c log p_c`` over every position of logits ``(..., C)`` -> scalar."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``(..., C)`` against labels ``(...)`` (``-100`` ignored) -> scalar."""
    if tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ConfigError(f"logits {tuple(logits.shape)} do not match labels {tuple(target.shape)}: labels must have "
                          "the logits' shape without the last (class) axis")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module with neither)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """Names of tensors shared by several modules (tied embeddings and heads): alias name -> the first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if id(t) in first:
            out[name] = first[id(t)]
        else:
            first[id(t)] = name
    return out


def check_module_keys(module: nn.Module, state_dict: StateDict) -> None:
    """The state dicts merged through ``module`` must hold exactly its state-dict keys (a tied alias may be left
    out: it is the tensor of the name it is tied to)."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"the architecture must be an nn.Module (the model the state dicts load into), got a "
                          f"{type(module).__name__}")
    own = list(module.state_dict())
    aliases = tied_aliases(module)
    missing = [k for k in own if k not in state_dict and k not in aliases]
    extra = [k for k in state_dict if k not in own]
    if missing or extra:
        raise ConfigError(f"the state dicts do not fit the module: missing {missing[:3]}, unexpected {extra[:3]}; "
                          "pass the architecture the models were saved from")


def data_aware_error(method: str, use: str) -> ConfigError:
    """The error the registered Merger of a data-aware method raises on the per-tensor path."""
    return ConfigError(f"merge method {method!r} is data-aware: it needs the model and data, not only tensors, so it "
                       f"cannot run through merge()/stream_merge tensor by tensor; use {use} or "
                       "merging.data_aware.merge_with_data(cfg, module, state_dicts, base, data), or a merge stage "
                       "(step: merge), which merges on the stage's data")


class DataAwareMerger(Merger):
    """The registered Merger of a data-aware method: it refuses the per-tensor paths, naming ``use`` (the function
    to call instead); :func:`merge_with_data` runs the method."""

    data_aware: ClassVar[bool] = True
    use: ClassVar[str] = ""

    def prepare(self, models: Sequence[StateDict], base: StateDict | None) -> Sequence[StateDict]:
        raise data_aware_error(self.cfg.method, self.use)

    def merge_tensor(self, name: str, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
        raise data_aware_error(self.cfg.method, self.use)


def _per_model(data: Any, n: int, per_model: bool) -> list[Any]:
    if not per_model:
        return [data] * n
    if not isinstance(data, Sequence) or len(data) != n:
        got = len(data) if isinstance(data, Sequence) else type(data).__name__
        raise ConfigError(f"per_model=True needs one dataset per model ({n}), got {got}")
    return list(data)


def merge_with_data(cfg: Any, module: nn.Module, state_dicts: Sequence[StateDict], base: StateDict | None, data: Any,
                    must_keep: Any = None, *, per_model: bool = False) -> dict[str, Tensor]:
    """Merge ``state_dicts`` (of ``module``'s architecture) with the data-aware method ``cfg`` names.

    ``data``: one dataset used for every model, or with ``per_model=True`` one per model (Fisher and RegMean
    measure each model on its own task's data, as in their papers; AdaMerging and safety take one unlabelled /
    domain set). ``must_keep``: the safety method's labelled must-keep set. ``module`` is not modified.
    """
    from edgetune.merging.base import merger_for

    merger = merger_for(cfg)
    cfg = merger.cfg
    if not getattr(merger, "data_aware", False):
        raise ConfigError(f"method {cfg.method!r} is not data-aware; merge it with merging.merge(state_dicts, cfg)")
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence) or not state_dicts:
        raise ConfigError("state_dicts must be a non-empty list of state dicts, one per model")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"the architecture must be an nn.Module (the model the state dicts load into), got a "
                          f"{type(module).__name__}")
    aliases = tied_aliases(module)
    if aliases:  # a tied tensor is merged once, under its first name, and every alias gets that tensor
        log.info("%s: %d tied tensor(s) merged once each (%s)", cfg.method, len(aliases),
                 ", ".join(f"{a} = {f}" for a, f in list(aliases.items())[:3]))
        state_dicts = [{k: v for k, v in sd.items() if k not in aliases} for sd in state_dicts]
        base = None if base is None else {k: v for k, v in base.items() if k not in aliases}
    out = _merge_with_data(cfg, module, state_dicts, base, data, must_keep, per_model, aliases)
    for alias, name in aliases.items():
        if name in out:
            out[alias] = out[name]
    return out


def _merge_with_data(cfg: Any, module: nn.Module, state_dicts: Sequence[StateDict], base: StateDict | None,
                     data: Any, must_keep: Any, per_model: bool, aliases: Mapping[str, str]) -> dict[str, Tensor]:
    from edgetune.merging import adamerging, fisher, regmean, safety

    n = len(state_dicts)
    if cfg.method in ("fisher", "regmean"):
        sets = _per_model(data, n, per_model)
        work = copy.deepcopy(module)
        stats = []
        for i, (sd, d) in enumerate(zip(state_dicts, sets, strict=True)):
            check_module_keys(work, sd)
            work.load_state_dict({**sd, **{a: sd[f] for a, f in aliases.items() if f in sd}})
            log.info("%s: statistics of model %d/%d", cfg.method, i + 1, n)
            if cfg.method == "fisher":
                stats.append(fisher.fisher_diagonal(work, d, cfg.n_batches, label=cfg.label,
                                                    batch_size=cfg.batch_size, seed=cfg.seed))
            else:
                grams = regmean.gram_matrices(work, d, cfg.n_batches, batch_size=cfg.batch_size)
                # a linear weight tied to another tensor (an embedding) is averaged with it, not solved
                stats.append({k: g for k, g in grams.items() if k not in aliases and
                              not any(f == k for f in aliases.values())})
        if cfg.method == "fisher":
            if cfg.normalize:
                stats = [fisher.normalize_fisher(f) for f in stats]
            return fisher.fisher_merge(state_dicts, stats, cfg.weights, eps=cfg.eps)
        regmean.check_grams_cover(work, stats, skip=set(aliases) | set(aliases.values()))
        return regmean.regmean_merge(state_dicts, stats, alpha=cfg.alpha, weights=cfg.weights)
    if per_model:
        raise ConfigError(f"method {cfg.method!r} learns coefficients on one dataset; pass it with per_model=False")
    if cfg.method == "adamerging":
        return adamerging.adamerging(module, base, state_dicts, data, cfg).merged
    if cfg.method == "safety":
        return safety.safety_merge(module, base, state_dicts, data, must_keep, cfg).merged
    raise ConfigError(f"no data-aware merge is wired for method {cfg.method!r}")
