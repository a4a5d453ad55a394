"""Training-free one-shot personal object search on a frozen patch-feature extractor.

Swiss DINO (Paramonov, Zhong, Michieli, Moon, Ozay, IROS 2024, arXiv 2407.07541), re-implemented from the
algorithm's description (no code of the official, non-commercial repository is used). One support image per
personal object, with a segmentation mask or a box; nothing is trained:

1. support mask on the patch grid: the mask area-resized to the grid and binarized (:func:`mask_to_grid`), or the
   box's patches split by k-means into foreground and background (:func:`~edgetune.incremental.patch_kmeans.box_foreground`);
2. prototype = normalized mean of the L2-normalized foreground patch features (:func:`prototype`);
3. self-calibrated threshold ``tau = max(q_{100-p}(background cosines), q_p(foreground cosines))`` (:func:`self_calibrated_threshold`);
4. query: patches with cosine >= tau (the arg-max patch when none), split into 8-connected components, each scored by
   the cosine of its normalized mean feature to the prototype; the best one is the answer (:func:`localize`);
5. identification: that score is the logit of every (support, query) pair; identity = arg-max over supports.

Metrics (:func:`search_metrics`): patch-level mask IoU, box IoU of the mask's bounding box, one-vs-rest AP of the
logits per support class, and accuracy, each averaged over classes. Grids are ``(h, w)``; boxes in pixels are
``(x0, y0, x1, y1)`` (end-exclusive), on the grid ``(r0, r1, c0, c1)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy import ndimage
from torch import Tensor, nn

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.patch_kmeans import box_foreground

__all__ = ["PersonalObjectSearch", "SearchConfig", "SearchHit", "Support", "average_precision", "best_component",
           "box_iou", "box_to_grid", "connected_components", "grid_box_to_pixels", "localize", "mask_iou",
           "mask_to_grid", "patch_cosine", "prototype", "search_metrics", "self_calibrated_threshold"]

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
GridBox = tuple[int, int, int, int]


# ------------------------------------------------------------------------------------------ support masks
def mask_to_grid(mask: Tensor, grid: tuple[int, int], threshold: float = 0.1) -> Tensor:
    """``(H, W)`` mask (bool or [0, 1]) -> ``(h, w)`` bool: area-resized (each cell the mean over the pixels it
    covers, as adaptive average pooling) and kept where that mean exceeds ``threshold``."""
    if mask.dim() != 2:
        raise ShapeError(f"mask must be (H, W), got shape {tuple(mask.shape)}; pass one mask per image")
    area = F.adaptive_avg_pool2d(mask.float()[None, None], grid)[0, 0]
    return area > threshold


def box_to_grid(box: Box, image_size: tuple[int, int], grid: tuple[int, int]) -> GridBox:
    """Pixel box ``(x0, y0, x1, y1)`` on an ``(H, W)`` image -> the grid box ``(r0, r1, c0, c1)`` of every patch it
    touches. The box is clipped to the image; an empty box or one outside the image is an error."""
    x0, y0, x1, y1 = (float(v) for v in box)
    hh, ww = image_size
    if not (x1 > x0 and y1 > y0):
        raise ShapeError(f"box {tuple(box)} is empty; give (x0, y0, x1, y1) with x1 > x0 and y1 > y0 (pixels)")
    if x1 <= 0 or y1 <= 0 or x0 >= ww or y0 >= hh:
        raise ShapeError(f"box {tuple(box)} lies outside the {ww}x{hh} (W x H) image; give pixel coordinates inside it")
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(ww)), min(y1, float(hh))
    h, w = grid
    r0, c0 = math.floor(y0 * h / hh), math.floor(x0 * w / ww)
    r1, c1 = max(math.ceil(y1 * h / hh), r0 + 1), max(math.ceil(x1 * w / ww), c0 + 1)
    return min(r0, h - 1), min(r1, h), min(c0, w - 1), min(c1, w)


def grid_box_to_pixels(mask: Tensor, image_size: tuple[int, int]) -> Box:
    """Bounding box of the True patches of an ``(h, w)`` mask, in pixels ``(x0, y0, x1, y1)`` of an ``(H, W)``
    image; ``(0, 0, 0, 0)`` for an empty mask."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    if rows.numel() == 0:
        return (0.0, 0.0, 0.0, 0.0)
    h, w = mask.shape
    hh, ww = image_size
    return (int(cols.min()) * ww / w, int(rows.min()) * hh / h, (int(cols.max()) + 1) * ww / w,
            (int(rows.max()) + 1) * hh / h)


