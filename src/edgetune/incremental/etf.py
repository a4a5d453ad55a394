"""Simplex equiangular tight frames (ETF): the fixed classifier geometry of neural collapse.

A simplex ETF of K classes is K unit vectors with every pairwise cosine exactly ``-1/(K-1)`` (the most
negative value K unit vectors can share) and zero mean. Training a network against a classifier frozen to
this geometry (Tiomoko Ali, Michieli, Moon, Kim, Ozay, ICASSP 2024, arXiv 2402.18614; NC-FSCIL, Yang et al.,
ICLR 2023, which pre-allocates the novel classes' vectors) removes class-covariance information from the
last layer, which transfers better across domains.

Exact construction, for any ``d >= K - 1`` (rows are class vectors, ``M`` is ``(K, d)``)::

    H = Helmert basis of the complement of 1_K,    (K, K-1), orthonormal columns, 1_K^T H = 0
    U = Q of the QR of a seeded Gaussian (d, K-1), orthonormal columns (signs fixed by diag(R) > 0)
    M = sqrt(K / (K-1)) * H U^T

Then ``M M^T = K/(K-1) * H H^T = K/(K-1) * (I_K - 1 1^T / K)``: 1 on the diagonal, ``-1/(K-1)`` off it, and
``1^T M = 0``. The research notes' form ``sqrt(K/(K-1)) * (I_K - 1 1^T/K) U^T`` with ``U`` of K orthonormal
columns needs ``d >= K``; the Helmert form above only needs ``K - 1`` columns, so it also covers
``d == K - 1`` (the simplex then spans the whole space). For ``d >= K`` both have the same distribution: a
simplex in a uniformly random (K-1)-dimensional subspace, in a uniformly random orientation.

When ``d < K - 1`` no simplex ETF exists (K vectors with zero mean and equal cosines span K - 1 dimensions).
:func:`near_etf` then solves the spherical-code problem "minimize the largest pairwise cosine"
(``max_{i != j} <m_i, m_j>``, the Tammes problem in ``d`` dimensions): see its docstring.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from edgetune.core.errors import ConfigError, ShapeError

__all__ = ["etf_geometry_error", "ideal_etf_gram", "max_coherence", "near_etf", "simplex_etf"]

log = logging.getLogger(__name__)


def _check_sizes(num_classes: int, dim: int) -> None:
    for name, value in (("num_classes", num_classes), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"an ETF needs {name} to be an integer >= 1, got {value!r}")


def _helmert_basis(k: int, dtype: torch.dtype) -> Tensor:
    """``(k, k-1)`` orthonormal basis of the vectors orthogonal to ``1_k``: column j is
    ``(1, ..., 1, -(j+1), 0, ..., 0) / sqrt((j+1)(j+2))`` with j + 1 ones."""
    h = torch.zeros(k, k - 1, dtype=torch.float64, device="cpu")
    for j in range(k - 1):
        h[: j + 1, j] = 1.0
        h[j + 1, j] = -(j + 1.0)
        h[:, j] /= math.sqrt((j + 1.0) * (j + 2.0))
    return h.to(dtype)


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``(rows, cols)`` with orthonormal columns (rows >= cols), Haar-distributed: QR of a Gaussian with the
    signs of R's diagonal moved into Q, so the result does not depend on the LAPACK sign convention."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64, device="cpu"))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def simplex_etf(num_classes: int, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(K, d)`` simplex ETF: unit rows, pairwise cosine ``-1/(K-1)``, zero mean, from a seeded random frame.

    num_classes K >= 1, dim d >= 1. Exact when ``d >= K - 1`` (module docstring: the Helmert form covers
    ``d == K - 1``). K = 1 gives one seeded random unit vector (zero mean needs K >= 2); K = 2 an
    antipodal pair ``(u, -u)``.
    When ``d < K - 1`` logs a warning and returns :func:`near_etf`'s minimax-cosine frame instead.
    Same (K, d, seed): same matrix (computed in float64 on the CPU, then cast to ``dtype``).
    """
    _check_sizes(num_classes, dim)
    k = num_classes
    generator = torch.Generator().manual_seed(int(seed))
    if k == 1:
        u = torch.randn(1, dim, generator=generator, dtype=torch.float64, device="cpu")
        return torch.nn.functional.normalize(u, dim=1).to(dtype)
    if dim < k - 1:
        m, coherence = near_etf(k, dim, seed=seed)
        log.warning(
            "an exact simplex ETF of %d classes needs dim >= K-1 = %d, got dim=%d; using a near-ETF instead "
            "(pairwise cosines minimax-optimized on the sphere): largest pairwise cosine %.4f, where the "
            "simplex would give %.4f. Raise the feature dimension to at least %d for the exact geometry.",
            k, k - 1, dim, coherence, -1.0 / (k - 1), k - 1,
        )
        return m.to(dtype)
    u = _random_orthonormal(dim, k - 1, generator)  # (d, K-1)
    m = math.sqrt(k / (k - 1.0)) * (_helmert_basis(k, torch.float64) @ u.T)  # (K, d)
    return m.to(dtype)


