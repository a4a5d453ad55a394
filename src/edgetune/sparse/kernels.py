"""Compute kernels of a sparse linear map ``y = x @ W^T + b`` whose ``W`` is stored as a list of links.

A topology is the set of active links ``(row, col)`` of an ``(out, in)`` weight, sorted row-major, with
one value per link. Four backends compute the same forward and backward on that format:

- ``native``: edgetune's own C++ kernels (:mod:`edgetune.sparse.native`, float32 on the CPU, int32
  links): one call for the forward (bias and an optional ReLU fused), one for the backward (value, bias
  and input gradients from one pass over each batch tile; the ReLU mask applied on the way). They read the
  input in either layout, so no transposed copies are made. Fastest on the CPU at low density.
- ``csr``: sparse CSR x dense products (MKL on CPU, cuSPARSE on CUDA); the value gradient is a
  sampled dense-dense product (``torch.sparse.sampled_addmm``) and the input gradient uses a cached
  transposed CSR. Fastest at low density.
- ``gather``: ``index_select`` + ``index_add_`` in chunks; works for every dtype and device.
- ``dense``: scatter the values into a dense ``(out, in)`` weight, then ``F.linear``; fastest at high
  density. The dense weight is a temporary of the step, not stored.

All activations are handled transposed, ``(in, N)`` and ``(out, N)``, because sparse-times-dense and
the sampled product are fastest with the batch as the contiguous dimension; the layer returns the
transposed view so that a chain of sparse layers (with element-wise ops between) never copies.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from edgetune.core.errors import ShapeError
from edgetune.sparse import native

__all__ = ["Topology", "csr_linear_t", "dense_linear", "gather_linear_t", "link_keys", "match_links",
           "native_linear"]

# Elements of the (chunk, N) temporaries of the gather backend; 2^18 floats = 1 MiB stays in L2.
_GATHER_CHUNK_ELEMENTS = 1 << 18


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor over existing index tensors (no copy, no invariant check)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state" (once per process)
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _crow(rows: Tensor, n: int) -> Tensor:
    """CSR row pointer ``(n + 1,)`` of sorted row indices ``rows``."""
    counts = torch.bincount(rows, minlength=n)
    crow = torch.zeros(n + 1, dtype=rows.dtype, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow


class Topology:
    """Index structures of one sparse ``(out, in)`` weight, derived from its sorted links.

    Built from ``indices`` ``(2, nnz)`` (row-major sorted, unique, in range: the layer checks).
    The row-major CSR pointer is built eagerly; the transposed CSR (for the input gradient) lazily,
    on the first backward that needs it.
    """

    def __init__(self, indices: Tensor, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.rows = indices[0]  # (nnz,)
        self.cols = indices[1]  # (nnz,)
        self.crow = _crow(self.rows, shape[0])  # (out + 1,)
        self._transposed: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())

    def transposed(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(crow_t (in + 1,), rows_t (nnz,), perm_t (nnz,))``: CSR of ``W^T``; ``values[perm_t]``
        lists the values in column-major order."""
        if self._transposed is None:
            out_f, _ = self.shape
            key = self.cols.long() * out_f + self.rows.long()  # column-major position
            perm = torch.argsort(key).to(self.rows.dtype)  # int32 when the links are: 4 bytes a link
            cols_t = self.cols.index_select(0, perm)
            self._transposed = (_crow(cols_t, self.shape[1]), self.rows.index_select(0, perm), perm)
        return self._transposed

    def index_bytes(self) -> int:
        """Bytes held by the index structures built so far (links, row pointers, transposed CSR)."""
        tensors = [self.rows, self.cols, self.crow, *(self._transposed or ())]
        return sum(t.numel() * t.element_size() for t in tensors)


