"""Exact CH3-L3 / CH2-L3 at low density: cost that follows the length-3 paths (CPU, sparse products).

Same scores as :func:`edgetune.sparse.predictors_exact.path_scores` (definitions in
``research/cht-spec.md`` §1.1-1.2), computed without any dense ``(N, N)`` intermediate of the grouped
algorithm. Notation as there: a path ``a - i - b - k`` contributes ``U[i, k] · V[a, b]`` with
``U[i, k] = f(C_in[i, k], deg(i))`` and ``V[a, b] = f(C_out[a, b], deg(b))`` (``C`` = common-neighbour
counts, ``f`` the CH3 or CH2 factor, 0 where ``deg - C = 0``).

On a path, ``C >= 1``. Where ``C = 1`` the factor depends on the intermediate node only:
``u1[i] = f(1, deg(i))``, ``v1[b] = f(1, deg(b))``. Writing ``U = u1 + dU`` and ``V = v1 + dV``, where the
corrections ``dU``, ``dV`` live on node pairs with at least two common neighbours (few at low density),

    score = M (U ⊙ Cv)  +  (dV ⊙ Cu) M  +  Σ_{paths} dU[i, k] · dV[a, b]

with the weighted counts ``Cv = Mᵀ diag(v1) M`` (``Cv[i, k] = Σ_{b ∈ N(i) ∩ N(k)} v1[b]``) and
``Cu = M diag(u1) Mᵀ``. Every term is exact: the first two are sparse-sparse products (or, once one
factor is dense enough, a CSR-times-dense product), the last enumerates only the paths on which *both*
intermediates have another common neighbour — 2% of the paths of a random 1024² mask at 1%, 12% at
4096² 1% (it grows like ``(I p²)(O p²)``; :func:`sparse_path_cost` estimates it, and
:func:`edgetune.sparse.predictors_exact.path_scores` switches to the grouped algorithm where it would
dominate). The counts come with their weighted sums from one complex product
(``Mᵀ diag(1 + j·v1) M``: real part ``C_in``, imaginary part ``Cv``). Paths with ``b = a`` end on
existing links, which are overwritten with ``fill_existing``.

Work: ``O(nnz · I)`` at most for the first two terms, the corrected paths for the last, the wedges or
pairs that find them, and the ``(O, I)`` result; no ``(O+I)²`` buffer. The sparse-sparse products run on
the native kernel (:mod:`edgetune.sparse.native.paths`: one multiply-add per path term, accumulated straight
into the dense result, OpenMP over its rows) where it builds, else on scipy's products, whose row blocks run
on ``torch.get_num_threads()`` threads (they release the GIL; one is faster on a busy machine).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from edgetune.sparse.native import paths as native_paths
from edgetune.sparse.native.paths import PathKernels

__all__ = ["SparseLayer", "layer_csr", "mask_links", "sparse_path_cost", "sparse_path_scores"]

log = logging.getLogger(__name__)

PathModel = Literal["ch3", "ch2"]
DeltaAt = tuple[np.ndarray, np.ndarray]  # corrections: flat keys ``row * n + col`` and values
# lookups of corrections: a dense table for key spaces up to LOOKUP_TABLE_MAX (4096²) when there are at
# least 1/LOOKUP_QUERIES_PER_ENTRY queries per entry (a table costs its pages), else a hash filter + search
LOOKUP_TABLE_MAX = 2**24
LOOKUP_QUERIES_PER_ENTRY = 16
PAIRS_BELOW = 1.0  # find the doubly corrected paths from the pairs when under this x the wedges
NATIVE_OFF = False  # tests set it to compare with the scipy path
BLOCK_FLOPS = 2**22  # multiply-adds per row block of a sparse product (bounds its temporary output)
WEDGE_BLOCK = 2**22  # wedges enumerated per block
# seconds per operation on this project's 2-core CPU, one thread, float32 (used to pick the algorithm)
SEC_SPGEMM = 8e-9  # one multiply-add of a sparse-sparse product, with its share of output handling
SEC_SPMM = 4e-10  # one multiply-add of CSR times dense (memory-bound axpy of dense rows)
SEC_DENSE = 2e-9  # one entry of a dense operand built from a sparse one
SEC_NATIVE = 1.5e-9  # one multiply-add of the native product into the dense output (native/paths.cpp)


@dataclass(frozen=True)
class SparseLayer:
    """CSR views of a mask ``(O, I)``: ``s`` (``O x I``) and ``st`` (its transpose), both with unit
    data and sorted indices, the flat indices of the links, and the degrees (float, ``work`` dtype)."""

    s: sp.csr_matrix
    st: sp.csr_matrix
    flat: np.ndarray
    links: np.ndarray  # (O * I,) bool, the mask in row-major order
    deg_out: np.ndarray
    deg_in: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.s.shape


def mask_links(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat row-major indices of the links of a bool CPU mask ``(O, I)`` and their rows and columns
    (numpy; a bool tensor's own ``sum`` over rows and columns costs more than this whole pass)."""
    flat = np.flatnonzero(mask.contiguous().numpy().reshape(-1))
    rows, cols = np.divmod(flat, mask.shape[1])
    return flat, rows, cols


