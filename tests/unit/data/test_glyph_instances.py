"""Glyph instances: structure, determinism, the per-instance change, boxes and the 1SAS split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.core.errors import ConfigError
from edgetune.data.glyph_instances import (
    GlyphInstancesConfig,
    base_frames,
    generate_glyph_instances,
    instance_glyphs,
    one_shot_all_sequences,
)
from edgetune.data.synglyph import glyph_templates

SMALL = {"objects": 3, "instances": 2, "sequences": 3, "frames": 4, "base_classes": 4, "base_per_class": 5}


def test_structure_and_ranges() -> None:
    d = generate_glyph_instances(**SMALL)
    n = 3 * 2 * 3 * 4
    assert len(d) == n and d.images.shape == (n, 1, 32, 32) and d.images.dtype == torch.float32
    assert float(d.images.min()) >= 0.0 and float(d.images.max()) <= 1.0
    assert d.instance_object.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(d.objects, d.instance_object[d.instances])
    # instance-major, then sequence, then frame
    assert d.instances[:12].tolist() == [0] * 12 and d.sequences[:12].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert d.frames[:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # boxes are glyph-sized (16 px) and inside the canvas (up to the frame's small shift)
    w = d.boxes[:, 2] - d.boxes[:, 0]
    assert float((w - 16).abs().max()) < 3.0 and float(d.boxes.min()) >= 0 and float(d.boxes.max()) <= 32


def test_deterministic_and_streams_independent() -> None:
    a, b = generate_glyph_instances(**SMALL), generate_glyph_instances(**SMALL)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    c = generate_glyph_instances(**{**SMALL, "seed": 1})
    assert not torch.equal(a.images, c.images)
    # more frames per sequence keeps the templates and instance changes (separate random streams)
    cfg = GlyphInstancesConfig(**SMALL)
    assert np.array_equal(instance_glyphs(cfg)[0], instance_glyphs(cfg.replace(frames=6))[0])


def test_instance_change_is_one_moved_segment_and_a_mark() -> None:
    cfg = GlyphInstancesConfig(**SMALL)
    pts, obj = instance_glyphs(cfg)
    templates = glyph_templates(np.random.default_rng([cfg.seed, 0]), cfg.objects, cfg.glyph)
    for i in range(len(pts)):
        diff = np.abs(pts[i, :4] - templates[obj[i]]).reshape(4, -1).max(axis=1)
        moved = np.nonzero(diff > 1e-9)[0]
        assert len(moved) == 1  # exactly one template segment moved
        shift = pts[i, moved[0]] - templates[obj[i], moved[0]]  # both endpoints by the same vector of length `move`
        assert np.allclose(shift[0], shift[1]) and np.isclose(np.linalg.norm(shift[0]), cfg.move)
        assert np.isclose(np.linalg.norm(pts[i, 4, 1] - pts[i, 4, 0]), cfg.mark)  # the mark's length
    # two instances of one object differ; without move and mark they render the template (mark = segment 0 again)
    plain, _ = instance_glyphs(cfg.replace(move=0.0, mark=0.0))
    assert np.array_equal(plain[:, :4], templates[obj]) and np.array_equal(plain[:, 4], plain[:, 0])


def test_base_frames_disjoint_templates_and_labels() -> None:
    cfg = GlyphInstancesConfig(**SMALL)
    x, boxes, y = base_frames(cfg)
    assert x.shape == (20, 1, 32, 32) and boxes.shape == (20, 4) and y.tolist() == sorted(y.tolist())
    obj = glyph_templates(np.random.default_rng([cfg.seed, 0]), cfg.objects, cfg.glyph)
    base = glyph_templates(np.random.default_rng([cfg.seed, 4]), cfg.base_classes, cfg.glyph)
    assert not any(np.allclose(o, b) for o in obj for b in base)


def test_one_shot_all_sequences() -> None:
    d = generate_glyph_instances(**SMALL)
    sup, test = one_shot_all_sequences(d, seed=3)
    assert len(sup) == 6 * 3 and len(test) == len(d) - 18
    assert set(sup.tolist()).isdisjoint(test.tolist()) and sorted(sup.tolist() + test.tolist()) == list(range(len(d)))
    key = (d.instances * 3 + d.sequences)[sup]
    assert len(torch.unique(key)) == 18  # one shot from every sequence of every instance
    assert torch.equal(sup, one_shot_all_sequences(d, seed=3)[0])
    assert not torch.equal(sup, one_shot_all_sequences(d, seed=4)[0])
    two, _ = one_shot_all_sequences(d, seed=0, shots=2)
    assert len(two) == 36
    with pytest.raises(ConfigError, match="shots=4"):
        one_shot_all_sequences(d, shots=4)


def test_first_instances_and_bad_config() -> None:
    d = generate_glyph_instances(**SMALL)
    one = d.first_instances(1)
    assert sorted(torch.unique(one.instances).tolist()) == [0, 2, 4] and len(one) == len(d) // 2
    with pytest.raises(ConfigError, match="per_object=3"):
        d.first_instances(3)
    with pytest.raises(ConfigError, match="glyph=40"):
        generate_glyph_instances(glyph=40)
    with pytest.raises(ConfigError, match="objcts"):
        generate_glyph_instances(objcts=3)