class _CsrLinearT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xt: Tensor, values: Tensor, bias: Tensor | None, topo: Topology) -> Tensor:  # type: ignore[override]
        w = _csr(topo.crow, topo.cols, values, topo.shape)
        if bias is None:
            yt = torch.sparse.mm(w, xt)  # (out, N)
        else:  # start from the bias: saves the zero fill and a pass over the output
            yt = bias.unsqueeze(1).repeat(1, xt.shape[1])  # always a copy: addmm writes into it (N=1 too)
            torch.addmm(yt, w, xt, out=yt)
        ctx.save_for_backward(xt, values)
        ctx.topo = topo
        return yt

    @staticmethod
    @once_differentiable
    def backward(ctx, gyt: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xt, values = ctx.saved_tensors
        topo: Topology = ctx.topo
        gyt = gyt.contiguous()  # (out, N); free when the next op kept the transposed layout
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            crow_t, rows_t, perm_t = topo.transposed()
            wt = _csr(crow_t, rows_t, values.index_select(0, perm_t),
                      (topo.shape[1], topo.shape[0]))
            gx = torch.sparse.mm(wt, gyt)  # (in, N)
        if ctx.needs_input_grad[1]:
            pattern = _csr(topo.crow, topo.cols, values, topo.shape)
            # grad_values[l] = sum_n gyt[row_l, n] * xt[col_l, n]: dense product sampled at the links.
            gv = torch.sparse.sampled_addmm(pattern, gyt, xt.t(), beta=0.0).values()
        if ctx.needs_input_grad[2]:
            gb = gyt.sum(1)
        return gx, gv, gb, None


class _NativeLinear(torch.autograd.Function):
    # spec = (topology, kernels, relu, relu_mask): one argument, as Function.apply walks every argument
    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None,  # type: ignore[override]
                spec: tuple[Topology, native.NativeKernels, bool, bool]) -> Tensor:
        topo, kernels, relu, relu_mask = spec
        values = values.contiguous()
        bias = None if bias is None else bias.contiguous()
        yt, x_used, mask = kernels.forward(topo.crow, topo.cols, values, bias, x, relu, relu_mask=relu_mask)
        ctx.save_for_backward(x_used, values, mask)
        ctx.spec = spec
        return yt

    @staticmethod
    @once_differentiable
    def backward(ctx, gyt: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, values, mask = ctx.saved_tensors
        topo, kernels, relu, _ = ctx.spec
        if relu and mask is None:
            raise RuntimeError("native sparse layer: backward through a ReLU forward that ran without gradients")
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        gx, gv, gb = kernels.backward(topo.crow, topo.cols, topo.transposed() if need_x else None, values, gyt,
                                      mask, x, need_v, need_b)
        return gx, gv, gb, None


class _GatherLinearT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xt: Tensor, values: Tensor, bias: Tensor | None, topo: Topology) -> Tensor:  # type: ignore[override]
        out_f = topo.shape[0]
        yt = xt.new_zeros(out_f, xt.shape[1])  # (out, N)
        for s, e in _chunks(topo.nnz, xt.shape[1]):
            rows, cols = topo.rows[s:e], topo.cols[s:e]
            yt.index_add_(0, rows, xt.index_select(0, cols).mul_(values[s:e].unsqueeze(1)))
        if bias is not None:
            yt.add_(bias.unsqueeze(1))
        ctx.save_for_backward(xt, values)
        ctx.topo = topo
        return yt

    @staticmethod
    @once_differentiable
    def backward(ctx, gyt: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xt, values = ctx.saved_tensors
        topo: Topology = ctx.topo
        gyt = gyt.contiguous()
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = xt.new_zeros(xt.shape) if need_x else None
        gv = values.new_empty(values.shape) if need_v else None
        for s, e in _chunks(topo.nnz, xt.shape[1]):
            g_rows = gyt.index_select(0, topo.rows[s:e])  # (chunk, N)
            if gv is not None:
                gv[s:e] = (g_rows * xt.index_select(0, topo.cols[s:e])).sum(1)
            if gx is not None:
                gx.index_add_(0, topo.cols[s:e], g_rows.mul_(values[s:e].unsqueeze(1)))
        gb = gyt.sum(1) if ctx.needs_input_grad[2] else None
        return gx, gv, gb, None


def _chunks(nnz: int, n: int) -> list[tuple[int, int]]:
    step = max(1, _GATHER_CHUNK_ELEMENTS // max(1, n))
    return [(s, min(s + step, nnz)) for s in range(0, nnz, step)]


def csr_linear_t(xt: Tensor, values: Tensor, bias: Tensor | None, topo: Topology) -> Tensor:
    """``(W @ xt + b[:, None])`` with the CSR backend. xt ``(in, N)`` contiguous -> ``(out, N)``."""
    return _CsrLinearT.apply(xt, values, bias, topo)


def native_linear(x: Tensor, values: Tensor, bias: Tensor | None, topo: Topology,
                  kernels: native.NativeKernels, relu: bool = False) -> Tensor:
    """``act(x @ W^T + b)`` with the native kernels (float32, CPU, int32 links: the layer checks).
    x ``(N, in)``, row-major or the transposed view of a row-major ``(in, N)`` (else copied) -> its
    transpose ``(out, N)``, row-major with, from N = 512 on, a padded leading dimension (see
    :mod:`edgetune.sparse.native`); ``relu`` fuses a ReLU."""
    if x.dtype != values.dtype or x.device != values.device:
        raise ShapeError(f"sparse layer with {values.dtype} weights on {values.device} got an input of dtype "
                         f"{x.dtype} on {x.device}; cast the input (x.to(...)) or the layer (layer.to(...)).")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, values, bias))
    return _NativeLinear.apply(x, values, bias, (topo, kernels, relu, relu and grad))