def layer_csr(
    mask: torch.Tensor, dtype: np.dtype, links: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> SparseLayer:
    """CSR form of a bool CPU mask ``(O, I)`` with unit data of numpy ``dtype`` (``links``: what
    :func:`mask_links` returns for it, when already computed)."""
    n_out, n_in = mask.shape
    flat, rows, cols = links if links is not None else mask_links(mask)
    idx = np.int32 if max(n_out, n_in, flat.size) < 2**31 else np.int64
    deg_out, deg_in = np.bincount(rows, minlength=n_out), np.bincount(cols, minlength=n_in)
    indptr = np.zeros(n_out + 1, dtype=idx)
    np.cumsum(deg_out, out=indptr[1:])
    s = sp.csr_matrix((np.ones(flat.size, dtype), cols.astype(idx), indptr), shape=(n_out, n_in))
    st = s.T.tocsr()
    st.sort_indices()
    links_flat = mask.contiguous().numpy().reshape(-1)
    return SparseLayer(s, st, flat, links_flat, deg_out.astype(dtype), deg_in.astype(dtype))


def lc_factor(common: np.ndarray, degree: np.ndarray, model: PathModel) -> np.ndarray:
    """CH3 ``1/sqrt(deg - C)`` or CH2 ``sqrt((1 + C)/(deg - C))``; 0 where ``deg - C <= 0``."""
    ext = np.subtract(degree, common, dtype=degree.dtype)
    valid = ext > 0
    out = np.zeros_like(ext)
    if model == "ch3":
        np.sqrt(ext, out=out, where=valid)
        np.reciprocal(out, out=out, where=valid)
    else:
        np.divide(1 + common, ext, out=out, where=valid)
        np.sqrt(out, out=out)
    return out


def _rows_of(csr: sp.csr_matrix) -> np.ndarray:
    """Row index of every stored entry of ``csr``."""
    return np.repeat(np.arange(csr.shape[0], dtype=csr.indices.dtype), np.diff(csr.indptr))


def _scaled(csr: sp.csr_matrix, row_weight: np.ndarray, complex_dtype: np.dtype) -> sp.csr_matrix:
    """``diag(1 + j·row_weight) @ csr`` for a unit-data CSR (same structure, complex data)."""
    data = (1 + 1j * row_weight[_rows_of(csr)]).astype(complex_dtype)
    return sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)


@dataclass(frozen=True)
class _Side:
    """Entries of one common-neighbour product (``C_in`` or ``C_out``): row, column, count, weighted sum."""

    rows: np.ndarray
    cols: np.ndarray
    count: np.ndarray
    weighted: np.ndarray
    csr: sp.csr_matrix  # structure, any data


def _common(left: sp.csr_matrix, right_scaled: sp.csr_matrix) -> _Side:
    """Counts and weighted counts of common neighbours, ``left @ right_scaled`` split in real/imag parts.

    No entry cancels: every count is >= 1, so the structure is exactly the node pairs at distance 2.
    """
    z = _spgemm(left, right_scaled)
    return _Side(_rows_of(z), z.indices, z.data.real.copy(), z.data.imag.copy(), z)


def _spgemm(left: sp.csr_matrix, right: sp.csr_matrix) -> sp.csr_matrix:
    with np.errstate(all="ignore"):
        return left @ right


