"""Generated personal-object scenes: masks, boxes and occlusion bookkeeping, determinism from the seed, negative
queries, and the foolbox photos (skipped with the fetch command when they are not installed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError, DataError, ShapeError
from edgetune.data.scenes import (
    FOOLBOX_FILES,
    ObjectImage,
    ScenesConfig,
    background,
    ellipse_mask,
    load_objects,
    paste,
    search_episode,
)


def _foolbox_installed() -> bool:
    try:
        load_objects(side=16)
    except DataError:
        return False
    return True


needs_foolbox = pytest.mark.skipif(not _foolbox_installed(),
                                   reason="foolbox photos not installed: run `bash scripts/fetch-data.sh` (make data)")


def _synthetic_objects(n: int, side: int = 48) -> list[ObjectImage]:
    rng = np.random.default_rng(0)
    return [ObjectImage(f"o{i}", rng.integers(0, 256, (side, side, 3)).astype(np.uint8), ellipse_mask(side, side))
            for i in range(n)]


def test_ellipse_mask() -> None:
    m = ellipse_mask(40, 60, 0.5)
    assert m.shape == (40, 60)
    assert np.array_equal(m, m[::-1]) and np.array_equal(m, m[:, ::-1])  # symmetric
    assert abs(m.sum() / m.size - math.pi / 4 * 0.25) < 0.02  # area of the ellipse
    assert m[20, 30] and not m[0, 0] and not m[20, 10]  # centre in, x = 10 outside the 0.5 * 60 axis


def test_paste_writes_the_masked_pixels_only() -> None:
    canvas = np.zeros((20, 30, 3), dtype=np.uint8)
    obj = ObjectImage("x", np.full((8, 8, 3), 200, dtype=np.uint8), ellipse_mask(8, 8))
    m = paste(canvas, obj, 5, 10, 8, flip=False)
    assert m.shape == (20, 30) and m.sum() == obj.mask.sum()
    assert (canvas[m] == 200).all() and (canvas[~m] == 0).all()
    assert not m[:5].any() and not m[:, :10].any() and not m[13:].any()
    with pytest.raises(ShapeError, match="leaves"):
        paste(canvas, obj, 15, 10, 8, flip=False)


def test_paste_flip_mirrors_the_object() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:, 0] = 255  # left column white
    obj = ObjectImage("x", rgb, np.ones((4, 4), dtype=bool))
    canvas = np.zeros((4, 4, 3), dtype=np.uint8)
    paste(canvas, obj, 0, 0, 4, flip=True)
    assert (canvas[:, 3] == 255).all() and (canvas[:, 0] == 0).all()


def test_background_is_seeded_and_uses_the_photos() -> None:
    photo = np.full((50, 70, 3), 255, dtype=np.uint8)
    a = background(np.random.default_rng(1), 32, [photo], clutter=0)
    b = background(np.random.default_rng(1), 32, [photo], clutter=0)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert a.mean() > 230  # the white photo, plus a little noise
    c = background(np.random.default_rng(1), 32, [], clutter=5)
    assert c.std() > 5  # procedural: gradient and shapes


def test_episode_structure_masks_boxes_and_negatives() -> None:
    cfg = ScenesConfig(personal=3, queries_per_object=2, negatives=3, size=96, distractors=(1, 2), seed=4)
    ep = search_episode(cfg, objects=_synthetic_objects(6))
    assert ep.names == ["o0", "o1", "o2"]
    assert ep.labels.tolist() == [0, 0, 1, 1, 2, 2, -1, -1, -1]
    assert len(ep.supports) == 3 and len(ep.queries) == 9
    for name, s in zip(ep.names, ep.supports, strict=True):
        assert s.target == name and [o.name for o in s.objects] == [name]  # alone on its background
    for q, label in zip(ep.queries, ep.labels, strict=True):
        assert q.image.shape == (96, 96, 3) and q.image.dtype == np.uint8
        personal = [o for o in q.objects if o.personal]
        if label < 0:
            assert q.target is None and not personal and q.objects  # only distractors
            assert all(o.name not in ep.names for o in q.objects)
        else:
            assert q.target == ep.names[label] and [o.name for o in personal] == [q.target]
            assert 1 <= len(q.objects) - 1 <= 2
        for o in q.objects:
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        tgt = q.object(q.target) if q.target else None
        if tgt is not None:  # pasted last: never occluded, a whole ellipse of side in the scale range
            x0, y0, x1, y1 = tgt.box
            side = max(x1 - x0, y1 - y0)
            assert 0.25 * 96 - 2 <= side <= 0.45 * 96 + 2
            assert tgt.mask.sum() == pytest.approx(math.pi / 4 * side**2, rel=0.12)
            for o in q.objects:  # distractor masks exclude what the target covers
                assert o is tgt or not (o.mask & tgt.mask).any()
    with pytest.raises(KeyError, match="no object"):
        ep.queries[0].object("nope")


def test_episode_is_deterministic_from_the_seed() -> None:
    objs = _synthetic_objects(5)
    cfg = ScenesConfig(personal=2, queries_per_object=2, negatives=1, size=80)
    a, b = search_episode(cfg, objs), search_episode(cfg, objs)
    c = search_episode(cfg.replace(seed=1), objs)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.queries, b.queries, strict=True))
    assert all(np.array_equal(x.object(x.objects[0].name).mask, y.object(y.objects[0].name).mask)
               for x, y in zip(a.queries, b.queries, strict=True))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a.queries, c.queries, strict=True))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="no distractor"):
        search_episode(ScenesConfig(personal=5, size=64), objects=_synthetic_objects(5))
    with pytest.raises(ConfigError, match="scale"):
        validate(ScenesConfig, {"scale": (0.6, 0.3)})
    with pytest.raises(ConfigError, match="personal"):
        validate(ScenesConfig, {"personal": 0})
    with pytest.raises(ConfigError, match="distractor"):
        validate(ScenesConfig, {"distractor": (1, 2)})  # unknown key, with the close one suggested


def test_missing_photos_name_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fetch-data.sh"):
        load_objects(tmp_path)
    with pytest.raises(DataError, match="fetch-data.sh") as info:
        load_objects(tmp_path / "absent")
    assert "foolbox==3.3.4" in str(info.value) and "absent" in str(info.value)


@needs_foolbox
def test_foolbox_photos_as_elliptical_objects() -> None:
    objs = load_objects(side=64, ellipse=0.8)
    assert [o.name for o in objs] == [f.removesuffix(".jpg") for f in FOOLBOX_FILES]
    for o in objs:
        assert o.rgb.shape == (64, 64, 3) and o.rgb.dtype == np.uint8 and o.mask.shape == (64, 64)
        assert o.rgb.std() > 10  # a real photo, not a flat fill
    assert len({o.rgb.tobytes() for o in objs}) == 20


@needs_foolbox
def test_foolbox_episode() -> None:
    ep = search_episode(ScenesConfig(personal=4, queries_per_object=1, negatives=2, size=128))
    assert len(ep.names) == 4 and len(ep.queries) == 6
    assert ep.names[0] == "imagenet_00_243"
    assert all(q.object(q.target).mask.any() for q in ep.queries if q.target)
