"""Glyph instances: a generated instance-level data set for few-shot personalization ("my mug" among mugs),
after the CORe50 / iCubWorld subsets of the object-conditioned bag of instances (OBoI, Michieli et al., ICASSP
2024, arXiv 2404.01397), built from SynGlyph's templates and renderer (:mod:`edgetune.data.synglyph`).

Structure: ``objects`` object classes (SynGlyph templates: 4 segments in a 16-px glyph box), each with
``instances`` personal instances, each filmed in ``sequences`` sequences of ``frames`` frames on a
``canvas x canvas`` image, with the glyph's box given (the box a detector would return).

- instance = its object's template with a fixed change of its own: one segment (chosen per instance) moved by
  ``move`` px in a random direction, and a short mark segment of length ``mark`` px at a fixed place (0: none);
- sequence (per instance): where the glyph sits on the canvas, its scale U(0.85, 1.15), rotation U(-15, 15)
  degrees, stroke width sigma U(0.6, 1.0) px and a background level U(0, ``background``);
- frame: endpoint jitter N(0, ``jitter``) px, a shift N(0, 0.5) px per axis and a scale U(0.95, 1.05) on top
  of the sequence's, pixel noise N(0, ``noise``); pixel = bg + (1 - bg) * glyph + noise, clipped to [0, 1].

:func:`base_frames` draws object-level images of ``base_classes`` other templates (disjoint from the object
classes: another random stream) under the same frame conditions, each image a fresh SynGlyph-style instance
(N(0, 0.6 px) endpoint jitter): the data a backbone is trained on, which never sees the personal instances.
:func:`one_shot_all_sequences` draws the "1SAS" protocol (one shot from every sequence of every instance; the
other frames are the test set). All lengths are in pixels of a 16-px glyph and scale with ``glyph / 16``.

Every part has its own random stream ``default_rng([seed, part])``, so the same seed gives the same templates
and instances whatever the number of frames; same seed and options -> identical images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from edgetune.core.config import Config, validate
from edgetune.core.errors import ConfigError
from edgetune.data.synglyph import glyph_templates, render_glyphs

__all__ = ["GlyphInstances", "GlyphInstancesConfig", "base_frames", "generate_glyph_instances",
           "instance_glyphs", "one_shot_all_sequences"]

# random streams: default_rng([seed, part])
_OBJECTS, _INSTANCES, _SEQUENCES, _FRAMES, _BASE_TEMPLATES, _BASE_FRAMES = range(6)


class GlyphInstancesConfig(Config):
    """Sizes of the data set and strengths of its variations (pixels of a 16-px glyph; see the module doc)."""

    objects: int = Field(default=9, ge=1)
    instances: int = Field(default=5, ge=1)
    sequences: int = Field(default=5, ge=1)
    frames: int = Field(default=8, ge=2)
    canvas: int = Field(default=32, ge=8)
    glyph: int = Field(default=16, ge=8)
    move: float = Field(default=1.0, ge=0.0)
    mark: float = Field(default=1.5, ge=0.0)
    jitter: float = Field(default=0.3, ge=0.0)
    background: float = Field(default=0.3, ge=0.0, le=0.9)
    noise: float = Field(default=0.1, ge=0.0)
    base_classes: int = Field(default=48, ge=2)
    base_per_class: int = Field(default=100, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> GlyphInstancesConfig:
        if self.glyph > self.canvas:
            raise ValueError(f"glyph={self.glyph} is larger than canvas={self.canvas}; give canvas >= glyph")
        return self


@dataclass(frozen=True)
class GlyphInstances:
    """Frames of every personal instance. ``N`` frames, ``I = objects * instances`` instances.

    images ``(N, 1, canvas, canvas)`` float32 in [0, 1]; boxes ``(N, 4)`` float32 ``(x0, y0, x1, y1)`` pixels
    (end-exclusive) of the glyph's box; objects / instances / sequences / frames ``(N,)`` int64 (object class,
    global instance id ``object * instances_per_object + j``, sequence and frame within the instance);
    instance_object ``(I,)`` int64: the object class of each instance.
    """

    images: Tensor
    boxes: Tensor
    objects: Tensor
    instances: Tensor
    sequences: Tensor
    frames: Tensor
    instance_object: Tensor
    config: GlyphInstancesConfig

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: Tensor) -> GlyphInstances:
        """The frames at ``index`` (indices or a bool mask ``(N,)``); instance ids and their objects unchanged."""
        return GlyphInstances(self.images[index], self.boxes[index], self.objects[index], self.instances[index],
                              self.sequences[index], self.frames[index], self.instance_object, self.config)

    def first_instances(self, per_object: int) -> GlyphInstances:
        """Only the first ``per_object`` instances of every object class (the others' frames dropped)."""
        if not 1 <= per_object <= self.config.instances:
            raise ConfigError(f"per_object={per_object}: choose 1..{self.config.instances} instances per object")
        return self.take(self.instances % self.config.instances < per_object)


def _config(cfg: GlyphInstancesConfig | None, options: dict[str, object]) -> GlyphInstancesConfig:
    if cfg is None:
        return validate(GlyphInstancesConfig, options)
    return cfg.replace(**options) if options else cfg


def _place(pts: np.ndarray, centre: float, scale: np.ndarray, angle: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Scale and rotate ``pts (n, S, 2, 2)`` about ``centre`` (per image), then add ``offset (n, 2)``."""
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    x, y = pts[..., 0] - centre, pts[..., 1] - centre
    out = np.stack([c * x - s * y, s * x + c * y], axis=-1) * scale[:, None, None, None]
    return out + centre + offset[:, None, None, :]


def _frames(rng: np.random.Generator, glyph_pts: np.ndarray, cfg: GlyphInstancesConfig, place: np.ndarray,
            scale: np.ndarray, angle: np.ndarray, sigma: np.ndarray, bg: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` frames of glyphs ``(n, S, 2, 2)`` (glyph-box pixels) with per-frame conditions ``(n,)`` /
    ``(n, 2)`` (top-left ``place`` of the glyph box on the canvas); returns images ``(n, canvas, canvas)`` and
    boxes ``(n, 4)``. Draw order: jitter, shift, scale, noise."""
    u = cfg.glyph / 16.0
    n = len(glyph_pts)
    pts = glyph_pts + rng.normal(0.0, cfg.jitter * u, size=glyph_pts.shape)
    shift = rng.normal(0.0, 0.5 * u, size=(n, 2))
    scale = scale * rng.uniform(0.95, 1.05, size=n)
    offset = place + shift
    pts = _place(pts, (cfg.glyph - 1) / 2.0, scale, angle, offset)
    glyph = render_glyphs(pts, sigma, cfg.canvas)
    img = bg[:, None, None].astype(np.float32) + (1.0 - bg[:, None, None].astype(np.float32)) * glyph
    img += rng.normal(0.0, cfg.noise, size=img.shape).astype(np.float32)
    np.clip(img, 0.0, 1.0, out=img)
    boxes = np.concatenate([offset, offset + cfg.glyph], axis=1)
    return img, np.clip(boxes, 0.0, cfg.canvas)


def _conditions(rng: np.random.Generator, n: int, cfg: GlyphInstancesConfig) -> tuple[np.ndarray, ...]:
    """Per-sequence (or per-image) placement ``(n, 2)``, scale, angle, sigma and background level ``(n,)``."""
    u = cfg.glyph / 16.0
    place = rng.uniform(0.0, cfg.canvas - cfg.glyph, size=(n, 2))
    scale = rng.uniform(0.85, 1.15, size=n)
    angle = rng.uniform(-np.pi / 12, np.pi / 12, size=n)
    sigma = rng.uniform(0.6 * u, 1.0 * u, size=n)
    bg = rng.uniform(0.0, cfg.background, size=n)
    return place, scale, angle, sigma, bg


def instance_glyphs(cfg: GlyphInstancesConfig) -> tuple[np.ndarray, np.ndarray]:
    """The personal instances' glyphs ``(I, 5, 2, 2)`` (4 template segments, one moved, and the mark; without
    a mark the fifth segment repeats the first, which renders the same) and their object classes ``(I,)``."""
    u = cfg.glyph / 16.0
    templates = glyph_templates(np.random.default_rng([cfg.seed, _OBJECTS]), cfg.objects, cfg.glyph)
    rng = np.random.default_rng([cfg.seed, _INSTANCES])
    n = cfg.objects * cfg.instances
    obj = np.repeat(np.arange(cfg.objects, dtype=np.int64), cfg.instances)
    seg = rng.integers(0, 4, size=n)
    direction = rng.uniform(0.0, 2 * np.pi, size=n)
    centre = rng.uniform(4.0 * u, 11.0 * u, size=(n, 2))
    tilt = rng.uniform(0.0, np.pi, size=n)
    pts = np.concatenate([templates[obj], templates[obj][:, :1]], axis=1)  # (I, 5, 2, 2)
    move = cfg.move * u * np.stack([np.cos(direction), np.sin(direction)], axis=1)  # (I, 2)
    pts[np.arange(n), seg] += move[:, None, :]
    if cfg.mark > 0:
        half = 0.5 * cfg.mark * u * np.stack([np.cos(tilt), np.sin(tilt)], axis=1)  # (I, 2)
        pts[:, 4, 0], pts[:, 4, 1] = centre - half, centre + half
    return pts, obj


def generate_glyph_instances(cfg: GlyphInstancesConfig | None = None, **options: object) -> GlyphInstances:
    """Every frame of every personal instance (instance-major, then sequence, then frame)."""
    cfg = _config(cfg, options)
    pts, inst_obj = instance_glyphs(cfg)
    n_seq = len(pts) * cfg.sequences
    seq_cond = _conditions(np.random.default_rng([cfg.seed, _SEQUENCES]), n_seq, cfg)
    per = cfg.frames
    inst = np.repeat(np.arange(len(pts)), cfg.sequences * per)
    seq_of = np.repeat(np.arange(n_seq), per)  # global sequence index of each frame
    images, boxes = _frames(np.random.default_rng([cfg.seed, _FRAMES]), pts[inst], cfg,
                            *(c[seq_of] for c in seq_cond))
    return GlyphInstances(
        images=torch.from_numpy(images).unsqueeze(1),
        boxes=torch.from_numpy(boxes.astype(np.float32)),
        objects=torch.from_numpy(inst_obj[inst]),
        instances=torch.from_numpy(inst.astype(np.int64)),
        sequences=torch.from_numpy((seq_of % cfg.sequences).astype(np.int64)),
        frames=torch.from_numpy(np.tile(np.arange(per, dtype=np.int64), n_seq)),
        instance_object=torch.from_numpy(inst_obj),
        config=cfg,
    )


def base_frames(cfg: GlyphInstancesConfig | None = None, **options: object) -> tuple[Tensor, Tensor, Tensor]:
    """Object-level training frames of ``base_classes`` templates disjoint from the object classes: images
    ``(base_classes * base_per_class, 1, canvas, canvas)``, boxes ``(M, 4)`` and labels ``(M,)`` (class-major)."""
    cfg = _config(cfg, options)
    u = cfg.glyph / 16.0
    templates = glyph_templates(np.random.default_rng([cfg.seed, _BASE_TEMPLATES]), cfg.base_classes, cfg.glyph)
    rng = np.random.default_rng([cfg.seed, _BASE_FRAMES])
    labels = np.repeat(np.arange(cfg.base_classes, dtype=np.int64), cfg.base_per_class)
    pts = templates[labels] + rng.normal(0.0, 0.6 * u, size=(len(labels), 4, 2, 2))
    images, boxes = _frames(rng, pts, cfg, *_conditions(rng, len(labels), cfg))
    return (torch.from_numpy(images).unsqueeze(1), torch.from_numpy(boxes.astype(np.float32)),
            torch.from_numpy(labels))


def one_shot_all_sequences(data: GlyphInstances, seed: int = 0, shots: int = 1) -> tuple[Tensor, Tensor]:
    """The "1SAS" split: ``shots`` random frame(s) of every sequence of every instance are the support, the
    other frames the test set. Returns index tensors ``(support, test)`` into ``data`` (each sorted)."""
    if not 1 <= shots < data.config.frames:
        raise ConfigError(f"shots={shots}: take 1..{data.config.frames - 1} frames per sequence (the rest are "
                          "the test set)")
    g = torch.Generator().manual_seed(seed)
    key = data.instances * data.config.sequences + data.sequences  # (N,) one id per (instance, sequence)
    support = []
    for k in torch.unique(key).tolist():
        rows = torch.nonzero(key == k).flatten()
        support.append(rows[torch.randperm(len(rows), generator=g)[:shots]])
    sup = torch.cat(support).sort().values
    is_sup = torch.zeros(len(data), dtype=torch.bool)
    is_sup[sup] = True
    return sup, torch.nonzero(~is_sup).flatten()
