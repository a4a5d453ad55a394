"""Cosine class prototypes (nearest class mean, "NCM-cosine") and TEEN calibration of novel prototypes.

A class prototype is the mean of its examples' features, L2-normalized; a sample goes to the class whose
prototype has the largest cosine ``<z/|z|, p_c>``. FSCIL code bases differ in what they average (research notes
§0): CEC and TEEN average raw features, SimpleShot-style learners average normalized ones. Both are exposed by
``normalize_first``.

TEEN (Wang et al., "Few-shot class-incremental learning via training-free prototype calibration", NeurIPS
2023) shifts each novel prototype towards the base prototypes it resembles:
``w = softmax(t * q P_b^T)``, ``q' = (1 - a) q + a * normalize(w P_b)`` with shift ``a = 0.1`` and temperature
``t = 16`` (the official defaults).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetune.core.errors import ConfigError, ShapeError

__all__ = ["class_sums", "cosine_scores", "prototypes_from_sums", "teen_calibrate"]


def class_sums(z: Tensor, labels: Tensor, classes: list[int], *, normalize_first: bool = True
               ) -> tuple[Tensor, Tensor]:
    """Per-class feature sums ``(C, D)`` and counts ``(C,)`` for ``classes`` (in that order).

    z: ``(N, D)`` features; labels: ``(N,)`` class ids, each in ``classes``. Sums (not means) so that more
    examples of a class can be folded in later exactly.
    """
    if z.ndim != 2 or labels.ndim != 1 or len(z) != len(labels):
        raise ShapeError(f"features must be (N, D) with labels (N,), got {tuple(z.shape)} and {tuple(labels.shape)}")
    x = F.normalize(z.double(), dim=1) if normalize_first else z.double()
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({int(c) for c in labels.tolist()} - set(index))
    if missing:
        raise ConfigError(f"labels {missing[:10]} are not among the classes being summed ({classes[:10]}...)")
    rows = torch.tensor([index[int(c)] for c in labels.tolist()], dtype=torch.int64)
    sums = torch.zeros(len(classes), z.shape[1], dtype=torch.float64).index_add_(0, rows, x.cpu())
    counts = torch.bincount(rows, minlength=len(classes))
    return sums, counts


def prototypes_from_sums(sums: Tensor, counts: Tensor) -> Tensor:
    """``(C, D)`` L2-normalized class means from sums ``(C, D)`` and counts ``(C,)`` (all > 0)."""
    return F.normalize(sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype), dim=1)


def cosine_scores(z: Tensor, prototypes: Tensor) -> Tensor:
    """``(N, C)`` cosine similarities of features ``z (N, D)`` to unit prototypes ``(C, D)``."""
    if z.shape[-1] != prototypes.shape[-1]:
        raise ShapeError(f"features have dimension {z.shape[-1]} but the prototypes {prototypes.shape[-1]}: the "
                         "backbone that made them differs from the one the learner was fitted with")
    return F.normalize(z.to(prototypes.dtype), dim=1) @ prototypes.T


def check_feature_sets(prototypes: Tensor, *sets: tuple[Tensor, Tensor, str], empty_hint: str = "") -> None:
    """Each ``(z (N, D), y (N,), name)`` matches ``prototypes (C, D)`` (C >= 1) and holds examples: a
    :class:`ShapeError` or :class:`ConfigError` naming the set otherwise (``empty_hint`` says how to fill one)."""
    if prototypes.ndim != 2 or len(prototypes) == 0:
        raise ShapeError(f"base prototypes must be (Cb, D) with Cb >= 1, got {tuple(prototypes.shape)}")
    for z, y, name in sets:
        if z.ndim != 2 or z.shape[1] != prototypes.shape[1]:
            raise ShapeError(f"{name} features {tuple(z.shape)} do not match the base prototypes "
                             f"{tuple(prototypes.shape)}: both must be (N, D) and (Cb, D) from the same backbone")
        if y.ndim != 1 or len(y) != len(z):
            raise ShapeError(f"{name} labels must be (N,) with features (N, D), got {tuple(y.shape)} and "
                             f"{tuple(z.shape)}")
        if len(z) == 0:
            raise ConfigError(f"the {name} set is empty" + (f": {empty_hint}" if empty_hint else ""))


def teen_calibrate(novel: Tensor, base: Tensor, *, shift: float = 0.1, temperature: float = 16.0) -> Tensor:
    """TEEN: novel prototypes ``(Cn, D)`` moved towards a softmax-weighted mix of the base ones ``(Cb, D)``.

    Both inputs unit-normalized rows; returns ``(Cn, D)`` unit rows. ``shift`` in [0, 1] (0: unchanged).
    """
    if not 0.0 <= shift <= 1.0:
        raise ConfigError(f"TEEN shift must be in [0, 1] (0 keeps the prototypes), got {shift}")
    if len(base) == 0 or len(novel) == 0:
        return novel
    w = torch.softmax(temperature * novel @ base.T, dim=1)  # (Cn, Cb)
    delta = F.normalize(w @ base, dim=1)
    return F.normalize((1.0 - shift) * novel + shift * delta, dim=1)