class _Lookup:
    """Values at integer keys ``< space``: a dense table for small spaces, else a hash filter + search."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, space: int, queries: int) -> None:
        self.dense = space <= LOOKUP_TABLE_MAX and LOOKUP_QUERIES_PER_ENTRY * queries >= space
        self.dtype = values.dtype
        if self.dense:
            self.table = np.zeros(space, dtype=values.dtype)
            self.table[keys] = values
            return
        order = np.argsort(keys)
        self.keys, self.values = keys[order], values[order]
        self.bits = max(12, math.ceil(math.log2(max(32 * keys.size, 1))))
        self.filter = np.zeros(2**self.bits, dtype=bool)
        self.filter[self._hash(self.keys)] = True

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - self.bits)

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        """Values at ``queries`` (0 for keys that are absent)."""
        if self.dense:
            return self.table[queries]
        out = np.zeros(queries.size, dtype=self.dtype)
        cand = np.flatnonzero(self.filter[self._hash(queries)])
        if cand.size and self.keys.size:
            pos = np.searchsorted(self.keys, queries[cand]).clip(max=self.keys.size - 1)
            hit = self.keys[pos] == queries[cand]
            out[cand[hit]] = self.values[pos[hit]]
        return out


def _corrections(
    side: _Side, nodes: np.ndarray, degree: np.ndarray, base: np.ndarray, model: PathModel, full: bool
) -> tuple[np.ndarray | None, np.ndarray, sp.csr_matrix]:
    """Factor ``f(C, degree[nodes])`` of the entries (``nodes``: the node whose degree counts, per entry;
    ``degree``, ``base``: per node) and, where the pair has two or more common neighbours (off the
    diagonal), the non-zero corrections ``factor - base[nodes]`` as a CSR matrix of ``side``'s shape.
    Returns ``(factor of every entry when full, else None; positions of the corrections; corrections)``."""
    multi = np.flatnonzero((side.count >= 2) & (side.rows != side.cols))
    if full:
        factor = lc_factor(side.count, degree[nodes], model)
        at_multi = factor[multi]
    else:
        factor, at_multi = None, lc_factor(side.count[multi], degree[nodes[multi]], model)
    delta = at_multi - base[nodes[multi]]
    keep = multi[delta != 0]
    return factor, keep, _csr_by_rows(side.rows[keep], side.cols[keep], delta[delta != 0], side.csr.shape)


def _csr_by_rows(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR from entries already grouped by row (rows non-decreasing; columns in any order within a row, as
    scipy's products leave them): no sort, unlike building from coordinates."""
    indptr = np.zeros(shape[0] + 1, dtype=cols.dtype)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return sp.csr_matrix((values, cols, indptr), shape=shape)


def _keys(csr: sp.csr_matrix) -> DeltaAt:
    """The entries of ``csr`` as flat keys ``row * n + col`` and values."""
    return _rows_of(csr).astype(np.int64) * csr.shape[1] + csr.indices, csr.data


def _row_blocks(row_flops: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed flops stay under ``limit`` (at least one row each)."""
    n = row_flops.size
    if n == 0:
        return []
    cum = np.cumsum(row_flops, dtype=np.float64)
    blocks, start = [], 0
    while start < n:
        base = cum[start - 1] if start else 0.0
        stop = int(np.searchsorted(cum, base + limit, side="right"))
        stop = min(max(stop, start + 1), n)
        blocks.append((start, stop))
        start = stop
    return blocks


def _to_torch_csr(csr: sp.csr_matrix) -> torch.Tensor:
    """Zero-copy torch view of a scipy CSR matrix (without torch's "CSR support is in beta" notice)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr),
            torch.from_numpy(csr.indices),
            torch.from_numpy(csr.data),
            csr.shape,
            check_invariants=False,
        )


def _native() -> PathKernels | None:
    return None if NATIVE_OFF else native_paths.load()


def _add_spgemm(out: torch.Tensor, left: sp.csr_matrix, right: sp.csr_matrix, threads: int) -> None:
    """``out += left @ right``: by the native kernel straight into ``out`` when it is available, else by scipy's
    sparse products over row blocks (threads share the blocks)."""
    if left.nnz == 0 or right.nnz == 0:
        return
    kernels = _native()
    if kernels is not None and kernels.fits(left, right):
        kernels.add_product(out, left, right, threads)
        return
    row_flops = left @ np.diff(right.indptr).astype(np.float64)
    blocks = _row_blocks(row_flops, BLOCK_FLOPS)

    def run(block: tuple[int, int]) -> None:
        lo, hi = block
        prod = _spgemm(left[lo:hi], right)
        if prod.nnz:
            out[lo:hi].add_(_to_torch_csr(prod))

    if threads > 1 and len(blocks) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(run, blocks))
    else:
        for block in blocks:
            run(block)


