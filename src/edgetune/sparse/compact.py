"""Dead-neuron removal and storage choice for trained sparse models (what ``edgetune export`` writes).

Dynamic sparse training (CHT/CHTs percolation in particular) leaves hidden neurons that cannot carry
signal: no incoming links, or no outgoing links. :func:`compact_mlp_` removes them from an MLP and
shrinks its layers, keeping the eval-mode outputs unchanged: a neuron with no inputs still outputs the
constant ``act(norm(b_j))``, which is folded into the next layer's bias before the neuron goes; a neuron
with no outputs is simply dropped. Removals can starve other neurons, so this repeats to a fixed point.

Each layer is then stored in the cheaper of two forms (:class:`StorageRule`): ``SparseLinear`` (int32
``indices`` + ``values``) or a dense ``nn.Linear``; :func:`apply_storage_rule_` does that for any model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.core.errors import ConfigError
from edgetune.core.surgery import replace_module
from edgetune.sparse.layer import SparseLinear

__all__ = ["CompactionReport", "StorageRule", "apply_storage_rule_", "choose_storage", "compact_mlp_",
           "mlp_parts"]

log = logging.getLogger(__name__)

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
_ACT_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh"}


# ---------------------------------------------------------------- storage rule
@dataclass(frozen=True)
class StorageRule:
    """Which storage a layer gets: dense ``nn.Linear`` when any of these holds, else ``SparseLinear``.

    1. bytes: ``nnz * (value + 2 * index bytes) >= out * in * value bytes`` (sparse is not smaller;
       with float32 values and int32 indices that is density >= 1/3), or ``nnz == 0``;
    2. latency: density > ``max_sparse_density``. Measured on CPU (1 thread, torch 2.13 + MKL, AMD EPYC
       Zen 4), inference forward of CSR ``SparseLinear`` vs ``nn.Linear``: at batch 1 the crossover lies
       at ~6% (784->1568) to ~9% (1568->1568); at batch 256 at 10-20%. 0.06 keeps batch 1 no slower;
    3. tiny layers, off by default: ``out * in <= min_sparse_elements``. The sparse kernel costs a
       fixed ~30 us per call, more than a whole small dense product (a 1568->10 layer: 7 us dense vs
       36 us sparse at any density); ``min_sparse_elements=16384`` trades up to 64 KiB per layer for that.

    ``StorageRule(max_sparse_density=1.0)`` minimizes bytes only.
    """

    max_sparse_density: float = 0.06
    min_sparse_elements: int = 0

    def choose(self, out_features: int, in_features: int, nnz: int, value_bytes: int = 4,
               index_bytes: int = 4) -> str:
        """``"sparse"`` or ``"dense"`` for an ``(out, in)`` weight with ``nnz`` links."""
        dense = out_features * in_features
        if nnz == 0 or nnz * (value_bytes + 2 * index_bytes) >= dense * value_bytes:
            return "dense"
        if nnz / dense > self.max_sparse_density or dense <= self.min_sparse_elements:
            return "dense"
        return "sparse"


def choose_storage(out_features: int, in_features: int, nnz: int, dtype: torch.dtype = torch.float32,
                   rule: StorageRule | None = None) -> str:
    """:meth:`StorageRule.choose` with the value size of ``dtype`` and int32 indices."""
    value_bytes = torch.empty((), dtype=dtype).element_size()
    return (rule or StorageRule()).choose(out_features, in_features, nnz, value_bytes, 4)


# ---------------------------------------------------------------- layers as link lists
@dataclass
class _Links:
    """One ``(out, in)`` weight as links ``rows``/``cols``/``vals`` ``(nnz,)`` plus a bias ``(out,)``."""

    out_f: int
    in_f: int
    rows: Tensor
    cols: Tensor
    vals: Tensor
    bias: Tensor | None

    @classmethod
    def of(cls, layer: nn.Module) -> _Links:
        if isinstance(layer, SparseLinear):
            rows, cols = layer.indices.long()
            vals = layer.values.detach()
        else:
            w = layer.weight.detach()
            rows, cols = (w != 0).nonzero().t()
            vals = w[rows, cols]
        live = vals != 0  # a zero-valued link carries nothing: drop it (NaN stays)
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        return cls(layer.out_features, layer.in_features, rows[live], cols[live], vals[live].clone(), bias)

    def keep(self, sel: Tensor) -> None:
        self.rows, self.cols, self.vals = self.rows[sel], self.cols[sel], self.vals[sel]

    def has_in(self) -> Tensor:
        """Bool ``(out,)``: output neurons with at least one link."""
        return torch.bincount(self.rows, minlength=self.out_f) > 0

    def has_out(self) -> Tensor:
        """Bool ``(in,)``: input neurons with at least one link."""
        return torch.bincount(self.cols, minlength=self.in_f) > 0

    def build(self, rule: StorageRule, training: bool, kind: str | None = None) -> nn.Module:
        dt, dev = self.vals.dtype, self.vals.device
        kind = kind or choose_storage(self.out_f, self.in_f, self.vals.numel(), dt, rule)
        if kind == "sparse":
            links = torch.stack([self.rows, self.cols])  # (2, nnz)
            layer: nn.Module = SparseLinear(self.in_f, self.out_f, links, self.vals,
                                            bias=self.bias is not None, device=dev, dtype=dt)
        else:
            layer = nn.utils.skip_init(nn.Linear, self.in_f, self.out_f, bias=self.bias is not None,
                                       device=dev, dtype=dt)
            with torch.no_grad():
                layer.weight.zero_()[self.rows, self.cols] = self.vals
        if self.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(self.bias)
        return layer.train(training)


# ---------------------------------------------------------------- MLP compaction
@dataclass(frozen=True)
class CompactionReport:
    """What :func:`compact_mlp_` did. Per hidden layer: widths, neurons removed for having no inputs
    (``folded``: their constant output went into the next bias) or no outputs (``cut``). Per layer
    (hidden layers then head): links before/after and the storage chosen."""

    widths_before: tuple[int, ...]
    widths_after: tuple[int, ...]
    folded: tuple[int, ...]
    cut: tuple[int, ...]
    links_before: tuple[int, ...]
    links_after: tuple[int, ...]
    storage: tuple[str, ...]
    sweeps: int

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _activation_name(model: nn.Module) -> str:
    act = getattr(model, "act", None)
    for name, fn in _ACTIVATIONS.items():
        if act is fn:
            return name
    if type(act) in _ACT_MODULES:
        return _ACT_MODULES[type(act)]
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ConfigError(f"cannot compact or export an MLP with activation {act!r}: only relu, gelu and tanh "
                      "are supported; build the MLP with activation='relu', 'gelu' or 'tanh'")


def mlp_parts(model: nn.Module) -> tuple[list[nn.Module], list[nn.BatchNorm1d] | None, str]:
    """The chain ``layers.0 .. layers.{L-1}, head``, the norms and the activation; raise if not an MLP."""
    layers, head = getattr(model, "layers", None), getattr(model, "head", None)
    if not isinstance(layers, nn.ModuleList) or head is None:
        raise ConfigError(f"{type(model).__name__} is not an MLP (needs a `layers` ModuleList and a `head`); "
                          "neuron compaction supports edgetune's MLP only: export other models without it")
    chain = [*layers, head]
    names = [*(f"layers.{i}" for i in range(len(layers))), "head"]
    for name, layer in zip(names, chain, strict=True):
        if not isinstance(layer, (nn.Linear, SparseLinear)):
            raise ConfigError(f"MLP layer {name!r} is a {type(layer).__name__}, not nn.Linear or "
                              "SparseLinear; merge or remove adapters/wrappers before compacting")
    for a, b, nb in zip(chain, chain[1:], names[1:], strict=False):
        if a.out_features != b.in_features:
            raise ConfigError(f"MLP layer {nb!r} takes {b.in_features} inputs but the layer before gives "
                              f"{a.out_features}; the model is not a chain")
    norms = getattr(model, "norms", None)
    if norms is not None:
        if len(norms) != len(layers) or not all(isinstance(n, nn.BatchNorm1d) and n.running_mean is not None
                                                for n in norms):
            raise ConfigError("MLP norms must be one BatchNorm1d with running statistics per hidden layer "
                              "(track_running_stats=True); compaction is exact only with fixed statistics")
        norms = list(norms)
    return chain, norms, _activation_name(model)


def _constant_outputs(bias: Tensor | None, n: int, like: Tensor, norm: nn.BatchNorm1d | None,
                      act: str) -> Tensor:
    """``act(norm(b))`` ``(n,)``: what each hidden neuron outputs when it gets no input (eval mode)."""
    z = (bias if bias is not None else like.new_zeros(n)).unsqueeze(0)  # (1, n)
    if norm is not None:
        z = F.batch_norm(z, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    return _ACTIVATIONS[act](z)[0]


def _shrink_norm(norm: nn.BatchNorm1d, keep: Tensor) -> nn.BatchNorm1d:
    new = nn.BatchNorm1d(int(keep.sum()), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         device=norm.running_mean.device, dtype=norm.running_mean.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(norm, name)
            if src is not None:
                getattr(new, name).copy_(src[keep])
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new.train(norm.training)


def compact_mlp_(model: nn.Module, *, rule: StorageRule | None = None) -> CompactionReport:
    """Remove dead hidden neurons of an MLP in place and store each layer as :class:`StorageRule` says.

    A hidden neuron is dead when it has no incoming links (its output is the constant
    ``act(norm(b_j))``, or ``act(beta_j)`` when its BatchNorm scale is 0: folded into the next layer's
    bias, ``bias' += W_next[:, j] * c_j``) or no outgoing links (dropped). Zero-valued links count as
    absent. Repeats to a fixed point; a hidden layer keeps at least one (link-less) neuron. Eval-mode
    outputs ``(B, C)`` are unchanged up to float rounding (training mode differs: dropout, batch stats).
    """
    chain, norms, act = mlp_parts(model)
    links = [_Links.of(layer) for layer in chain]
    n_hidden = len(chain) - 1
    widths_before = tuple(lk.out_f for lk in links[:-1])
    links_before = tuple(m.nnz() if isinstance(m, SparseLinear) else int((m.weight != 0).sum())
                         for m in chain)
    keep = [torch.ones(w, dtype=torch.bool, device=lk.vals.device) for w, lk in zip(widths_before, links)]
    pinned = [torch.zeros_like(k) for k in keep]
    folded, cut, sweeps, changed = [0] * n_hidden, [0] * n_hidden, 0, True
    while changed:
        changed, sweeps = False, sweeps + 1
        for h in range(n_hidden):
            src, dst, norm = links[h], links[h + 1], norms[h] if norms else None
            const = ~src.has_in()
            if norm is not None and norm.weight is not None:
                const |= norm.weight.detach() == 0
            has_out = dst.has_out()
            dead = keep[h] & ~pinned[h] & (const | ~has_out)
            if not bool(dead.any()):
                continue
            changed = True
            fold = dead & const & has_out
            if bool(fold.any()):
                c = _constant_outputs(src.bias, src.out_f, src.vals, norm, act)  # (n_h,)
                sel = fold[dst.cols]
                add = torch.zeros(dst.out_f, dtype=dst.vals.dtype, device=dst.vals.device)
                add.index_add_(0, dst.rows[sel], dst.vals[sel] * c[dst.cols[sel]])
                dst.bias = add if dst.bias is None else dst.bias + add
            src.keep(~dead[src.rows])
            dst.keep(~dead[dst.cols])
            folded[h] += int(fold.sum())
            cut[h] += int((dead & ~fold).sum())
            keep[h] &= ~dead
            if not bool(keep[h].any()):  # keep one link-less neuron: no zero-width layers
                j = int(dead.nonzero()[0])
                keep[h][j] = pinned[h][j] = True
    for h in range(len(links)):  # renumber the surviving neurons
        lk = links[h]
        if h < n_hidden:
            lk.rows = (torch.cumsum(keep[h], 0) - 1)[lk.rows]
            lk.out_f = int(keep[h].sum())
            lk.bias = lk.bias[keep[h]] if lk.bias is not None else None
        if h > 0:
            lk.cols = (torch.cumsum(keep[h - 1], 0) - 1)[lk.cols]
            lk.in_f = int(keep[h - 1].sum())
    rule = rule or StorageRule()
    storage = []
    for h, lk in enumerate(links):
        new = lk.build(rule, chain[h].training)
        storage.append("sparse" if isinstance(new, SparseLinear) else "dense")
        replace_module(model, f"layers.{h}" if h < n_hidden else "head", new)
        if norms is not None and h < n_hidden:
            replace_module(model, f"norms.{h}", _shrink_norm(norms[h], keep[h]))
    if hasattr(model, "feature_dim"):
        model.feature_dim = links[-1].in_f
    report = CompactionReport(widths_before, tuple(lk.out_f for lk in links[:-1]), tuple(folded), tuple(cut),
                              links_before, tuple(lk.vals.numel() for lk in links), tuple(storage), sweeps)
    log.info("compacted MLP widths %s -> %s (%d sweeps), storage %s", list(report.widths_before),
             list(report.widths_after), sweeps, list(storage))
    return report


def apply_storage_rule_(model: nn.Module, rule: StorageRule | None = None) -> nn.Module:
    """Turn every ``SparseLinear`` of ``model`` that :class:`StorageRule` prefers dense into ``nn.Linear``."""
    rule = rule or StorageRule()
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseLinear) and choose_storage(m.out_features, m.in_features, m.nnz(),
                                                          m.values.dtype, rule) == "dense":
            replace_module(model, name, _Links.of(m).build(rule, m.training, kind="dense"))
    return model