def near_etf(
    num_classes: int,
    dim: int,
    *,
    seed: int = 0,
    steps: int = 1000,
    lr: float = 0.05,
    temperature: tuple[float, float] = (10.0, 3000.0),
) -> tuple[Tensor, float]:
    """Near-ETF for ``d < K - 1``: ``(K, d)`` unit rows minimizing the largest pairwise cosine, and that max.

    Rule: minimize ``c(M) = max_{i != j} <m_i, m_j>`` over unit rows (the spherical-code / Tammes problem;
    the exact simplex ETF is its solution whenever ``d >= K - 1``). The max is replaced by its smooth upper
    bound ``logsumexp(t * cos_ij) / t``, with ``t`` annealed geometrically from ``temperature[0]`` to
    ``temperature[1]``, and minimized by Adam (cosine-decayed ``lr``) from seeded Gaussian rows, each row
    projected back onto the unit sphere after every step. The iterate with the lowest true ``c(M)`` is
    returned. Known limits it approaches: ``c = 0`` when ``K <= 2d`` (Rankin: an orthoplex subset; no lower
    value exists once ``K > d + 1``), ``cos 72 deg = 0.309`` for 5 classes in 2-d, about 0.4045 for 10 in 3-d
    (Tammes). Computed in float64 on the CPU; same arguments, same result.
    """
    _check_sizes(num_classes, dim)
    if steps < 1 or lr <= 0 or min(temperature) <= 0:
        raise ConfigError(f"near_etf needs steps >= 1, lr > 0 and positive temperatures, got steps={steps} "
                          f"lr={lr} temperature={temperature}")
    with torch.inference_mode(False), torch.enable_grad():  # callable under no_grad / inference_mode
        return _minimax_cosine(num_classes, dim, int(seed), steps, lr, temperature)


def _minimax_cosine(
    k: int, dim: int, seed: int, steps: int, lr: float, temperature: tuple[float, float]
) -> tuple[Tensor, float]:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(k, dim, generator=generator, dtype=torch.float64, device="cpu")
    start = torch.nn.functional.normalize(start, dim=1)
    if k == 1:
        return start, float("-inf")
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    off = ~torch.eye(k, dtype=torch.bool, device="cpu")
    t0, t1 = temperature
    best, best_m = math.inf, start
    for i in range(steps):
        frac = i / max(steps - 1, 1)
        t = t0 * (t1 / t0) ** frac
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * frac)) + 1e-4 * lr
        xn = torch.nn.functional.normalize(x, dim=1)
        cos = (xn @ xn.T)[off]  # (K(K-1),) every ordered pair
        worst = float(cos.detach().max())
        if worst < best:
            best, best_m = worst, xn.detach().clone()
        loss = torch.logsumexp(t * cos, dim=0) / t
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.nn.functional.normalize(x, dim=1))
    last = torch.nn.functional.normalize(x.detach(), dim=1)
    final = max_coherence(last)
    return (last, final) if final < best else (best_m, best)


def _check_matrix(m: Tensor, what: str) -> None:
    if not isinstance(m, Tensor) or m.ndim != 2 or m.shape[0] < 1:
        shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ShapeError(f"{what} needs a (K, d) matrix with one class vector per row, got {shape}")


def ideal_etf_gram(num_classes: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(K, K)`` Gram matrix of a simplex ETF: 1 on the diagonal, ``-1/(K-1)`` off it (``[[1]]`` for K=1)."""
    _check_sizes(num_classes, 1)
    k = num_classes
    if k == 1:
        return torch.ones(1, 1, dtype=dtype)
    return (k / (k - 1.0)) * torch.eye(k, dtype=dtype) - torch.full((k, k), 1.0 / (k - 1.0), dtype=dtype)


def etf_geometry_error(m: Tensor) -> float:
    """Largest absolute entry of ``M M^T - G*`` for ``M`` ``(K, d)`` rows, ``G*`` = :func:`ideal_etf_gram`.

    0 for an exact simplex ETF; it measures both unit norms (diagonal) and equal angles (off-diagonal).
    """
    _check_matrix(m, "etf_geometry_error")
    m64 = m.detach().to(dtype=torch.float64)
    gram = m64 @ m64.T
    return float((gram - ideal_etf_gram(m.shape[0]).to(gram.device)).abs().max())


def max_coherence(m: Tensor) -> float:
    """Largest pairwise cosine between distinct rows of ``M`` ``(K, d)``; ``-inf`` when K = 1 (no pair)."""
    _check_matrix(m, "max_coherence")
    if m.shape[0] == 1:
        return float("-inf")
    mn = torch.nn.functional.normalize(m.detach().to(torch.float64), dim=1)
    cos = mn @ mn.T
    cos.fill_diagonal_(-math.inf)
    return float(cos.max())