def _add_product(
    out: torch.Tensor, left: sp.csr_matrix, right: sp.csr_matrix, threads: int, way: str | None = None
) -> str:
    """``out += left @ right`` (both CSR), by the cheapest of three ways; returns the way taken.

    ``sparse``: sparse-sparse product (cost ~ its multiply-adds); ``dense_right``: CSR(left) @ dense(right)
    (``nnz(left) · cols`` multiply-adds plus the dense operand); ``dense_left``: dense(left) @ CSR(right).
    ``way`` forces one of them.
    """
    n, inner = left.shape
    m = right.shape[1]
    col_nnz = np.bincount(left.indices, minlength=inner).astype(np.float64)
    flops = float(col_nnz @ np.diff(right.indptr))
    native = _native()
    costs = {
        "sparse": (SEC_NATIVE if native is not None and native.fits(left, right) else SEC_SPGEMM) * flops,
        "dense_right": SEC_SPMM * left.nnz * m + SEC_DENSE * inner * m,
        "dense_left": SEC_SPMM * right.nnz * n + SEC_DENSE * n * inner,
    }
    way = way or min(costs, key=costs.__getitem__)
    if flops == 0:
        return way
    if way == "sparse":
        _add_spgemm(out, left, right, threads)
    elif way == "dense_right":
        out.addmm_(_to_torch_csr(left), torch.from_numpy(right.toarray()))
    else:
        out.addmm_(torch.from_numpy(left.toarray()), _to_torch_csr(right))
    return way


