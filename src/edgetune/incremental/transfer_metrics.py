"""Pure tensor maths of transfer and neural-collapse measurements: few-shot episode and all-class NCM accuracy of
frozen features, effective rank, neural-collapse diagnostics, mean with a 95% interval. Used by the
``incremental-etf`` bench suite (:mod:`edgetune.incremental.bench.etf_transfer`); each function takes tensors and
returns numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.prototypes import class_sums, cosine_scores, prototypes_from_sums

__all__ = ["collapse_stats", "effective_rank", "episode_accuracy", "mean_ci95", "ncm_accuracy"]


def episode_accuracy(z: Tensor, support: Tensor, query: Tensor, shots: int, queries: int) -> Tensor:
    """Cosine nearest-prototype accuracy of each episode: ``(E,)``.

    z: ``(N, D)`` features; support ``(E, W*shots)`` and query ``(E, W*queries)`` indices into z, class-major (the
    first ``shots`` support indices are class 0, ...; :func:`few_shot_episode`'s layout). Prototype of a class:
    the mean of its L2-normalized support features, normalized; a query goes to the most cosine-similar one.
    """
    if z.ndim != 2 or support.ndim != 2 or query.ndim != 2 or len(support) != len(query):
        raise ShapeError(f"episode_accuracy needs z (N, D), support (E, W*K) and query (E, W*Q); got "
                         f"{tuple(z.shape)}, {tuple(support.shape)}, {tuple(query.shape)}")
    e, ways = support.shape[0], support.shape[1] // shots
    if ways * shots != support.shape[1] or ways * queries != query.shape[1]:
        raise ShapeError(f"support has {support.shape[1]} and query {query.shape[1]} columns, not ways*shots and "
                         f"ways*queries for shots={shots}, queries={queries}")
    zn = F.normalize(z.double(), dim=1)
    protos = F.normalize(zn[support].view(e, ways, shots, -1).mean(2), dim=2)  # (E, W, D)
    scores = torch.bmm(zn[query], protos.transpose(1, 2))  # (E, W*Q, W)
    truth = torch.arange(ways).repeat_interleave(queries)  # (W*Q,)
    return (scores.argmax(2) == truth).double().mean(1)


def ncm_accuracy(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, classes: Sequence[int],
                 shots: int | None, seed: int = 0) -> float:
    """All-class cosine NCM accuracy on ``z_test (M, D)``: prototypes of every class in ``classes`` from
    ``shots`` random examples each of ``z_train (N, D)`` (seeded), or from all of them when ``shots`` is None."""
    classes = [int(c) for c in classes]
    if shots is not None:
        g = torch.Generator().manual_seed(int(seed))
        keep = []
        for c in classes:
            idx = torch.nonzero(y_train == c).flatten()
            if len(idx) < shots:
                raise ConfigError(f"class {c} has {len(idx)} training examples, fewer than shots={shots}")
            keep.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
        pick = torch.cat(keep)
        z_train, y_train = z_train[pick], y_train[pick]
    protos = prototypes_from_sums(*class_sums(z_train, y_train, classes))
    pred = torch.tensor(classes)[cosine_scores(z_test, protos).argmax(1)]
    return float((pred == y_test).double().mean())


def effective_rank(z: Tensor) -> float:
    """Effective rank (Roy and Vetterli 2007) of the covariance of ``z (N, D)``: ``exp`` of the entropy of its
    eigenvalues normalized to sum 1; between 1 (one direction) and D (isotropic)."""
    zc = z.double() - z.double().mean(0)
    ev = torch.linalg.eigvalsh(zc.T @ zc / max(1, len(z) - 1)).clamp_min(0)
    if float(ev.sum()) == 0:
        return 0.0
    p = ev / ev.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_stats(z: Tensor, y: Tensor, class_vectors: Tensor | None = None) -> dict[str, float]:
    """Neural-collapse diagnostics of features ``z (N, D)`` with labels ``y (N,)`` (K >= 2 classes).

    nc1: ``tr(S_W S_B^+) / K`` (Papyan, Han, Donoho 2020; 0 at full collapse); within_between:
    ``tr(S_W) / tr(S_B)``; with centred class means ``m_c = mu_c - mu_G``: cos_mean / cos_std / cos_max, the
    pairwise cosines of the m_c (a simplex ETF has all of them ``cos_etf = -1/(K-1)``); equinorm: std / mean of
    ``|m_c|``; self_duality: mean cosine of ``m_c`` and the head's class vector ``w_c`` (``class_vectors (K, D)``,
    rows in class order); eff_rank / within_eff_rank: :func:`effective_rank` of all features and of the features
    minus their class mean (the class-covariance information the paper says the ETF head removes).
    """
    if z.ndim != 2 or y.shape != (len(z),):
        raise ShapeError(f"collapse_stats needs z (N, D) and y (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    classes = sorted({int(c) for c in y.tolist()})
    k = len(classes)
    if k < 2:
        raise ConfigError(f"collapse_stats needs at least 2 classes, got {classes}")
    z = z.double()
    means = torch.stack([z[y == c].mean(0) for c in classes])  # (K, D)
    centred = means - z.mean(0)  # (K, D): m_c = mu_c - mu_G
    within = z - means[torch.searchsorted(torch.tensor(classes), y)]  # (N, D)
    s_w = within.T @ within / len(z)
    s_b = centred.T @ centred / k
    norms = centred.norm(dim=1)
    cos = F.normalize(centred, dim=1) @ F.normalize(centred, dim=1).T
    off = cos[~torch.eye(k, dtype=torch.bool)]
    out = {"nc1": float(torch.trace(s_w @ torch.linalg.pinv(s_b, hermitian=True)) / k),
           "within_between": float(torch.trace(s_w) / torch.trace(s_b)),
           "cos_mean": float(off.mean()), "cos_std": float(off.std()), "cos_max": float(off.max()),
           "cos_etf": -1.0 / (k - 1), "equinorm": float(norms.std() / norms.mean()),
           "eff_rank": effective_rank(z), "within_eff_rank": effective_rank(within)}
    if class_vectors is not None:
        if class_vectors.shape != centred.shape:
            raise ShapeError(f"class_vectors must be (K, D) = {tuple(centred.shape)}, got {tuple(class_vectors.shape)}")
        out["self_duality"] = float(F.cosine_similarity(centred, class_vectors.double(), dim=1).mean())
    return out


def mean_ci95(values: Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and 95% normal-approximation half-width ``1.96 * std / sqrt(n)`` (0 for a single value)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(v) == 0:
        raise ConfigError("mean_ci95 needs at least one value")
    half = 1.96 * float(v.std()) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), half
