"""Exact path-based Cannistraci-Hebb link predictors CH3-L3 and CH2-L3 ("L3p").

CHT: Zhang, Zhao, Wu, Muscoloni, Cannistraci, "Epitopological learning and Cannistraci-Hebb network
shape intelligence brain-inspired theory for ultra-sparse advantage in deep learning", ICLR 2024.
Definitions restated in ``research/cht-spec.md`` §1.0-1.2.

A mask ``M`` of shape ``(O, I)`` is a bipartite graph (output node ``a``, input node ``k``). The score of
a candidate ``(a, k)`` sums over every path ``a - i - b - k`` (``i`` an input node, ``b`` an output
node) a term built from the local-community degrees of the two intermediates:
``di(i) = C_in[i, k]``, ``1 + de(i) = deg(i) - C_in[i, k]``, ``di(b) = C_out[a, b]``,
``1 + de(b) = deg(b) - C_out[a, b]``, with ``C_out = M Mᵀ`` and ``C_in = Mᵀ M`` (common neighbours).

Both CH3 (``1/sqrt((1+de(i))(1+de(b)))``) and CH2 (``sqrt((1+di)(1+di)/((1+de)(1+de)))``) terms factor
into ``U[i, k] · V[a, b]``, so

    score[a, k] = Σ_i M[a, i] Σ_b M[b, i] V[a, b] M[b, k] U[i, k]

and, grouping the paths by their input-side intermediate ``i`` with neighbourhood ``N(i)``,

    score[N(i), :] += V[N(i), N(i)] @ (M[N(i), :] * U[i, :])        # (d_i, d_i) @ (d_i, I)

This is exact (every path is counted once: ``a, b ∈ N(i)``, ``M[b, k]`` closes the path, and ``b = a``
drops out because ``V[a, a] = 0``, see below) and turns the path enumeration of the official C++/OpenMP code into batched dense matmuls: time ``Σ_i d_i² · I``
multiply-adds plus ``nnz · I`` gathered/scattered entries, memory ``O² + I² + O·I`` plus a bounded block.
Factors whose denominator ``deg - C`` is 0 belong only to paths ending on existing links (``N(i) ⊆ N(k)``
forces ``a ∈ N(k)``) and are set to 0, as are factors with ``C = 0`` (no path). By the ``M ↔ Mᵀ``
symmetry of the definitions, ``score(Mᵀ) = score(M)ᵀ``; the cheaper orientation is used.

At low density most of that work multiplies zeros (``d_i² · I`` against ``d_i² · d_b`` useful
multiply-adds), so on the CPU :func:`path_scores` picks, by a cost estimate from the degrees, the
algorithm of :mod:`edgetune.sparse.predictors_paths` (sparse products whose cost follows the length-3
paths; same scores) or this grouped one (``algorithm="auto"``, the default). Timings against the official
code, measured side by side: ``bench/results/sparse-predictors.md``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import torch

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.sparse.predictors_paths import mask_links, sparse_path_cost, sparse_path_scores

__all__ = [
    "Algorithm",
    "as_mask",
    "ch2_l3",
    "ch3_l3",
    "check_float_dtype",
    "choose_algorithm",
    "grouped_path_cost",
    "path_scores",
    "to_csr",
]

log = logging.getLogger(__name__)

PathModel = Literal["ch3", "ch2"]
Algorithm = Literal["auto", "grouped", "sparse"]
_BLOCK_BYTES_CPU = 16 * 2**20  # gathered block per batched matmul (tuned on 2 cores, 1024²-4096²)
_BLOCK_BYTES_CUDA = 256 * 2**20
SPARSE_BELOW = 0.25  # on CPU, products with the mask go through CSR below this density
SEC_BMM = 6e-11  # seconds per batched multiply-add of the grouped algorithm (2 cores, 1 thread, float32)
SEC_GATHER = 1e-9  # seconds per gathered/scattered entry of the grouped algorithm


def as_mask(mask: torch.Tensor) -> torch.Tensor:
    """Validate a layer mask ``(O, I)`` and return it as ``torch.bool`` (non-zero entries are links)."""
    if not isinstance(mask, torch.Tensor):
        raise ShapeError(f"mask must be a torch.Tensor of shape (out, in), got {type(mask).__name__}.")
    if mask.dim() != 2:
        raise ShapeError(
            f"mask must be 2-D (out_features, in_features) like an nn.Linear weight, got shape "
            f"{tuple(mask.shape)}; reshape conv/attention masks to 2-D before scoring."
        )
    return mask if mask.dtype == torch.bool else mask != 0


def check_float_dtype(dtype: torch.dtype) -> None:
    """Raise :class:`ConfigError` unless ``dtype`` is a floating-point dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}.")


