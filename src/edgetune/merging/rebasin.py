"""Git Re-Basin, weight matching (Ainsworth, Hayase, Srinivasa 2023, "Git Re-Basin: merging models modulo
permutation symmetries").

Two networks trained from different seeds compute (about) the same function up to a permutation of each hidden
layer's units. Weight matching permutes model B's hidden units to maximize ``sum_l <W_l^A, P_l W_l^B P_{l-1}^T>``
by coordinate descent: each permutation in turn (a random order per sweep) is one linear assignment problem given
the others (scipy's ``linear_sum_assignment``), sweeping until no permutation changes. Averaging A with the
permuted B then stays in one loss basin: the loss barrier along the linear path drops.

- :class:`PermutationSpec`: which state-dict axes share a permutation; :func:`mlp_spec`, :func:`cnn_spec` (from a
  state dict or a model) and :func:`spec_from_model` (edgetune's MLP, ``nn.Sequential`` stacks) build one
  (:mod:`edgetune.merging.rebasin_spec`).
- :func:`weight_matching` and :func:`apply_permutation`: pure functions on state dicts.
- :func:`rebasin_align`: align models 1..N-1 to model 0; any merge method can follow on the aligned dicts.
- the ``rebasin`` merge method: align, then the weighted average (as ``linear``); :meth:`RebasinMerger.merge_models`.
- :func:`interpolation_barrier`: the loss along ``(1 - a) theta_A + a theta_B`` and its barrier
  (:mod:`edgetune.merging.barrier`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from edgetune.core.errors import ConfigError
from edgetune.merging.barrier import BarrierCurve, interpolate_state_dicts, interpolation_barrier
from edgetune.merging.base import Merger, check_inputs
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.linear import weighted_sum
from edgetune.merging.rebasin_spec import PermutationSpec, SpecChoice, cnn_spec, mlp_spec, spec_from_model

__all__ = ["BarrierCurve", "PermutationSpec", "RebasinConfig", "RebasinMerger", "apply_permutation", "cnn_spec",
           "interpolate_state_dicts", "interpolation_barrier", "mlp_spec", "rebasin_align", "resolve_spec",
           "spec_from_model", "weight_matching"]

log = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]


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
