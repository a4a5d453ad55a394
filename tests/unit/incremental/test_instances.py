"""Object-conditioned bag of instances: the maths against naive loops, hand cases, save/load, bad input, learning."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgetune.core.errors import CheckpointError, ConfigError, ShapeError
from edgetune.incremental.instances import (
    BagOfInstances,
    bag_mask,
    bag_predict,
    box_masks,
    crop_regions,
    embed,
    region_moments,
)
from edgetune.incremental.pooling import moment_pool


def _filled(seed: int = 0, dim: int = 6, center: bool = False) -> tuple[BagOfInstances, dict[str, torch.Tensor]]:
    """A bag of 5 instances (objects 'mug' x2, 'cup' x2, 7 x1) from random features."""
    g = torch.Generator().manual_seed(seed)
    bag = BagOfInstances(None, center=center)
    if center:
        bag.fit_center(torch.randn(10, dim, generator=g))
    shots = {}
    for name, obj in (("m1", "mug"), ("m2", "mug"), ("c1", "cup"), ("c2", "cup"), ("x", 7)):
        shots[name] = torch.randn(3, dim, generator=g)
        bag.add_instance(name, obj, shots[name])
    return bag, shots


def _state(bag: BagOfInstances) -> tuple:
    return (list(bag.names), list(bag.instance_object), list(bag.objects), bag.sums.clone(), bag.counts.clone(),
            bag.extra_sums.clone(), bag.extra_counts.clone(), None if bag.center is None else bag.center.clone())


def _same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------ pure functions
def test_bag_predict_equals_naive_loop() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(40, 9, generator=g)
    inst_obj = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    query_obj = torch.randint(0, 4, (40,), generator=g)
    got = bag_predict(scores, inst_obj, query_obj)
    for n in range(40):
        best, best_s = -1, -math.inf
        for i in range(9):
            if inst_obj[i] == query_obj[n] and scores[n, i] > best_s:
                best, best_s = i, float(scores[n, i])
        assert int(got[n]) == best
    assert torch.equal(bag_predict(scores, inst_obj), scores.argmax(1))
    assert bag_mask(inst_obj, query_obj).shape == (40, 9)
    with pytest.raises(ConfigError, match="no personal instance"):
        bag_predict(scores, inst_obj, torch.full((40,), 5))


def test_recognizer_predict_equals_naive_prototype_loop() -> None:
    bag, shots = _filled(seed=2, center=True)
    q = torch.randn(30, 6, generator=torch.Generator().manual_seed(3))
    objs = ["mug", "cup", 7] * 10
    center = bag.center.double()
    protos = {n: F.normalize(F.normalize(s.double() - center, dim=1).mean(0), dim=0) for n, s in shots.items()}
    obj_of = dict(zip(bag.names, bag.instance_object, strict=True))
    pred = bag.predict(q, objs)
    pred_all = bag.predict(q, conditioned=False)
    for n in range(30):
        e = F.normalize(q[n].double() - center, dim=0)
        cos = {name: float(e @ p) for name, p in protos.items()}
        assert pred.names[n] == max((k for k in cos if obj_of[k] == objs[n]), key=cos.get)
        assert pred_all.names[n] == max(cos, key=cos.get)
    assert pred.object_source == "given" and pred.objects == objs
    assert pred_all.object_source == "unused" and pred_all.objects == [None] * 30


def test_predicted_object_class_is_nearest_object_prototype() -> None:
    bag, shots = _filled(seed=4)
    q = torch.randn(20, 6, generator=torch.Generator().manual_seed(5))
    obj_protos = {}
    for obj in ("mug", "cup", 7):
        e = torch.cat([F.normalize(shots[n].double(), dim=1) for n, o in zip(bag.names, bag.instance_object,
                                                                             strict=True) if o == obj])
        obj_protos[obj] = F.normalize(e.mean(0), dim=0)
    pred = bag.predict(q)
    assert pred.object_source == "predicted"
    for n in range(20):
        e = F.normalize(q[n].double(), dim=0)
        assert pred.objects[n] == max(obj_protos, key=lambda o: float(e @ obj_protos[o]))
    # the instance is then searched within that object's bag
    assert pred.names == bag.predict(q, pred.objects).names


def test_hand_computed_case() -> None:
    bag = BagOfInstances(None)
    bag.add_instance("my mug", "mug", torch.tensor([[1.0, 0.0]]))
    bag.add_instance("your mug", "mug", torch.tensor([[0.0, 1.0]]))
    bag.add_instance("my cup", "cup", torch.tensor([[1.0, 0.2]]))
    q = torch.tensor([[1.0, 0.15]])  # closest to "my cup" (cos 0.9997) then "my mug" (0.989)
    assert bag.predict(q, "mug").names == ["my mug"]
    assert bag.predict(q, "cup").names == ["my cup"]
    assert bag.predict(q, conditioned=False).names == ["my cup"]
    # region moments of a one-channel 2x2 map [[1, 2], [3, 4]]: mean 2.5, std sqrt(1.25)
    m = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.allclose(region_moments(m, orders=(1, 2), block_norm=False), torch.tensor([[2.5, 1.25 ** 0.5]]))
    assert torch.allclose(region_moments(m, orders=(1, 2)), torch.ones(1, 2))  # each one-channel block normalized
    assert torch.allclose(embed(torch.tensor([[3.0, 4.0]]), torch.tensor([3.0, 0.0])), torch.tensor([[0.0, 1.0]]))


def test_region_moments_equal_moment_pool_on_the_cropped_map() -> None:
    g = torch.Generator().manual_seed(6)
    fmap = torch.randn(4, 5, 8, 8, generator=g)
    # image 32x32 -> 8x8 grid: 4 px per cell; aligned and unaligned boxes (an unaligned box takes every cell it touches)
    boxes = torch.tensor([[8.0, 4.0, 24.0, 20.0], [0.0, 0.0, 32.0, 32.0], [9.5, 3.0, 14.0, 30.5], [28.0, 28.0, 32.0, 32.0]])
    cells = [(1, 5, 2, 6), (0, 8, 0, 8), (0, 8, 2, 4), (7, 8, 7, 8)]  # (r0, r1, c0, c1)
    for orders in ((1,), (1, 2), (1, 2, 3)):
        got = region_moments(fmap, boxes, (32, 32), orders)
        for n, (r0, r1, c0, c1) in enumerate(cells):
            ref = moment_pool(fmap[n:n + 1, :, r0:r1, c0:c1], (2, 3), orders, block_norm=True)
            assert torch.allclose(got[n:n + 1], ref, atol=1e-6), (orders, n)
    masks = box_masks(boxes, (32, 32), (8, 8))
    assert masks.sum((1, 2)).tolist() == [16, 64, 16, 1]
    assert torch.allclose(region_moments(fmap, None, None, (1, 2)), moment_pool(fmap, (2, 3), (1, 2), block_norm=True))


def test_crop_regions_on_pixel_aligned_boxes_is_slicing() -> None:
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    boxes = torch.tensor([[2.0, 3.0, 8.0, 9.0], [0.0, 0.0, 12.0, 12.0]])
    crops = crop_regions(x, boxes, 6)
    assert torch.allclose(crops[0], x[0, :, 3:9, 2:8], atol=1e-5)
    assert torch.allclose(crop_regions(x[1:], boxes[1:], 12)[0], x[1], atol=1e-5)


def test_encode_images_with_boxes_through_a_trunk() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    x = torch.rand(5, 1, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 5)
    bag = BagOfInstances(trunk, orders=(1, 2), batch_size=2)
    with torch.no_grad():
        ref = moment_pool(trunk(x)[:, :, 0:4, 0:4], (2, 3), (1, 2), block_norm=True)
    assert torch.allclose(bag.encode(x, boxes), ref, atol=1e-6)
    bag.add_instance("a", "mug", x[:2], boxes[:2])
    assert bag.dim == 8
    assert bag.predict(x, "mug", boxes).names == ["a"] * 5
    with pytest.raises(ConfigError, match="boxes locate regions"):
        bag.add_instance("b", "mug", torch.rand(2, 8), boxes[:2])


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("center", [False, True])
def test_save_load_exact(tmp_path: Path, center: bool) -> None:
    bag, _ = _filled(seed=8, center=center)
    bag.add_object_examples("cup", torch.randn(4, 6))
    path = bag.save(tmp_path / "bag.safetensors")
    again = BagOfInstances.load(path)
    assert _same(_state(bag), _state(again)) and again.config == bag.config
    assert again.instance_object == ["mug", "mug", "cup", "cup", 7]  # label types kept
    q = torch.randn(25, 6)
    for obj in (None, "cup"):
        a, b = bag.predict(q, obj), again.predict(q, obj)
        assert torch.equal(a.index, b.index) and a.objects == b.objects
    assert torch.equal(bag.scores(q), again.scores(q))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable"):
        BagOfInstances.load(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="no bag-of-instances file"):
        BagOfInstances.load(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_and_leaves_the_recognizer_unchanged() -> None:
    bag, _ = _filled(seed=9, center=True)
    before = _state(bag)
    cases = [
        (ConfigError, "already known", lambda: bag.add_instance("m1", "cup", torch.randn(2, 6))),
        (ConfigError, "empty", lambda: bag.add_instance("new", "bowl", torch.randn(0, 6))),
        (ShapeError, "dimension 5", lambda: bag.add_instance("new", "bowl", torch.randn(2, 5))),
        (ShapeError, "dimension 5", lambda: bag.predict(torch.randn(2, 5), "mug")),
        (ConfigError, "'bowl' has no personal instance", lambda: bag.predict(torch.randn(2, 6), "bowl")),
        (ConfigError, "'mugg' has no personal instance.*Did you mean", lambda: bag.predict(torch.randn(2, 6), "mugg")),
        (ConfigError, "'bowl' has no personal instance", lambda: bag.predict(torch.randn(2, 6), "bowl",
                                                                             conditioned=False)),
        (ConfigError, "has no personal instance", lambda: bag.add_object_examples("bowl", torch.randn(2, 6))),
        (ShapeError, "3 object classes for 2 queries", lambda: bag.predict(torch.randn(2, 6), ["mug"] * 3)),
        (ConfigError, "object_class must be", lambda: bag.add_instance("new", 1.5, torch.randn(2, 6))),
        (ConfigError, "non-empty string", lambda: bag.add_instance("", "mug", torch.randn(2, 6))),
        (ConfigError, "fit_center after 5 instances", lambda: bag.fit_center(torch.randn(4, 6))),
        (ShapeError, "features .N, D. or images", lambda: bag.add_instance("new", "mug", torch.randn(2, 6, 1))),
        (ConfigError, "no trunk", lambda: bag.add_instance("new", "mug", torch.randn(2, 1, 8, 8))),
    ]
    for err, match, call in cases:
        with pytest.raises(err, match=match):
            call()
        assert _same(before, _state(bag)), match
    fresh = BagOfInstances(None, center=True)
    with pytest.raises(ConfigError, match="no centre is set"):
        fresh.add_instance("a", "mug", torch.randn(2, 6))
    assert fresh.names == [] and fresh.objects == []
    with pytest.raises(ConfigError, match="no instances yet"):
        fresh.predict(torch.randn(2, 6))
    with pytest.raises(ConfigError, match="center=True"):
        BagOfInstances(None).fit_center(torch.randn(3, 6))
    with pytest.raises(ConfigError, match="min_shots=2"):
        BagOfInstances(None, min_shots=2).add_instance("a", "mug", torch.randn(1, 6))
    with pytest.raises(ConfigError, match="orders"):
        BagOfInstances(None, orders=(1, 1))


# ---------------------------------------------------------------------------------------------- learning
def _confusable(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 objects x 3 instances in 16-d: instance j of every object shares a direction, so instances of different
    objects are closer than instances of one object; returns features, instance ids, object ids."""
    g = torch.Generator().manual_seed(0)
    obj_dir, inst_dir = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    g = torch.Generator().manual_seed(seed)
    inst = torch.arange(9).repeat_interleave(n)
    obj = inst // 3
    z = 0.15 * obj_dir[obj] + inst_dir[inst % 3] + 0.35 * torch.randn(len(inst), 16, generator=g)
    return z, inst, obj


def test_bag_restriction_learns_what_a_global_search_confuses() -> None:
    z, inst, obj = _confusable(seed=1, n=3)
    bag = BagOfInstances(None)
    for i in range(9):
        bag.add_instance(f"i{i}", int(obj[3 * i]), z[inst == i])
    zt, it, ot = _confusable(seed=2, n=40)
    names = torch.tensor([int(n[1:]) for n in bag.names])
    acc_bag = float((names[bag.predict(zt, ot.tolist()).index] == it).float().mean())
    acc_all = float((names[bag.predict(zt, conditioned=False).index] == it).float().mean())
    assert acc_bag >= 0.9 and acc_all <= 0.75 and acc_bag - acc_all >= 0.2, (acc_bag, acc_all)
    # a broken restriction (instances searched in a wrong bag) falls to chance level or below
    wrong = [(o + 1) % 3 for o in ot.tolist()]
    assert float((names[bag.predict(zt, wrong).index] == it).float().mean()) == 0.0
    # copies are independent
    assert copy.deepcopy(bag).predict(zt, ot.tolist()).names == bag.predict(zt, ot.tolist()).names