# ------------------------------------------------------------------------------ prototype and threshold
def prototype(feats: Tensor, mask: Tensor) -> Tensor:
    """``feats (D, h, w)``, ``mask (h, w)`` bool -> unit ``(D,)``: mean of the L2-normalized masked patch features,
    L2-normalized."""
    if mask.shape != feats.shape[1:]:
        raise ShapeError(f"mask {tuple(mask.shape)} does not match the feature grid {tuple(feats.shape[1:])}")
    if not mask.any():
        raise ShapeError("the support mask is empty on the patch grid; give a larger mask/box or a finer grid "
                         "(smaller stride or larger image_size)")
    z = F.normalize(feats.double(), dim=0)
    return F.normalize(z[:, mask].mean(1), dim=0)


def patch_cosine(feats: Tensor, proto: Tensor) -> Tensor:
    """Cosine of each patch to the prototype: ``feats (D, h, w)``, ``proto (D,)`` -> ``(h, w)``."""
    return torch.einsum("dhw,d->hw", F.normalize(feats.double(), dim=0), F.normalize(proto.double(), dim=0))


def self_calibrated_threshold(cos: Tensor, fg: Tensor, percentile: float = 5.0) -> float:
    """``tau = max(q_{100-p}(cos[~fg]), q_p(cos[fg]))`` (linear-interpolated percentiles, as numpy's default);
    just ``q_p(cos[fg])`` when the support has no background patch. ``cos``, ``fg``: ``(h, w)``."""
    if not fg.any():
        raise ShapeError("the support foreground is empty; cannot calibrate a threshold")
    q = percentile / 100.0
    tau = float(torch.quantile(cos[fg].double(), q))
    if (~fg).any():
        tau = max(tau, float(torch.quantile(cos[~fg].double(), 1.0 - q)))
    return tau


# ------------------------------------------------------------------------------------ query localisation
def connected_components(mask: Tensor) -> tuple[Tensor, int]:
    """8-connected components of an ``(h, w)`` bool mask: labels ``(h, w)`` long (0 = off, 1..n) and ``n``."""
    labels, n = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3), dtype=bool))
    return torch.from_numpy(labels.astype(np.int64)), int(n)


def best_component(feats: Tensor, mask: Tensor, proto: Tensor) -> tuple[Tensor, float]:
    """The 8-connected component of ``mask (h, w)`` whose normalized mean (normalized) feature is closest in cosine
    to ``proto (D,)``: its ``(h, w)`` mask and that cosine. ``mask`` must not be empty."""
    labels, n = connected_components(mask)
    if n == 0:
        raise ShapeError("best_component got an empty mask; threshold with localize(), which keeps the arg-max patch")
    z = F.normalize(feats.double(), dim=0).flatten(1)  # (D, h*w)
    lab = labels.flatten()
    sums = torch.zeros(z.shape[0], n + 1, dtype=z.dtype).index_add_(1, lab, z)[:, 1:]  # (D, n)
    scores = F.normalize(sums, dim=0).T @ F.normalize(proto.double(), dim=0)  # (n,)
    best = int(scores.argmax())
    return labels == best + 1, float(scores[best])


def localize(feats: Tensor, proto: Tensor, tau: float) -> tuple[Tensor, float]:
    """Query ``feats (D, h, w)`` -> the best component's ``(h, w)`` mask and score among the patches with cosine
    ``>= tau`` to ``proto`` (only the arg-max patch when none reaches it)."""
    cos = patch_cosine(feats, proto)
    mask = cos >= tau
    if not mask.any():
        mask = torch.zeros_like(mask).flatten()
        mask[int(cos.argmax())] = True
        mask = mask.view_as(cos)
    return best_component(feats, mask, proto)


# -------------------------------------------------------------------------------------------------- metrics
def mask_iou(pred: Tensor, gt: Tensor) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    if pred.shape != gt.shape:
        raise ShapeError(f"mask_iou: shapes {tuple(pred.shape)} and {tuple(gt.shape)} differ")
    union = int((pred | gt).sum())
    return 1.0 if union == 0 else int((pred & gt).sum()) / union


