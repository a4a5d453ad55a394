"""Node-based Cannistraci-Hebb approximations CH3-L3n and CH2-L3n (GPU friendly, dense matmuls).

CHTs: Zhang et al., "Brain network science modelling of sparse neural networks enables Transformers
and LLMs to perform as fully connected", NeurIPS 2025 (arXiv 2501.19107). Restated in
``research/cht-spec.md`` §1.3.

Instead of summing over length-3 paths, every intermediate *node* of the candidate ``(a, k)`` counts
once:

    score(a, k) = Σ_b F_out[a, b] M[b, k]  +  Σ_i M[a, i] F_in[k, i]

with ``C_out = M Mᵀ``, ``F_out[a, b] = f(C_out[a, b], max(deg(b) - C_out[a, b] - 1, 0))`` where
``C_out[a, b] > 0`` (else 0), and the same on the input side with ``C_in = Mᵀ M``.
CH3-L3n: ``f(cn, e) = 1 / (1 + e)``; CH2-L3n: ``f(cn, e) = (1 + cn) / (1 + e)`` (the released default).

The official code forms the dense ``(O, O)`` and ``(I, I)`` matrices; here each side is computed in
row chunks, so the peak memory is the ``(O, I)`` result, one or two float copies of the mask and one
chunk of ``(rows, max(O, I))`` — an 11008x4096 or 14336x4096 layer never materialises ``O²`` entries
(measured on CPU: peak ≈ 3.6 dense fp32 ``(O, I)`` matrices). On CPU below 3% density the products
with the mask go through CSR (``nnz · O`` instead of ``O² · I`` work). Counts are exact (float32 counts
are exact up to 2^24; TF32 keeps 0/1 inputs exact, though it rounds the factors ``F``).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from edgetune.core.errors import ConfigError
from edgetune.sparse.predictors_exact import as_mask, check_float_dtype, to_csr

__all__ = ["ch2_l3n", "ch3_l3n", "node_scores"]

log = logging.getLogger(__name__)

NodeModel = Literal["ch3", "ch2"]
_CHUNK_BYTES_CPU = 64 * 2**20
_CHUNK_BYTES_CUDA = 512 * 2**20
SPARSE_BELOW = 0.03  # CPU: CSR products win clearly at 1% density, dense GEMMs at 5% (2 cores)


def _node_factor(common: torch.Tensor, degree: torch.Tensor, model: NodeModel) -> torch.Tensor:
    """``f(C, e)`` in place, with ``1 + e = max(deg - C, 1)``; 0 where ``C == 0``.

    ``common`` ``(R, N)`` counts, ``degree`` ``(N,)`` degree of the column node.
    """
    none = common == 0
    ext = (degree[None, :] - common).clamp_min_(1.0)  # 1 + e
    if model == "ch3":
        out = ext.reciprocal_()
    else:
        out = common.add_(1.0).div_(ext)
    return out.masked_fill_(none, 0.0)


def _add_side(m: torch.Tensor, out: torch.Tensor, model: NodeModel, chunk_rows: int, sparse: bool) -> None:
    """``out += F @ m`` chunked over rows of ``F = f(m mᵀ)``; ``m`` ``(R, C)`` float 0/1; ``out`` ``(R, C)``.

    ``out`` may be a strided view (the input side writes into the transposed result). With ``sparse``
    (CPU, low density) both products take the mask as CSR: ``nnz · R`` instead of ``R² · C`` work each.
    """
    degree = m.sum(1)  # (R,) degree of each row node
    m_t = m.T.contiguous() if sparse else m.T  # (C, R)
    m_t_csr = to_csr(m_t) if sparse else None
    for start in range(0, m.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        common = (to_csr(m[rows]) @ m_t) if sparse else m[rows] @ m_t  # (r, R) exact counts
        f = _node_factor(common, degree, model)
        if m_t_csr is not None:
            out[rows] += (m_t_csr @ f.T.contiguous()).T  # (F @ m)ᵀ = mᵀ @ Fᵀ: (C, r) -> (r, C)
        else:
            out[rows] += f @ m  # (r, C)


def node_scores(
    mask: torch.Tensor,
    model: NodeModel = "ch2",
    *,
    dtype: torch.dtype = torch.float32,
    fill_existing: float = 0.0,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Node-based CH-L3n score of every candidate link of a layer mask.

    Args:
        mask: ``(O, I)`` layer mask (bool; non-zero = link), on any device.
        model: ``"ch2"`` (CH2-L3n, the CHTs default) or ``"ch3"`` (CH3-L3n).
        dtype: dtype of the result. Counts and products run in float64 when ``dtype`` is float64 and
            in float32 otherwise (counts stay exact), then are cast.
        fill_existing: value written on existing links (0, or ``-inf`` to keep them out of a top-k).
        chunk_bytes: size of one ``(rows, O or I)`` chunk of the factor matrix (default 64 MiB on CPU,
            512 MiB on GPU).

    Returns:
        ``(O, I)`` scores.
    """
    mask = as_mask(mask)
    check_float_dtype(dtype)
    if model not in ("ch3", "ch2"):
        raise ConfigError(f'node model must be "ch3" or "ch2", got {model!r}.')
    n_out, n_in = mask.shape
    out = torch.zeros(n_out, n_in, dtype=dtype, device=mask.device)
    if mask.numel() == 0:
        return out
    if chunk_bytes is None:
        chunk_bytes = _CHUNK_BYTES_CUDA if mask.device.type == "cuda" else _CHUNK_BYTES_CPU
    count_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mf = mask.to(count_dtype)  # (O, I)
    rows = max(1, chunk_bytes // (count_dtype.itemsize * max(n_out, n_in)))
    sparse = mask.device.type == "cpu" and float(mask.sum()) < SPARSE_BELOW * mask.numel()
    _add_side(mf, out, model, rows, sparse)  # Σ_b F_out[a, b] M[b, k]
    _add_side(mf.T, out.T, model, rows, sparse)  # (Σ_i F_in[k, i] M[a, i]) written through out.T
    return out.masked_fill_(mask, fill_existing)


def ch3_l3n(
    mask: torch.Tensor, *, dtype: torch.dtype = torch.float32, fill_existing: float = 0.0
) -> torch.Tensor:
    """CH3-L3n scores ``(O, I)``: per intermediate node ``1 / (1 + e)``."""
    return node_scores(mask, "ch3", dtype=dtype, fill_existing=fill_existing)


def ch2_l3n(
    mask: torch.Tensor, *, dtype: torch.dtype = torch.float32, fill_existing: float = 0.0
) -> torch.Tensor:
    """CH2-L3n scores ``(O, I)``: per intermediate node ``(1 + cn) / (1 + e)`` (CHTs default)."""
    return node_scores(mask, "ch2", dtype=dtype, fill_existing=fill_existing)
