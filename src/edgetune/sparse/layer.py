"""``SparseLinear``: a linear layer that stores, trains and computes only its active links.

The official CHT/CHTs code keeps a dense weight times a 0/1 mask, so a 1%-dense network costs what the
dense one costs. Here the weight is a list of links: ``indices`` ``(2, nnz)`` (row, col) sorted
row-major and ``values`` ``(nnz,)``, so weights, gradients and optimizer moments all scale with ``nnz``,
and the products run on sparse kernels (see :mod:`edgetune.sparse.kernels`). Dynamic sparse training
changes the active set with :meth:`SparseLinear.set_topology` and carries the optimizer moments of the
surviving links over with :func:`remap_optimizer_state`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from edgetune.core.errors import ConfigError, ShapeError, did_you_mean
from edgetune.sparse import native
from edgetune.sparse.kernels import (
    Topology,
    csr_linear_t,
    dense_linear,
    gather_linear_t,
    link_keys,
    match_links,
    native_linear,
)

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "CPU_CSR_MAX_DENSITY",
    "CPU_NATIVE_MAX_DENSITY",
    "CUDA_CSR_MAX_DENSITY",
    "GATHER_MAX_DENSITY",
    "SparseLinear",
    "choose_backend",
    "remap_optimizer_state",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "csr", "gather", "dense")
ACTIVATIONS = (None, "relu")
# Densities up to which "auto" uses the CSR kernels, above which it scatters into a dense weight.
# CPU: measured on 2 cores (AMD EPYC Zen 4, torch 2.13 + MKL), one train step (fwd, bwd, Adam) of a
# 1568x1568 layer: CSR is faster than dense below ~20% density at batch 128 and ~12-15% at batch 1024
# (at 10%: 24 vs 48 ms, 162 vs 284 ms); 0.1 keeps CSR only where it wins at both batch sizes.
CPU_CSR_MAX_DENSITY = 0.1
# Native kernels (CPU float32): faster than the dense product up to ~30% density at batch 128 and ~25% at
# batch 1024 (one 1568x1568 layer, forward + backward, one thread, Xeon: at 20%, 11 vs 26 ms and 103 vs
# 131 ms; at 10%, 6 vs 22 and 56 vs 125).
CPU_NATIVE_MAX_DENSITY = 0.2
# CUDA: not measured yet (cuSPARSE vs cuBLAS); cuSPARSE SpMM usually loses to tensor cores above a few %.
CUDA_CSR_MAX_DENSITY = 0.02
# Half types have no CSR / sampled-product kernels everywhere: gather-scatter at very low density.
GATHER_MAX_DENSITY = 0.02
_CSR_DTYPES = (torch.float32, torch.float64)


def native_supported(device: torch.device, dtype: torch.dtype, index_dtype: torch.dtype = torch.int32) -> bool:
    """Whether the native kernels cover this case (CPU, float32 values, int32 links) and loaded."""
    return (device.type == "cpu" and dtype == torch.float32 and index_dtype == torch.int32
            and native.load() is not None)


def choose_backend(density: float, device: torch.device, dtype: torch.dtype,
                   index_dtype: torch.dtype = torch.int32) -> str:
    """The backend "auto" picks for a layer of this density, device, dtype and link index dtype: the
    native kernels where they apply and loaded (up to ``CPU_NATIVE_MAX_DENSITY``), else ``csr`` below
    the CSR density limit, else ``dense``."""
    if dtype not in _CSR_DTYPES:
        return "gather" if density <= GATHER_MAX_DENSITY else "dense"
    if density <= CPU_NATIVE_MAX_DENSITY and native_supported(device, dtype, index_dtype):
        return "native"
    limit = CUDA_CSR_MAX_DENSITY if device.type == "cuda" else CPU_CSR_MAX_DENSITY
    return "csr" if density <= limit else "dense"


def _index_dtype(shape: tuple[int, int], nnz: int) -> torch.dtype:
    return torch.int32 if max(shape[0], shape[1], nnz) < 2**31 - 1 else torch.int64


def _sorted_links(indices: Tensor, shape: tuple[int, int], what: str) -> tuple[Tensor, Tensor | None]:
    """Validate links ``(2, n)`` of an ``(out, in)`` weight; return them sorted row-major in the index
    dtype, and the permutation applied (None when already sorted)."""
    out_f, in_f = shape
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ShapeError(f"{what}: indices must be an integer tensor of shape (2, nnz), got "
                         f"{type(indices).__name__} {getattr(indices, 'dtype', '')}.")
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise ShapeError(f"{what}: indices must have shape (2, nnz) (rows, cols), got {tuple(indices.shape)}.")
    if indices.shape[1] == 0:
        raise ShapeError(f"{what}: no active links (density 0). A sparse layer needs at least one link; "
                         "raise the density or leave this layer dense.")
    rows, cols = indices[0], indices[1]
    lo = int(indices.min())
    r_max, c_max = int(rows.max()), int(cols.max())
    if lo < 0 or r_max >= out_f or c_max >= in_f:
        raise ShapeError(f"{what}: link indices out of range for a weight of shape (out, in) = {shape}: "
                         f"rows span [{int(rows.min())}, {r_max}], cols span [{int(cols.min())}, {c_max}]. "
                         "Rows index output features, cols index input features.")
    keys = link_keys(indices, in_f)
    order = None
    if not bool((keys[1:] > keys[:-1]).all()):
        keys, order = torch.sort(keys)
        dup = keys[1:] == keys[:-1]
        if bool(dup.any()):
            k = int(keys[1:][dup][0])
            raise ShapeError(f"{what}: duplicate link (row {k // in_f}, col {k % in_f}); each link may "
                             "appear once.")
        indices = indices[:, order]
    return indices.to(_index_dtype(shape, indices.shape[1])).contiguous(), order


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` ``(out, in)`` stored as ``nnz`` links.

    Args:
        in_features, out_features: the dense shape of the weight, ``(out_features, in_features)``.
        indices: ``(2, nnz)`` integer (row, col) of the active links, any order, no duplicates.
        values: ``(nnz,)`` weights of the links in the order of ``indices``; default: uniform in
            ``±1/sqrt(nnz / out)`` (``nn.Linear``'s rule applied to the mean fan-in).
        bias: learn a dense bias ``(out,)``.
        backend: "auto" (by density, device and dtype, see :func:`choose_backend`), "native",
            "csr", "gather" or "dense". "native" (edgetune's C++ kernels) needs CPU float32 values; where
            they could not be built it falls back to "csr" (logged once).
        transposed_output: with a sparse backend, return the output as a transposed view (its
            batch dimension contiguous; with the native kernels and 512 or more rows, of a buffer whose
            rows are padded) instead of a contiguous tensor. This saves two transposes per step when the
            output feeds element-wise ops, another ``SparseLinear`` or an ``nn.Linear`` (the layers of
            an MLP); leave it False when a ``.view()`` or attention reads it.
        activation: None, or "relu" for ``y = relu(x @ W^T + b)``; the native kernels fuse it (no
            pass over the output for the ReLU nor for its gradient), the other backends apply it after.

    Buffers/parameters: ``indices`` ``(2, nnz)`` int32 (int64 for huge layers) sorted row-major,
    ``values`` ``(nnz,)``, ``bias`` ``(out,)``. Input ``(..., in)`` (any strides), output ``(..., out)``.
    """

    # the number of links may change during training (density schedules): see train.checkpoint.model_fingerprint
    variable_shape_tensors = ("indices", "values")

    def __init__(self, in_features: int, out_features: int, indices: Tensor, values: Tensor | None = None,
                 bias: bool = True, backend: str = "auto", *, transposed_output: bool = False,
                 activation: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"unknown SparseLinear backend {backend!r}; choose one of {BACKENDS}."
                              + did_you_mean(backend, BACKENDS))
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown SparseLinear activation {activation!r}; choose one of {ACTIVATIONS} "
                              "(None: no activation; apply others as separate modules)."
                              + did_you_mean(str(activation), [a for a in ACTIVATIONS if a]))
        self.in_features, self.out_features, self.backend = int(in_features), int(out_features), backend
        self.transposed_output, self.activation = transposed_output, activation
        shape = (self.out_features, self.in_features)
        idx, order = _sorted_links(indices, shape, self._name())
        nnz = idx.shape[1]
        if dtype is None:
            dtype = values.dtype if values is not None else torch.get_default_dtype()
        if values is None:
            bound = 1.0 / math.sqrt(max(1.0, nnz / self.out_features))
            values = torch.empty(nnz, dtype=dtype, device=device).uniform_(-bound, bound)
        else:
            values = self._checked_values(values, indices.shape[1], order).detach().clone()
        self.register_buffer("indices", idx.to(device))
        self.values = nn.Parameter(values.to(device=device, dtype=dtype))
        if bias:
            b = 1.0 / math.sqrt(self.in_features)
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype).uniform_(-b, b))
        else:
            self.register_parameter("bias", None)
        self._topo: Topology | None = None
        self._topo_key: tuple[Any, ...] | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor, backend: str = "auto", *,
                   transposed_output: bool = False, activation: str | None = None) -> SparseLinear:
        """A ``SparseLinear`` holding ``linear.weight`` under ``mask`` (bool ``(out, in)``) and its bias
        (``activation``: see the class)."""
        w = linear.weight
        if tuple(mask.shape) != tuple(w.shape):
            raise ShapeError(f"mask shape {tuple(mask.shape)} does not match the weight shape (out, in) = "
                             f"{tuple(w.shape)} of Linear(in_features={linear.in_features}, "
                             f"out_features={linear.out_features}); pass a bool mask of shape {tuple(w.shape)}.")
        mask = mask.to(device=w.device, dtype=torch.bool)
        indices = mask.nonzero().t()  # (2, nnz), row-major sorted
        layer = cls(linear.in_features, linear.out_features, indices, w.detach()[mask],
                    bias=linear.bias is not None, backend=backend, transposed_output=transposed_output,
                    activation=activation, device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def _name(self) -> str:
        return f"SparseLinear(in_features={self.in_features}, out_features={self.out_features})"

    def _checked_values(self, values: Tensor, n: int, order: Tensor | None) -> Tensor:
        if values.dim() != 1 or values.shape[0] != n:
            raise ShapeError(f"{self._name()}: values must have shape ({n},), one per link, got "
                             f"{tuple(values.shape)}.")
        return values if order is None else values[order.to(values.device)]

    # ---------------------------------------------------------------- queries
    def nnz(self) -> int:
        """Number of active links."""
        return int(self.indices.shape[1])

    @property
    def density(self) -> float:
        """Active links over ``out * in``."""
        return self.nnz() / (self.out_features * self.in_features)

    def mask(self) -> Tensor:
        """Bool ``(out, in)``, True at the active links."""
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.indices.device)
        m[self.indices[0].long(), self.indices[1].long()] = True
        return m

    def to_dense_weight(self) -> Tensor:
        """Detached dense weight ``(out, in)``, zero off the active links."""
        w = self.values.new_zeros(self.out_features, self.in_features)
        w[self.indices[0].long(), self.indices[1].long()] = self.values.detach()
        return w

    def gather_values(self, indices: Tensor) -> Tensor:
        """Current weights ``(n,)`` at links ``indices`` ``(2, n)`` (any order); 0 where not active."""
        found, pos = match_links(self.indices, indices.to(self.indices.device))
        return torch.where(found, self.values.detach().index_select(0, pos), self.values.new_zeros(()))

    def resolved_backend(self) -> str:
        """The backend the next forward uses."""
        if self.backend == "csr" and self.values.dtype not in _CSR_DTYPES and self.values.device.type == "cpu":
            raise ConfigError(f"{self._name()}: backend 'csr' has no CPU kernels for {self.values.dtype}; "
                              "use backend 'gather', 'dense' or 'auto', or float32/float64 values.")
        if self.backend == "native":
            if self.values.device.type != "cpu" or self.values.dtype != torch.float32:
                raise ConfigError(f"{self._name()}: backend 'native' runs float32 on the CPU, got "
                                  f"{self.values.dtype} on {self.values.device}; use backend 'auto' or 'csr'.")
            return "native" if native_supported(self.values.device, self.values.dtype, self.indices.dtype) else "csr"
        if self.backend != "auto":
            return self.backend
        values, indices = self.values, self.indices
        key = (indices.shape[1], values.dtype, values.device, indices.dtype)
        cached = self.__dict__.get("_auto_backend")
        if cached is None or cached[0] != key:  # the choice depends on these only (and on the loaded kernels)
            cached = (key, choose_backend(self.density, values.device, values.dtype, indices.dtype))
            self.__dict__["_auto_backend"] = cached
        return cached[1]

    def index_bytes(self) -> int:
        """Bytes of the topology: ``indices`` plus the cached CSR structures built so far."""
        return self._topology().index_bytes()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz()}, "
                f"density={self.density:.4g}, bias={self.bias is not None}, backend={self.backend}"
                + (", transposed_output=True" if self.transposed_output else "")
                + (f", activation={self.activation}" if self.activation else ""))

    # ---------------------------------------------------------------- topology changes
    def set_topology(self, new_indices: Tensor, new_values: Tensor,
                     optimizer: torch.optim.Optimizer | None = None, fresh: Tensor | None = None) -> Tensor:
        """Replace the active links (same or different count) in place.

        ``new_indices`` ``(2, n)`` (any order, no duplicates), ``new_values`` ``(n,)`` in that order.
        ``self.values`` stays the same Parameter object (its data is replaced; its grad is cleared).
        With ``optimizer``, its state for ``values`` is remapped (:func:`remap_optimizer_state`): links
        present before keep their state, others start at 0, and so do the links flagged in ``fresh``
        (bool ``(n,)``, same order: a link removed and regrown in one update is a new link).
        Returns the previous ``indices`` ``(2, nnz_old)``, what the optimizer-state remap needs.
        """
        idx, order = _sorted_links(new_indices, (self.out_features, self.in_features), self._name())
        vals = self._checked_values(new_values, new_indices.shape[1], order)
        if fresh is not None:
            fresh = self._checked_values(fresh, new_indices.shape[1], order)
        vals = vals.detach().to(device=self.values.device, dtype=self.values.dtype)
        old = self.indices
        with torch.no_grad():
            if vals.shape == self.values.shape:
                self.values.copy_(vals)
            else:
                self.values.data = vals.clone()
        self.values.grad = None
        self.indices = idx.to(old.device)
        self._topo, self._topo_key = None, None
        if optimizer is not None:
            remap_optimizer_state(optimizer, self.values, old, self.indices, fresh=fresh)
        return old

    def _topology(self) -> Topology:
        idx = self.indices
        key = (idx.data_ptr(), idx._version, idx.device, tuple(idx.shape))
        if self._topo is None or key != self._topo_key:
            self._topo = Topology(idx, (self.out_features, self.in_features))
            self._topo_key = key
        return self._topo

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint may hold another number of links (density schedules): resize before copying.
        saved = state_dict.get(prefix + "indices")
        if isinstance(saved, Tensor) and saved.shape != self.indices.shape:
            self.indices = torch.empty(saved.shape, dtype=saved.dtype, device=self.indices.device)
            self.values.data = self.values.new_empty(saved.shape[1])
            self.values.grad = None
            self._topo, self._topo_key = None, None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- compute
    def forward(self, x: Tensor) -> Tensor:
        """x ``(..., in)`` -> ``(..., out)``."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"{self._name()}: input has {x.shape[-1]} features in its last dimension "
                             f"(shape {tuple(x.shape)}), expected {self.in_features}.")
        backend = self.resolved_backend()
        topo = self._topology()
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (N, in)
        relu = self.activation == "relu"
        if backend == "dense":
            y = dense_linear(x2, self.values, self.bias, topo)
            y = torch.relu(y) if relu else y
        else:
            kernels = native.load() if backend == "native" else None
            if kernels is not None:  # reads x2 in either layout; the ReLU fused
                yt = native_linear(x2, self.values, self.bias, topo, kernels, relu)
            else:
                fn = gather_linear_t if backend == "gather" else csr_linear_t  # native unavailable: csr
                yt = fn(x2.t().contiguous(), self.values, self.bias, topo)  # (out, N)
                yt = torch.relu(yt) if relu else yt
            y = yt.t()  # (out, N) -> (N, out) view
            if not self.transposed_output:
                y = y.contiguous()
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)


def remap_optimizer_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, old_indices: Tensor,
                          new_indices: Tensor, fresh: Tensor | None = None) -> None:
    """Carry the per-link optimizer state of ``param`` from ``old_indices`` to ``new_indices``.

    Both ``(2, n)`` sorted row-major (a layer's ``indices`` before and after ``set_topology``); the
    state tensors of shape ``(n_old,)`` (Adam ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, SGD
    ``momentum_buffer``, ...) keep their entries for surviving links and get 0 for new ones (and for the
    links flagged in ``fresh``, bool ``(n_new,)``, even when ``old_indices`` held them). Scalars
    such as Adam's ``step`` are kept. Same-count updates write in place; a changed count replaces the
    state tensors (the optimizer keeps tracking ``param`` itself, which is the same object).
    """
    state = optimizer.state.get(param)
    if not state:
        return
    n_old, n_new = old_indices.shape[1], new_indices.shape[1]
    any_fresh = fresh is not None and bool(fresh.any())
    if n_old == n_new and not any_fresh and torch.equal(old_indices, new_indices.to(old_indices.device)):
        return
    found, pos = match_links(old_indices, new_indices)
    if any_fresh:
        found = found & ~fresh.to(found.device)
    for name, t in list(state.items()):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n_old:
            continue
        f, p = found.to(t.device), pos.to(t.device)
        moved = torch.where(f, t.index_select(0, p), t.new_zeros(()))
        if n_old == n_new:
            t.copy_(moved)
        else:
            state[name] = moved
    logger.debug("remapped optimizer state: %d -> %d links, %d kept", n_old, n_new, int(found.sum()))