def _by_degree(deg: np.ndarray, limit: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield ``(items, degrees, d)``: indices of ``deg`` with a value in ``(0, d]``, ``d`` the largest in
    the batch, degrees within ~10% (+2) of each other (so padding to ``d`` costs little) and batches of
    at most ``max(1, limit // d²)`` items."""
    order = np.argsort(deg, kind="stable")
    sorted_deg = deg[order]
    start = int(np.searchsorted(sorted_deg, 0, side="right"))
    while start < order.size:
        low = int(sorted_deg[start])
        stop = int(np.searchsorted(sorted_deg, int(low * 1.1) + 2, side="right"))
        d = int(sorted_deg[stop - 1])
        stop = min(stop, start + max(1, limit // (d * d)))
        d = int(sorted_deg[stop - 1])
        yield order[start:stop], sorted_deg[start:stop], d
        start = stop


def _neighbour_table(
    csr: sp.csr_matrix, nodes: np.ndarray, degrees: np.ndarray, d: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(len(nodes), d)`` neighbours of rows ``nodes`` padded to ``d``, their entry positions and a
    validity mask (padding slots repeat the row's first entry and are marked invalid)."""
    slots = np.arange(d)
    valid = slots < degrees[:, None]
    pos = csr.indptr[nodes].astype(np.int64)[:, None] + np.where(valid, slots, 0)
    return csr.indices[pos].astype(np.int64), pos, valid


def _wedge_triples(layer: SparseLayer, dv: DeltaAt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First halves ``a - i - b`` of the paths with ``dV[a, b] != 0``: output ``a``, the entry of
    ``(i, b)`` in ``st`` (input-major CSR), and ``dV[a, b]``. All wedges through each input node ``i``
    (pairs of its neighbours) are looked up, input nodes batched by degree."""
    st, n_out = layer.st, layer.shape[0]
    lookup = _Lookup(*dv, n_out * n_out, int(np.square(np.diff(st.indptr).astype(np.int64)).sum()))
    found = []
    for nodes, degrees, d in _by_degree(np.diff(st.indptr), WEDGE_BLOCK):
        nbrs, pos, valid = _neighbour_table(st, nodes, degrees, d)  # (n, d) outputs of each input node
        value = lookup((nbrs[:, :, None] * n_out + nbrs[:, None, :]).reshape(-1))  # dV[a, b], (n, d, d)
        value *= (valid[:, :, None] & valid[:, None, :]).reshape(-1)
        nz = np.flatnonzero(value)
        g, rest = np.divmod(nz, d * d)
        slot_a, slot_b = np.divmod(rest, d)
        found.append((nbrs[g, slot_a], pos[g, slot_b], value[nz]))
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=layer.deg_out.dtype)
    a, edge, value = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return a, edge, value


def _pair_triples(layer: SparseLayer, dv: DeltaAt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same as :func:`_wedge_triples`, found from the pairs ``(a, b)`` with ``dV != 0`` (cheaper when they
    are few): ``i`` runs over ``N(a)`` and is kept where ``(b, i)`` is a link. Returns output ``a``, the
    flat index ``b * I + i`` of the link ``(b, i)``, and ``dV[a, b]``."""
    n_out, n_in = layer.shape
    a_p, b_p = np.divmod(dv[0], n_out)
    rows = layer.s[a_p]  # (P, I): the inputs of each pair's a
    pair = np.repeat(np.arange(a_p.size), np.diff(rows.indptr))
    link = b_p[pair] * n_in + rows.indices
    hit = np.flatnonzero(layer.links[link])
    return a_p[pair[hit]], link[hit], dv[1][pair[hit]]


def _second_halves(layer: SparseLayer, inputs: np.ndarray, outputs: np.ndarray, du: DeltaAt) -> sp.csr_matrix:
    """``(E, I)`` CSR: row ``j`` holds ``dU[i, k]`` for ``k ∈ N(b)``, ``(i, b)`` = ``(inputs[j], outputs[j])``
    (the second halves ``i - b - k`` of the paths)."""
    n_in = layer.shape[1]
    rows = layer.s[outputs]  # (E, I): the inputs k of each b
    row = np.repeat(np.arange(inputs.size), np.diff(rows.indptr))
    query = inputs[row].astype(np.int64) * n_in + rows.indices
    value = _Lookup(*du, n_in * n_in, query.size)(query)
    keep = value != 0
    indptr = np.zeros(inputs.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(row[keep], minlength=inputs.size), out=indptr[1:])
    return sp.csr_matrix((value[keep], rows.indices[keep], indptr), shape=(inputs.size, n_in))


def _add_double_corrections(
    out: torch.Tensor, layer: SparseLayer, dv_csr: sp.csr_matrix, du_csr: sp.csr_matrix, threads: int
) -> int | None:
    """``out[a, k] += Σ_{paths a-i-b-k} dU[i, k] · dV[a, b]``; returns the number of such path terms (None
    from the native kernel, which sums them in one pass without counting: ``native/paths.cpp``).

    The first halves ``a - i - b`` with ``dV[a, b] != 0`` are found from the wedges through the input
    nodes or from the pairs ``(a, b)``, whichever is fewer; each link ``(i, b)`` they use gets one row of
    second halves ``dU[i, k]``, ``k ∈ N(b)``, and a sparse product sums the paths.
    """
    if dv_csr.nnz == 0 or du_csr.nnz == 0:
        return 0
    n_out, n_in = layer.shape
    kernels = _native()
    if kernels is not None and kernels.fits(layer.s, layer.st):
        kernels.add_double(out, layer.s, layer.st, dv_csr, du_csr, threads)
        return None
    dv, du = _keys(dv_csr), _keys(du_csr)
    wedges = float(np.square(np.diff(layer.st.indptr).astype(np.float64)).sum())
    by_pairs = float(layer.deg_out[dv[0] // n_out].sum())
    if by_pairs < PAIRS_BELOW * wedges:
        a, link, value = _pair_triples(layer, dv)
        used, column = np.unique(link, return_inverse=True)
        outputs, inputs = np.divmod(used, n_in)
    else:
        a, edge, value = _wedge_triples(layer, dv)
        mark = np.zeros(layer.st.nnz, dtype=bool)
        mark[edge] = True
        used = np.flatnonzero(mark)
        column = (np.cumsum(mark) - 1)[edge]
        inputs, outputs = _rows_of(layer.st)[used], layer.st.indices[used]
    if a.size == 0:
        return 0
    left_t = sp.csr_matrix((value, (a, column)), shape=(n_out, used.size))
    right = _second_halves(layer, inputs, outputs, du)
    _add_spgemm(out, left_t, right, threads)
    return int(np.bincount(left_t.indices, minlength=used.size) @ np.diff(right.indptr))


def sparse_path_cost(deg_out: torch.Tensor, deg_in: torch.Tensor) -> float:
    """Rough seconds of :func:`sparse_path_scores` on a mask with these degrees (random-graph estimate).

    Dominated by the two products with ``nnz · n`` multiply-adds and by the doubly corrected paths,
    ``paths · (1 - e^{-λ_in}) (1 - e^{-λ_out})`` with ``λ`` the expected number of *other* common
    neighbours of the pair joined by a path's intermediate.
    """
    n_out, n_in = deg_out.numel(), deg_in.numel()
    nnz = float(deg_out.sum())
    d_out, d_in = deg_out.double(), deg_in.double()
    lam_out = float((d_in * (d_in - 1)).sum()) / max(n_out * n_out, 1)  # other common inputs of (a, b)
    lam_in = float((d_out * (d_out - 1)).sum()) / max(n_in * n_in, 1)
    paths = float((d_in * d_in).sum()) * float((d_out * d_out).sum()) / max(nnz, 1.0)
    double = paths * (1 - math.exp(-lam_in)) * (1 - math.exp(-lam_out))
    wedges = float((d_in * d_in).sum() + (d_out * d_out).sum())
    sec = SEC_NATIVE if _native() is not None else SEC_SPGEMM
    products = min(SEC_SPMM * nnz * (n_in + n_out), sec * paths)
    return products + sec * double + SEC_SPGEMM * wedges + SEC_DENSE * n_out * n_in


def sparse_path_scores(
    mask: torch.Tensor,
    model: PathModel,
    *,
    dtype: torch.dtype,
    fill_existing: float,
    links: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> torch.Tensor:
    """Exact path-based CH scores ``(O, I)`` of a bool CPU mask (float32 or float64 ``dtype``; ``links``:
    see :func:`layer_csr`)."""
    n_out, n_in = mask.shape
    real = np.float64 if dtype == torch.float64 else np.float32
    cplx = np.complex128 if dtype == torch.float64 else np.complex64
    threads = max(1, torch.get_num_threads())
    layer = layer_csr(mask, real, links)
    out = torch.zeros(n_out, n_in, dtype=dtype)
    if layer.flat.size == 0:
        return out
    s, st = layer.s, layer.st
    v1 = lc_factor(np.ones_like(layer.deg_out), layer.deg_out, model)  # f(1, deg(b)), outputs
    u1 = lc_factor(np.ones_like(layer.deg_in), layer.deg_in, model)  # f(1, deg(i)), inputs
    c_in = _common(st, _scaled(s, v1, cplx))  # (I, I): C_in and Cv
    c_out = _common(s, _scaled(st, u1, cplx))  # (O, O): C_out and Cu
    u, _, du = _corrections(c_in, c_in.rows, layer.deg_in, u1, model, full=True)  # U[i, k] uses deg(i)
    _, dv_at, dv = _corrections(c_out, c_out.cols, layer.deg_out, v1, model, full=False)  # V[a, b]: deg(b)
    # 1) M (U ⊙ Cv): every path with the exact input-side factor and v1 on the output side
    q = sp.csr_matrix((u * c_in.weighted, c_in.cols, c_in.csr.indptr), shape=(n_in, n_in))
    way_a = _add_product(out, s, q, threads)
    # 2) (dV ⊙ Cu) M: output-side corrections with u1
    x = sp.csr_matrix((dv.data * c_out.weighted[dv_at], dv.indices, dv.indptr), shape=dv.shape)
    way_b = _add_product(out, x, s, threads)
    # 3) Σ dU · dV over the paths where both intermediates have another common neighbour
    n_double = _add_double_corrections(out, layer, dv, du, threads)
    log.debug(
        "sparse path scores %dx%d (nnz %d): U-term %s, V-correction %s, doubly corrected path terms: %s",
        n_out,
        n_in,
        layer.flat.size,
        way_a,
        way_b,
        n_double,
    )
    out.view(-1).index_fill_(0, torch.from_numpy(layer.flat), fill_existing)
    return out