def to_csr(x: torch.Tensor) -> torch.Tensor:
    """``x.to_sparse_csr()`` without torch's "CSR support is in beta" notice (harmless here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tensor support is in beta.*")
        return x.to_sparse_csr()


def _selection_csc(rows: torch.Tensor, n_rows: int, ones: torch.Tensor) -> torch.Tensor:
    """One-hot ``(n_rows, n)`` matrix in CSC layout: column ``j`` holds a 1 in row ``rows[j]``."""
    n = rows.numel()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tensor support is in beta.*")
        return torch.sparse_csc_tensor(
            torch.arange(n + 1, device=rows.device), rows, ones[:n], (n_rows, n), check_invariants=False
        )


def _lc_factor(common: torch.Tensor, degree: torch.Tensor, model: PathModel) -> torch.Tensor:
    """Per-intermediate factor from ``common`` (= di) and ``degree - common`` (= 1 + de), in place.

    CH3: ``1/sqrt(deg - C)``; CH2: ``sqrt((1 + C)/(deg - C))``; 0 where ``C == 0`` or ``deg - C <= 0``.
    """
    ext = degree - common  # 1 + de, broadcast over the intermediate's axis
    valid = (common > 0) & (ext > 0)
    if model == "ch3":
        out = ext.rsqrt_()
    else:
        out = common.add_(1.0).div_(ext).sqrt_()
    return out.masked_fill_(~valid, 0.0)


def _padded_groups(
    deg: torch.Tensor, ptr: torch.Tensor, nbrs: torch.Tensor, n_out: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """Neighbour lists of the input nodes, sorted by degree, cut into groups padded to a common degree.

    ``deg`` ``(I,)`` int64 degrees; ``ptr`` ``(I,)`` and ``nbrs`` ``(nnz,)``: CSR of ``Mᵀ`` (the output
    nodes of input ``i`` are ``nbrs[ptr[i] : ptr[i] + deg[i]]``). Returns ``order`` ``(I,)`` (inputs by
    decreasing degree), ``table`` (flat int64, the concatenated ``(B, D)`` blocks of output nodes,
    ``n_out`` = padding) and the groups as ``(first, B, D, offset)``: sorted inputs ``first ..
    first+B-1``, padded degree ``D``, position in ``table``; at most ``max(1, block // (D·I))`` inputs each.
    """
    n_in, device = deg.numel(), deg.device
    order = torch.argsort(deg, descending=True, stable=True)
    degs = deg[order].tolist()
    groups, start, offset = [], 0, 0
    while start < n_in and degs[start] > 0:
        d = degs[start]  # largest degree of the group (sorted descending)
        b = min(max(1, block // (d * n_in)), n_in - start)
        groups.append((start, b, d, offset))
        start, offset = start + b, offset + b * d
    padded = torch.tensor([d for _, b, d, _ in groups for _ in range(b)], dtype=torch.long, device=device)
    owner = torch.repeat_interleave(torch.arange(start, device=device), padded)  # sorted input per slot
    slot = torch.arange(offset, device=device) - (torch.cumsum(padded, 0) - padded)[owner]  # 0 .. D-1
    src = order[owner]
    pos = (ptr[src] + slot).clamp_max_(nbrs.numel() - 1)
    table = torch.where(slot < deg[src], nbrs[pos], n_out)
    return order, table, groups


def _path_sum(
    m_pad: torch.Tensor, v: torch.Tensor, u: torch.Tensor, lists: tuple[torch.Tensor, ...], block_bytes: int
) -> torch.Tensor:
    """``Σ_i score[N(i), :] += v[N(i), N(i)] @ (M[N(i), :] * u[i, :])``, batched over input nodes.

    ``m_pad`` ``(O+1, I)`` float mask with an all-zero last row, ``v`` ``(O, O)``, ``u`` ``(I, I)``,
    ``lists`` = ``(deg, ptr, nbrs)`` as in :func:`_padded_groups`. Input nodes are sorted by degree and
    processed in groups padded to the group's largest degree (padding = the zero row). The index tables
    are built once, so each group costs eight tensor ops: few OpenMP regions keep the CPU runtime steady
    when other processes compete for the cores. Returns ``(O, I)`` in ``v.dtype``.
    """
    n_out, n_in = m_pad.shape[0] - 1, m_pad.shape[1]
    dtype, device = v.dtype, v.device
    deg, ptr, nbrs = lists
    out = torch.zeros(n_out + 1, n_in, dtype=dtype, device=device)  # row O collects the padding
    if nbrs.numel() == 0:
        return out[:n_out]
    block = max(block_bytes // dtype.itemsize, int(deg.max()) * n_in)
    order, table, groups = _padded_groups(deg, ptr, nbrs, n_out, block)
    table_c = table.clamp_max(n_out - 1)  # padded rows/cols of v only ever meet the zero row of m_pad
    v = v.contiguous()  # flat gathers below
    x_buf = torch.empty(block, dtype=dtype, device=device)
    y_buf = torch.empty(block, dtype=dtype, device=device)
    # The scatter-add of each group's rows into ``out``: a one-hot sparse product on CPU. Under CPU
    # contention, 2-thread index_add_ ran ~10x slower than this; on GPU index_add_ (atomics) is fast.
    on_cpu = device.type == "cpu"
    ones = torch.ones(max(b * d for _, b, d, _ in groups), dtype=dtype, device=device) if on_cpu else None
    for first, b, d, offset in groups:
        idx = table[offset : offset + b * d]  # (B*D,) the output nodes of each input node's list
        idx_c = table_c[offset : offset + b * d].view(b, d)
        flat = (idx_c[:, :, None] * n_out + idx_c[:, None, :]).view(-1)  # 1-D gather: ~10x faster
        vb = v.view(-1).index_select(0, flat).view(b, d, d)  # (B, D, D): v[a, b]
        x = torch.index_select(m_pad, 0, idx, out=x_buf[: b * d * n_in].view(b * d, n_in))  # M[b, :]
        x3 = x.view(b, d, n_in).mul_(u[order[first : first + b]][:, None, :])  # (B, D, I): M[b,k] u[i,k]
        y = torch.bmm(vb, x3, out=y_buf[: b * d * n_in].view(b, d, n_in))  # Σ_b v[a,b] M[b,k] u[i,k]
        if ones is not None:
            out.addmm_(_selection_csc(idx, n_out + 1, ones), y.view(b * d, n_in))  # out[idx[j]] += y[j]
        else:
            out.index_add_(0, idx, y.view(b * d, n_in))
    return out[:n_out]


def grouped_path_cost(deg_out: torch.Tensor, deg_in: torch.Tensor) -> float:
    """Rough seconds of the grouped algorithm on a mask with these degrees (cheaper orientation):
    ``Σ_i d_i² · I`` batched multiply-adds plus ``nnz · I`` gathered and scattered entries."""
    n_out, n_in = deg_out.numel(), deg_in.numel()
    d_out, d_in = deg_out.double(), deg_in.double()
    nnz = float(d_out.sum())
    by_input = float(d_in.square().sum()) * n_in + nnz * n_in * SEC_GATHER / SEC_BMM
    by_output = float(d_out.square().sum()) * n_out + nnz * n_out * SEC_GATHER / SEC_BMM
    return SEC_BMM * min(by_input, by_output)


def choose_algorithm(mask: torch.Tensor) -> Literal["grouped", "sparse"]:
    """``"sparse"`` on the CPU where its estimated cost is lower (low density), else ``"grouped"``."""
    return _choose(mask)[0]


def _choose(mask: torch.Tensor) -> tuple[Literal["grouped", "sparse"], tuple[np.ndarray, ...] | None]:
    """:func:`choose_algorithm` and, on the CPU, the mask's links (:func:`mask_links`) for the next step."""
    if mask.device.type != "cpu" or mask.numel() == 0:
        return "grouped", None
    links = mask_links(mask)
    n_out, n_in = mask.shape
    deg_out = torch.from_numpy(np.bincount(links[1], minlength=n_out))
    deg_in = torch.from_numpy(np.bincount(links[2], minlength=n_in))
    sparse = sparse_path_cost(deg_out, deg_in)
    grouped = grouped_path_cost(deg_out, deg_in)
    log.debug("path scores %s: estimated %.3g s sparse, %.3g s grouped", tuple(mask.shape), sparse, grouped)
    return ("sparse" if sparse < grouped else "grouped"), links


def path_scores(
    mask: torch.Tensor,
    model: PathModel = "ch3",
    *,
    dtype: torch.dtype = torch.float32,
    fill_existing: float = 0.0,
    block_bytes: int | None = None,
    algorithm: Algorithm = "auto",
) -> torch.Tensor:
    """Exact path-based CH score of every candidate link of a bipartite layer mask.

    Args:
        mask: ``(O, I)`` layer mask (bool; non-zero = link), on any device.
        model: ``"ch3"`` (CH3-L3, the CHT predictor) or ``"ch2"`` (CH2-L3).
        dtype: result dtype. float64 reproduces the brute-force definition to ~1e-15; float32 (default)
            is ~1.5-2x faster, within ~1e-6 relative, and picked the same top-30% regrowth set as float64
            on every random mask tried. Half types compute in float32 and are cast.
        fill_existing: value written on existing links (0 as in the official code; ``-inf`` keeps
            them out of any top-k).
        block_bytes: size of the gathered block per batched matmul of the grouped algorithm (default
            16 MiB on CPU, 256 MiB on GPU); two such buffers are allocated.
        algorithm: ``"grouped"`` (batched dense matmuls, any device; best at moderate density),
            ``"sparse"`` (sparse products whose cost follows the paths, :mod:`.predictors_paths`; runs
            on the CPU, a GPU mask is copied there and back), or ``"auto"``: the cheaper by a cost
            estimate from the degrees on the CPU, ``"grouped"`` on a GPU.

    Returns:
        ``(O, I)`` scores; 0 for candidates without any length-3 path.
    """
    mask = as_mask(mask)
    check_float_dtype(dtype)
    if model not in ("ch3", "ch2"):
        raise ConfigError(f'path model must be "ch3" or "ch2", got {model!r}.')
    if algorithm not in ("auto", "grouped", "sparse"):
        raise ConfigError(f'algorithm must be "auto", "grouped" or "sparse", got {algorithm!r}.')
    n_out, n_in = mask.shape
    if mask.numel() == 0:
        return torch.zeros(n_out, n_in, dtype=dtype, device=mask.device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    links = None
    if algorithm == "auto":
        algorithm, links = _choose(mask)
    if algorithm == "sparse":
        scores = sparse_path_scores(mask.cpu(), model, dtype=work, fill_existing=fill_existing, links=links)
        return scores.to(device=mask.device, dtype=dtype)
    return _grouped_path_scores(mask, model, dtype, work, fill_existing, block_bytes)


def _grouped_path_scores(
    mask: torch.Tensor,
    model: PathModel,
    dtype: torch.dtype,
    work: torch.dtype,
    fill_existing: float,
    block_bytes: int | None,
) -> torch.Tensor:
    """The grouped algorithm (module docstring) in the cheaper orientation."""
    n_out, n_in = mask.shape
    m_pad = torch.zeros(n_out + 1, n_in, dtype=work, device=mask.device)
    mf = m_pad[:n_out].copy_(mask)  # (O, I) float view; row O of m_pad stays 0 (padding)
    deg_out, deg_in = mf.sum(1), mf.sum(0)
    # work Σ_i d_i² · I when grouping by input node, Σ_b d_b² · O on the transposed mask
    if float(deg_out.square().sum()) * n_out < float(deg_in.square().sum()) * n_in:
        log.debug("path scores of a %dx%d mask: grouping paths by output nodes (cheaper)", n_out, n_in)
        return _grouped_path_scores(mask.T, model, dtype, work, fill_existing, block_bytes).T.contiguous()
    if block_bytes is None:
        block_bytes = _BLOCK_BYTES_CUDA if mask.device.type == "cuda" else _BLOCK_BYTES_CPU
    mft = mf.T.contiguous()  # (I, O)
    deg = deg_in.long()
    if mask.device.type == "cpu" and float(deg_in.sum()) < SPARSE_BELOW * mask.numel():
        csr, csr_t = to_csr(mf), to_csr(mft)  # CSR of M and of Mᵀ
        c_out, c_in = csr @ mft, csr_t @ mf  # exact counts (integers, float32 exact below 2^24)
        lists = (deg, csr_t.crow_indices()[:-1], csr_t.col_indices())
    else:
        c_out, c_in = mf @ mft, mft @ mf
        lists = (deg, torch.cumsum(deg, 0) - deg, mask.T.nonzero()[:, 1])
    v = _lc_factor(c_out, deg_out[None, :], model)  # (O, O): v[a, b] uses deg(b)
    u = _lc_factor(c_in, deg_in[:, None], model)  # (I, I): u[i, k] uses deg(i)
    del c_out, c_in, mft
    scores = _path_sum(m_pad, v, u, lists, block_bytes).masked_fill_(mask, fill_existing)
    return scores if work == dtype else scores.to(dtype)


def ch3_l3(
    mask: torch.Tensor, *, dtype: torch.dtype = torch.float32, fill_existing: float = 0.0
) -> torch.Tensor:
    """Exact CH3-L3 scores ``(O, I)`` of a mask ``(O, I)``: Σ over length-3 paths of 1/sqrt((1+de)(1+de))."""
    return path_scores(mask, "ch3", dtype=dtype, fill_existing=fill_existing)


def ch2_l3(
    mask: torch.Tensor, *, dtype: torch.dtype = torch.float32, fill_existing: float = 0.0
) -> torch.Tensor:
    """Exact CH2-L3 scores ``(O, I)`` of a mask ``(O, I)``: Σ_paths sqrt((1+di)(1+di) / ((1+de)(1+de)))."""
    return path_scores(mask, "ch2", dtype=dtype, fill_existing=fill_existing)