def box_iou(a: Box, b: Box) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes (0.0 when the union is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Area under the step precision-recall curve, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds
    from high to low (tied scores enter together; the definition of scikit-learn's ``average_precision_score``).
    ``scores (N,)``, ``positive (N,)`` bool; NaN when there is no positive."""
    pos = positive.bool()
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, p = scores.double()[order], pos[order].double()
    tp, seen = torch.cumsum(p, 0), torch.arange(1, len(s) + 1, dtype=torch.float64)
    last = torch.ones(len(s), dtype=torch.bool)  # last index of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    tp, seen = tp[last], seen[last]
    recall = tp / n_pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - prev) * (tp / seen)).sum())


def search_metrics(logits: Tensor, labels: Tensor, mask_ious: Tensor | None = None,
                   box_ious: Tensor | None = None) -> dict[str, float]:
    """Class-averaged figures of one episode. ``logits (Q, S)`` (query x support), ``labels (Q,)``: the support
    index present in each query, -1 for a negative query (no personal object). ``mask_ious``/``box_ious (Q,)``: the
    IoU of the true support's answer on each positive query (ignored on negatives).

    Returns ``ap`` (mean over supports of the one-vs-rest AP of the logit column, over all queries), ``accuracy``
    (per support: fraction of its queries whose arg-max is that support; mean over supports), ``miou``/``box_miou``
    (per support: mean IoU over its queries; mean over supports) and the query counts."""
    q, s = logits.shape
    if labels.shape != (q,):
        raise ShapeError(f"labels must be ({q},) for logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    pred = logits.argmax(1)
    classes = [c for c in range(s) if bool((labels == c).any())]
    out: dict[str, float] = {"queries": float(q), "positives": float(int((labels >= 0).sum())),
                             "classes": float(len(classes))}
    out["ap"] = float(np.mean([average_precision(logits[:, c], labels == c) for c in classes])) if classes else math.nan
    out["accuracy"] = (float(np.mean([float((pred[labels == c] == c).double().mean()) for c in classes]))
                       if classes else math.nan)
    for key, ious in (("miou", mask_ious), ("box_miou", box_ious)):
        if ious is not None:
            out[key] = float(np.mean([float(ious[labels == c].double().mean()) for c in classes])) if classes \
                else math.nan
    return out


# --------------------------------------------------------------------------------------------- the searcher
class SearchConfig(Config):
    """kmeans_k: clusters of a box support's patches; percentile: p of the self-calibrated threshold;
    mask_threshold: binarization of an area-resized support mask; kmeans_iters/seed: the k-means run;
    box_split: "kmeans" (Swiss DINO's foreground/background split of a box support) or "none" (every patch the
    box touches is foreground: the ablation that shows what the split buys)."""

    kmeans_k: int = Field(default=5, ge=1)
    box_split: Literal["kmeans", "none"] = "kmeans"
    percentile: float = Field(default=5.0, gt=0.0, lt=50.0)
    mask_threshold: float = Field(default=0.1, gt=0.0, lt=1.0)
    kmeans_iters: int = Field(default=50, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class Support:
    """One personal object: unit prototype ``(D,)``, threshold ``tau`` and the support's ``(h, w)`` foreground."""

    name: str
    prototype: Tensor
    tau: float
    mask: Tensor


@dataclass(frozen=True)
class SearchHit:
    """The answer for one support on one query: score (the logit), ``(h, w)`` patch mask and pixel box."""

    name: str
    score: float
    mask: Tensor
    box: Box


def _as_chw(image: Any) -> Tensor:
    """uint8/float image as ``(3, H, W)``: accepts ``(H, W, 3)`` arrays or tensors and ``(3, H, W)`` tensors."""
    t = image if isinstance(image, Tensor) else torch.tensor(np.asarray(image))
    if t.dim() == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if t.dim() != 3 or t.shape[0] != 3:
        raise ShapeError(f"image must be (H, W, 3) or (3, H, W) RGB, got shape {tuple(t.shape)}")
    return t


class PersonalObjectSearch:
    """One-shot personal object search: ``add`` one support image per object, then ``search`` / ``identify``.

    ``extractor``: a module mapping images ``(B, 3, H, W)`` to patch grids ``(B, D, h, w)``
    (:mod:`edgetune.incremental.patch_features`). ``config`` or keyword overrides of :class:`SearchConfig`.
    """

    def __init__(self, extractor: nn.Module, config: SearchConfig | None = None, **overrides: Any) -> None:
        self.extractor = extractor
        self.config = (config or SearchConfig()).replace(**overrides) if overrides else (config or SearchConfig())
        self.supports: dict[str, Support] = {}

    @property
    def names(self) -> list[str]:
        return list(self.supports)

    def __len__(self) -> int:
        return len(self.supports)

    def features(self, image: Any) -> Tensor:
        """One image -> its ``(D, h, w)`` patch grid."""
        return self.extractor(_as_chw(image)[None])[0].cpu()

    def add(self, name: str, image: Any, mask: Any = None, box: Box | None = None) -> Support:
        """Add personal object ``name`` from one image with a ``(H, W)`` mask or a pixel box (exactly one)."""
        img = _as_chw(image)
        return self.add_features(name, self.features(img), tuple(img.shape[-2:]), mask=mask, box=box)

    def add_features(self, name: str, feats: Tensor, image_size: tuple[int, int], mask: Any = None,
                     box: Box | None = None) -> Support:
        """:meth:`add` on a precomputed ``(D, h, w)`` grid of an ``(H, W)`` image."""
        if name in self.supports:
            raise ConfigError(f"personal object {name!r} is already added; use another name or remove({name!r}) first")
        if (mask is None) == (box is None):
            raise ConfigError(f"add({name!r}): give exactly one of mask= (an (H, W) array) or box= ((x0, y0, x1, y1) "
                              "pixels)")
        grid = tuple(feats.shape[-2:])
        cfg = self.config
        if mask is not None:
            m = mask if isinstance(mask, Tensor) else torch.tensor(np.asarray(mask))
            if tuple(m.shape) != tuple(image_size):
                raise ShapeError(f"add({name!r}): mask has shape {tuple(m.shape)} but the image is {tuple(image_size)} "
                                 "(H, W); give a mask of the image's size")
            if not m.bool().any():
                raise ShapeError(f"add({name!r}): the mask is empty; mark the object's pixels (or give box=)")
            fg = mask_to_grid(m, grid, cfg.mask_threshold)  # type: ignore[arg-type]
            if not fg.any():  # a tiny object: keep the cell it covers most
                area = F.adaptive_avg_pool2d(m.float()[None, None], grid)[0, 0]
                fg = area == area.max()
        else:
            r0, r1, c0, c1 = gbox = box_to_grid(box, image_size, grid)  # type: ignore[arg-type]
            if cfg.box_split == "kmeans":
                fg = box_foreground(feats, gbox, cfg.kmeans_k, seed=cfg.seed, iters=cfg.kmeans_iters)
            else:
                fg = torch.zeros(grid, dtype=torch.bool)
                fg[r0:r1, c0:c1] = True
        proto = prototype(feats, fg)
        tau = self_calibrated_threshold(patch_cosine(feats, proto), fg, cfg.percentile)
        self.supports[name] = Support(name, proto, tau, fg)
        log.info("personal object %r: %d foreground patches of %dx%d, tau %.3f", name, int(fg.sum()), *grid, tau)
        return self.supports[name]

    def remove(self, name: str) -> None:
        if name not in self.supports:
            raise ConfigError(f"no personal object {name!r}; added: {', '.join(self.supports) or '(none)'}")
        del self.supports[name]

    def search_features(self, feats: Tensor, image_size: tuple[int, int]) -> list[SearchHit]:
        """One hit per support (in the order added) for a query's ``(D, h, w)`` grid of an ``(H, W)`` image."""
        if not self.supports:
            raise ConfigError("no personal object added; call add(name, image, mask=... or box=...) first")
        hits = []
        for s in self.supports.values():
            if s.prototype.shape[0] != feats.shape[0]:
                raise ShapeError(f"query features have D={feats.shape[0]} but {s.name!r} was added with "
                                 f"D={s.prototype.shape[0]}; use the same extractor")
            m, score = localize(feats, s.prototype, s.tau)
            hits.append(SearchHit(s.name, score, m, grid_box_to_pixels(m, image_size)))
        return hits

    def search(self, image: Any) -> list[SearchHit]:
        """Every personal object's best location in ``image``, best score first."""
        img = _as_chw(image)
        hits = self.search_features(self.features(img), tuple(img.shape[-2:]))
        return sorted(hits, key=lambda h: -h.score)

    def identify(self, image: Any) -> SearchHit:
        """The personal object with the highest logit in ``image`` (its hit)."""
        return self.search(image)[0]
