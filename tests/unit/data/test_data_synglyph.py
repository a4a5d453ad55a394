"""SynGlyph: rendering against a naive reference, determinism, shapes, range, and learnable classes."""

from __future__ import annotations

import math

import numpy as np
import torch

from edgetune.data import DataConfig, load_dataset
from edgetune.data.synglyph import generate_split, glyph_templates, render_glyphs


def _naive_render(segments: np.ndarray, sigma: float, size: int) -> np.ndarray:
    img = np.zeros((size, size))
    for r in range(size):
        for c in range(size):
            best = math.inf
            for (ax, ay), (bx, by) in segments:
                vx, vy = bx - ax, by - ay
                t = ((c - ax) * vx + (r - ay) * vy) / max(vx * vx + vy * vy, 1e-12)
                t = min(max(t, 0.0), 1.0)
                best = min(best, (c - ax - t * vx) ** 2 + (r - ay - t * vy) ** 2)
            img[r, c] = math.exp(-best / (2 * sigma * sigma))
    return img


def test_render_hand_computed_segment() -> None:
    seg = np.array([[[[2.0, 5.0], [10.0, 5.0]]]])  # one horizontal segment, x 2..10 at row 5
    img = render_glyphs(seg, np.array([1.0]), 16)[0]
    assert img[5, 6] == 1.0  # on the segment
    assert math.isclose(img[7, 6], math.exp(-2.0), rel_tol=1e-6)  # 2 px below
    assert math.isclose(img[5, 12], math.exp(-2.0), rel_tol=1e-6)  # 2 px past the end point
    assert math.isclose(img[8, 13], math.exp(-(9 + 9) / 2), rel_tol=1e-5)  # nearest point is the end (10, 5)


def test_render_matches_naive_reference() -> None:
    rng = np.random.default_rng(5)
    segs = rng.uniform(0, 15, size=(3, 4, 2, 2))
    segs[0, 1, 1] = segs[0, 1, 0]  # a degenerate (point) segment
    sigma = np.array([0.6, 0.8, 1.0])
    got = render_glyphs(segs, sigma, 16)
    for i in range(3):
        np.testing.assert_allclose(got[i], _naive_render(segs[i], sigma[i], 16), atol=2e-6)


def test_same_seed_same_bytes_and_seed_matters() -> None:
    opts = {"num_classes": 5, "train_per_class": 6, "test_per_class": 2}
    a, b, c = (load_dataset(DataConfig(name="synglyph", seed=s, options=opts)) for s in (7, 7, 8))
    assert a.train.tensors[0].numpy().tobytes() == b.train.tensors[0].numpy().tobytes()
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_shapes_labels_and_range() -> None:
    b = load_dataset(
        DataConfig(
            name="synglyph", options={"num_classes": 7, "train_per_class": 3, "test_per_class": 2, "size": 20}
        )
    )
    x, y = b.train.tensors
    assert x.shape == (21, 1, 20, 20) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == [c for c in range(7) for _ in range(3)]
    assert len(b.test) == 14 and b.num_classes == 7 and b.input_shape == (1, 20, 20)
    assert int(x.min()) == 0 and int(x.max()) == 255  # noise pushes some pixels past both ends
    xf = b.transform([x, y])[0]
    assert xf.dtype == torch.float32 and float(xf.min()) == 0.0 and float(xf.max()) == 1.0


def test_uint8_storage_matches_generator_within_half_a_level() -> None:
    opts = {"num_classes": 5, "train_per_class": 4, "test_per_class": 2}
    b = load_dataset(DataConfig(name="synglyph", seed=3, options=opts))
    rng = np.random.default_rng(3)
    raw, _ = generate_split(rng, glyph_templates(rng, 5), 4)
    xf = b.transform([b.train.tensors[0], b.train.tensors[1]])[0][:, 0]
    err = (xf - torch.from_numpy(raw)).abs().max()
    assert float(err) <= 0.5 / 255 + 1e-6


def test_templates_in_range() -> None:
    t = glyph_templates(np.random.default_rng(0), 50)
    assert t.shape == (50, 4, 2, 2) and t.min() >= 3 and t.max() <= 12


def test_classes_are_distinguishable_by_nearest_class_mean() -> None:
    rng = np.random.default_rng(0)
    templates = glyph_templates(rng, 10)
    xtr, ytr = generate_split(rng, templates, 40)
    xte, yte = generate_split(rng, templates, 20)
    means = np.stack([xtr[ytr == c].reshape(-1, 256).mean(0) for c in range(10)])
    d = ((xte.reshape(-1, 1, 256) - means[None]) ** 2).sum(-1)
    acc = (d.argmin(1) == yte).mean()
    assert acc > 0.5, acc


def test_full_default_dataset_shape() -> None:
    b = load_dataset(DataConfig(name="synglyph", val_fraction=20 / 300))
    assert (len(b.train), len(b.val), len(b.test)) == (28000, 2000, 10000)
    assert torch.bincount(b.val.tensors[1]).tolist() == [20] * 100
