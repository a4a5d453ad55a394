"""SynGlyph-100: a procedural grey "glyph" dataset that mirrors CIFAR-100's few-shot class-incremental
structure (100 classes; base 0-59, then 8 sessions x 5-way 5-shot) and needs no data files.

Generator (research notes, continual-fewshot-anchors §4.1 "P2"), all from ``numpy.random.default_rng(seed)``,
drawn in this order: class templates, then the train instances, then the test instances.

- class template: 4 line segments, endpoints uniform in ``[3, 12]^2`` (pixel units of a 16x16 image);
- instance: template endpoints + N(0, 0.6 px) jitter, scaled about the centre (7.5, 7.5) by
  U(0.85, 1.15), shifted by U(-1.5, 1.5) px per axis;
- rendering: ``exp(-d^2 / 2 sigma^2)`` with d the distance from the pixel centre to the nearest segment
  and sigma ~ U(0.6, 1.0), plus N(0, 0.1) pixel noise, clipped to [0, 1].

For ``size`` other than 16 every length above is scaled by ``size / 16``. Instances are class-major
(class 0's instances first). Same seed and options -> identical bytes. The loader stores the images as
uint8 (``round(255 * v)``, an error of at most 1/510, far below the 0.1 pixel noise) and sets the bundle's
transform to :class:`~edgetune.data.transforms.ToFloat`, like the image datasets read from files.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from edgetune.core.config import Config
from edgetune.data.base import DataBundle, DataConfig, loader_options, register_dataset
from edgetune.data.common import images_to_uint8, make_bundle
from edgetune.data.transforms import ToFloat

__all__ = ["SynGlyphOptions", "generate_split", "glyph_templates", "load_synglyph", "render_glyphs"]

_CHUNK = 512  # images rendered at once: (n, 4, P) temporaries of ~2 MB stay in cache


class SynGlyphOptions(Config):
    """num_classes, images per class in train and test, image side in pixels."""

    num_classes: int = Field(default=100, ge=1)
    train_per_class: int = Field(default=300, ge=1)
    test_per_class: int = Field(default=100, ge=1)
    size: int = Field(default=16, ge=4)


def glyph_templates(rng: np.random.Generator, num_classes: int, size: int = 16) -> np.ndarray:
    """Class templates ``(C, 4, 2, 2)``: 4 segments x 2 endpoints x (x, y), uniform in [3, 12] * size/16."""
    s = size / 16.0
    return rng.uniform(3.0 * s, 12.0 * s, size=(num_classes, 4, 2, 2))


def render_glyphs(segments: np.ndarray, sigma: np.ndarray, size: int) -> np.ndarray:
    """Render ``exp(-d^2/2 sigma^2)`` images ``(N, size, size)`` float32 from ``segments (N, S, 2, 2)``.

    d is the distance from each pixel centre (x = column, y = row) to the nearest of the S segments;
    sigma ``(N,)`` is the per-image stroke width. All pixels x all segments at once, in chunks of images;
    x and y are kept as separate arrays because a reduction over a length-2 axis is slow in numpy.
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    px, py = xs.ravel(), ys.ravel()  # (P,)
    out = np.empty((len(segments), size * size), dtype=np.float32)
    for lo in range(0, len(segments), _CHUNK):
        seg = segments[lo : lo + _CHUNK].astype(np.float32)  # (n, S, 2, 2)
        ax, ay = seg[:, :, 0, 0, None], seg[:, :, 0, 1, None]  # (n, S, 1)
        bx, by = seg[:, :, 1, 0, None] - ax, seg[:, :, 1, 1, None] - ay  # segment vectors (n, S, 1)
        dx, dy = px - ax, py - ay  # pixel - start, (n, S, P)
        t = dx * bx + dy * by
        t /= np.maximum(bx * bx + by * by, 1e-12)
        np.clip(t, 0.0, 1.0, out=t)  # projection onto the segment
        dx -= t * bx
        dy -= t * by
        d2 = (dx * dx + dy * dy).min(axis=1)  # (n, P) squared distance to the nearest segment
        sig = sigma[lo : lo + _CHUNK].astype(np.float32)[:, None]
        out[lo : lo + _CHUNK] = np.exp(d2 / (-2.0 * sig * sig))
    return out.reshape(len(segments), size, size)


def generate_split(
    rng: np.random.Generator, templates: np.ndarray, per_class: int, size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``per_class`` instances of every template: images ``(C*per_class, size, size)`` float32 in [0, 1]
    and labels ``(C*per_class,)`` int64. Draw order: jitter, scale, shift, sigma, noise."""
    s = size / 16.0
    c = len(templates)
    n = c * per_class
    labels = np.repeat(np.arange(c, dtype=np.int64), per_class)
    centre = (size - 1) / 2.0
    pts = templates[labels] + rng.normal(0.0, 0.6 * s, size=(n, 4, 2, 2))
    scale = rng.uniform(0.85, 1.15, size=n)
    shift = rng.uniform(-1.5 * s, 1.5 * s, size=(n, 2))
    pts = (pts - centre) * scale[:, None, None, None] + centre + shift[:, None, None, :]
    sigma = rng.uniform(0.6 * s, 1.0 * s, size=n)
    images = render_glyphs(pts, sigma, size)
    images += rng.normal(0.0, 0.1, size=images.shape).astype(np.float32)
    np.clip(images, 0.0, 1.0, out=images)
    return images, labels


@register_dataset(
    "synglyph", config=SynGlyphOptions, summary="SynGlyph-100: procedural 16x16 glyphs, 100 classes"
)
def load_synglyph(cfg: DataConfig) -> DataBundle:
    """Generate SynGlyph with ``data.seed``: ``(1, size, size)`` images, 300/100 per class by default."""
    opts: SynGlyphOptions = loader_options(cfg, SynGlyphOptions)
    rng = np.random.default_rng(cfg.seed)
    templates = glyph_templates(rng, opts.num_classes, opts.size)
    splits = []
    for per_class in (opts.train_per_class, opts.test_per_class):
        x, y = generate_split(rng, templates, per_class, opts.size)
        pixels = np.rint(x * 255.0).astype(np.uint8)  # x is clipped to [0, 1]
        splits.append((images_to_uint8(pixels), torch.from_numpy(y)))
    return make_bundle(
        cfg,
        name="synglyph",
        task="classification",
        train=splits[0],
        test=splits[1],
        num_classes=opts.num_classes,
        class_names=[f"glyph{i}" for i in range(opts.num_classes)],
        source=f"generated (SynGlyph, seed {cfg.seed}, {opts.num_classes} classes, {opts.size}px)",
        transform=ToFloat(),
    )