def gather_linear_t(xt: Tensor, values: Tensor, bias: Tensor | None, topo: Topology) -> Tensor:
    """``(W @ xt + b[:, None])`` with the gather-scatter backend. xt ``(in, N)`` -> ``(out, N)``."""
    return _GatherLinearT.apply(xt, values, bias, topo)


def dense_linear(x: Tensor, values: Tensor, bias: Tensor | None, topo: Topology) -> Tensor:
    """``F.linear(x, W, b)`` with ``W`` scattered from ``values``. x ``(N, in)`` -> ``(N, out)``."""
    out_f, in_f = topo.shape
    flat = topo.rows.long() * in_f + topo.cols.long()  # (nnz,) row-major positions
    weight = values.new_zeros(out_f * in_f).scatter(0, flat, values).view(out_f, in_f)
    return F.linear(x, weight, bias)


def link_keys(indices: Tensor, n_cols: int) -> Tensor:
    """Row-major position ``row * n_cols + col`` (int64) of each link of ``indices`` ``(2, nnz)``."""
    return indices[0].long() * n_cols + indices[1].long()


def match_links(old_indices: Tensor, new_indices: Tensor) -> tuple[Tensor, Tensor]:
    """Where each new link sits among the old ones.

    Both ``(2, n)``; ``old_indices`` sorted row-major without duplicates, ``new_indices`` in any order.
    Returns ``found`` ``(n_new,)`` bool and
    ``pos`` ``(n_new,)`` int64: ``old[:, pos[i]] == new[:, i]`` wherever ``found[i]``.
    """
    n_cols = int(max(int(old_indices[1].max()) if old_indices.numel() else 0,
                     int(new_indices[1].max()) if new_indices.numel() else 0)) + 1
    old_keys = link_keys(old_indices, n_cols)
    new_keys = link_keys(new_indices, n_cols).to(old_keys.device)
    if old_keys.numel() == 0:
        return torch.zeros_like(new_keys, dtype=torch.bool), torch.zeros_like(new_keys)
    pos = torch.searchsorted(old_keys, new_keys).clamp_(max=old_keys.numel() - 1)
    return old_keys[pos] == new_keys, pos
