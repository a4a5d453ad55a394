"""Personal object search (Swiss DINO style): each step against a naive loop or a hand-computed case, the k-means
against scipy, AP against scikit-learn's definition, the patch extractors' grids, and an end-to-end search on
synthetic scenes with a randomly initialised ViT (no package, no weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.object_search import (
    PersonalObjectSearch,
    SearchConfig,
    average_precision,
    best_component,
    box_iou,
    box_to_grid,
    connected_components,
    grid_box_to_pixels,
    localize,
    mask_iou,
    mask_to_grid,
    patch_cosine,
    prototype,
    search_metrics,
    self_calibrated_threshold,
)
from edgetune.incremental.patch_features import (
    hf_vit_patches,
    mobilenet_v2_patches,
    prepare_images,
    vit_patches,
)
from edgetune.incremental.patch_kmeans import box_foreground, box_ring, kmeans
from edgetune.models.pretrained import MobileNetV2
from edgetune.models.vit import ViT


# ----------------------------------------------------------------------------------------------- references
def _mask_to_grid_ref(mask: torch.Tensor, grid: tuple[int, int], thr: float) -> torch.Tensor:
    hh, ww = mask.shape
    h, w = grid
    out = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            y0, y1 = (i * hh) // h, -(-((i + 1) * hh) // h)
            x0, x1 = (j * ww) // w, -(-((j + 1) * ww) // w)
            out[i, j] = mask[y0:y1, x0:x1].float().mean() > thr
    return out


def _components_ref(mask: torch.Tensor) -> list[set[tuple[int, int]]]:
    """8-connected components by flood fill."""
    h, w = mask.shape
    seen, comps = set(), []
    for i in range(h):
        for j in range(w):
            if not mask[i, j] or (i, j) in seen:
                continue
            comp, stack = set(), [(i, j)]
            seen.add((i, j))
            while stack:
                a, b = stack.pop()
                comp.add((a, b))
                for da in (-1, 0, 1):
                    for db in (-1, 0, 1):
                        na, nb = a + da, b + db
                        if 0 <= na < h and 0 <= nb < w and mask[na, nb] and (na, nb) not in seen:
                            seen.add((na, nb))
                            stack.append((na, nb))
            comps.append(comp)
    return comps


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


# ------------------------------------------------------------------------------------------ support masks
def test_mask_to_grid_matches_the_area_loop() -> None:
    g = torch.Generator().manual_seed(0)
    for hh, ww, h, w in ((13, 17, 4, 5), (32, 32, 8, 8), (20, 9, 6, 3)):
        m = torch.rand(hh, ww, generator=g) > 0.6
        for thr in (0.1, 0.5):
            assert torch.equal(mask_to_grid(m, (h, w), thr), _mask_to_grid_ref(m, (h, w), thr))


def test_mask_to_grid_hand_case() -> None:
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[0:2, 0:1] = True  # 2 of 16 pixels of cell (0, 0): 0.125 > 0.1; one pixel of cell (0, 1): 1/16 < 0.1
    m[0, 4] = True
    got = mask_to_grid(m, (2, 2), 0.1)
    assert got.tolist() == [[True, False], [False, False]]


def test_box_to_grid_hand_cases_and_errors() -> None:
    assert box_to_grid((10, 20, 50, 60), (100, 100), (10, 10)) == (2, 6, 1, 5)
    assert box_to_grid((12, 25, 49, 61), (100, 100), (10, 10)) == (2, 7, 1, 5)  # touched patches
    assert box_to_grid((-30, -5, 200, 40), (100, 100), (10, 10)) == (0, 4, 0, 10)  # clipped to the image
    assert box_to_grid((99.5, 99.5, 100, 100), (100, 100), (10, 10)) == (9, 10, 9, 10)
    with pytest.raises(ShapeError, match="empty"):
        box_to_grid((10, 10, 10, 20), (100, 100), (10, 10))
    with pytest.raises(ShapeError, match="outside"):
        box_to_grid((120, 10, 140, 20), (100, 100), (10, 10))


def test_grid_box_to_pixels() -> None:
    m = torch.zeros(4, 5, dtype=torch.bool)
    m[1, 2] = m[2, 3] = True
    assert grid_box_to_pixels(m, (40, 100)) == (40.0, 10.0, 80.0, 30.0)
    assert grid_box_to_pixels(torch.zeros(4, 5, dtype=torch.bool), (40, 100)) == (0.0, 0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------- k-means
def test_kmeans_equals_scipy_from_the_same_start() -> None:
    from scipy.cluster.vq import kmeans2

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.6, (30, 4)) for c in (0.0, 2.0, 4.0)])
    init = x[[0, 40, 80, 10]]
    _, want = kmeans2(x, init.copy(), iter=50, minit="matrix")
    got, cent = kmeans(torch.tensor(x), 4, init=torch.tensor(init))
    assert got.tolist() == want.tolist()
    for c in range(4):  # a fixed point: each centroid is the mean of its members
        torch.testing.assert_close(cent[c], torch.tensor(x)[got == c].mean(0))


def test_kmeans_recovers_blobs_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.3 * torch.randn(60, 2, generator=g)
    a, _ = kmeans(x, 3, seed=3)
    b, _ = kmeans(x, 3, seed=3)
    assert torch.equal(a, b)
    pairs = {(int(t), int(p)) for t, p in zip(truth, a, strict=True)}
    assert len(pairs) == 3  # a bijection between true blobs and clusters
    labels, cent = kmeans(x[:2], 5)  # k clipped to N
    assert cent.shape == (2, 2) and sorted(labels.tolist()) == [0, 1]


def test_box_ring_hand_case() -> None:
    ring = box_ring((1, 3, 0, 2), (4, 4))
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[0, 0:3] = want[3, 0:3] = True
    want[1:3, 2] = True
    assert torch.equal(ring, want)


def _two_feature_grid(h: int, w: int, obj: tuple[slice, slice], noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """``(8, h, w)``: feature A (varying a little) on the object's patches, feature B elsewhere."""
    g = torch.Generator().manual_seed(seed)
    f = torch.zeros(8, h, w)
    f[0] = 1.0
    f[0][obj] = 0.0
    f[1][obj] = 1.0
    return f + noise * torch.rand(8, h, w, generator=g)


def test_box_foreground_drops_the_clusters_the_ring_hits() -> None:
    f = _two_feature_grid(8, 8, (slice(3, 6), slice(3, 6)))
    fg = box_foreground(f, (2, 7, 2, 7), k=2)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[3:6, 3:6] = True
    assert torch.equal(fg, want)
    # a box fitting the object exactly: its ring is all background (B), so the foreground is a non-empty part of
    # the object whatever k-means does with the noise inside
    fg5 = box_foreground(f, (3, 6, 3, 6), k=5)
    assert fg5.any() and not (fg5 & ~want).any()


def test_box_foreground_keeps_the_box_when_the_ring_hits_everything_or_is_absent() -> None:
    f = _two_feature_grid(6, 6, (slice(0, 0), slice(0, 0)))  # all background
    fg = box_foreground(f, (1, 4, 1, 4), k=1)
    assert int(fg.sum()) == 9 and bool(fg[1:4, 1:4].all())
    whole = box_foreground(f, (0, 6, 0, 6), k=3)
    assert bool(whole.all())
    with pytest.raises(ShapeError, match="grid box"):
        box_foreground(f, (2, 2, 0, 3))


# ---------------------------------------------------------------------------- prototype and threshold
def test_prototype_and_cosine_match_loops() -> None:
    g = torch.Generator().manual_seed(2)
    f = torch.randn(5, 3, 4, generator=g)
    m = torch.rand(3, 4, generator=g) > 0.5
    m[0, 0] = True
    acc = torch.zeros(5, dtype=torch.float64)
    for i in range(3):
        for j in range(4):
            if m[i, j]:
                acc += _unit(f[:, i, j].double())
    p = prototype(f, m)
    torch.testing.assert_close(p, _unit(acc))
    cos = patch_cosine(f, p)
    for i in range(3):
        for j in range(4):
            assert math.isclose(float(cos[i, j]), float(_unit(f[:, i, j].double()) @ p), abs_tol=1e-12)
    with pytest.raises(ShapeError, match="empty"):
        prototype(f, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="does not match"):
        prototype(f, torch.ones(4, 3, dtype=torch.bool))


def test_self_calibrated_threshold_against_numpy_and_by_hand() -> None:
    rng = np.random.default_rng(3)
    cos = torch.tensor(rng.uniform(-1, 1, (6, 7)))
    fg = torch.tensor(rng.random((6, 7)) > 0.5)
    for p in (5.0, 10.0, 25.0):
        want = max(np.percentile(cos[~fg].numpy(), 100 - p), np.percentile(cos[fg].numpy(), p))
        assert math.isclose(self_calibrated_threshold(cos, fg, p), want, rel_tol=1e-12)
    # by hand: fg {0.9, 0.8, 0.5}, bg {0.1, 0.6}: q5(fg) = 0.5 + 0.1 * 0.3 = 0.53, q95(bg) = 0.1 + 0.95 * 0.5 = 0.575
    c = torch.tensor([[0.9, 0.8, 0.5, 0.1, 0.6]], dtype=torch.float64)
    f = torch.tensor([[True, True, True, False, False]])
    assert math.isclose(self_calibrated_threshold(c, f, 5.0), 0.575)
    assert math.isclose(self_calibrated_threshold(c[:, :3], f[:, :3], 5.0), 0.53)  # no background


# ---------------------------------------------------------------------------------- query localisation
def test_connected_components_are_8_connected_like_flood_fill() -> None:
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        m = torch.rand(7, 9, generator=g) > 0.6
        labels, n = connected_components(m)
        got = [{(int(a), int(b)) for a, b in torch.nonzero(labels == k)} for k in range(1, n + 1)]
        assert sorted(map(sorted, got)) == sorted(map(sorted, _components_ref(m)))
    diag = torch.eye(3, dtype=torch.bool)
    assert connected_components(diag)[1] == 1  # diagonal neighbours are connected


def test_best_component_matches_a_loop_and_localize_falls_back_to_the_argmax() -> None:
    g = torch.Generator().manual_seed(5)
    f = torch.randn(6, 5, 5, generator=g)
    proto = _unit(torch.randn(6, generator=g).double())
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[0, 0:2] = m[3:5, 3] = m[2, 0] = True  # three components: {(0,0),(0,1)}, {(2,0)}, {(3,3),(4,3)}
    best, score = best_component(f, m, proto)
    scores = []
    for comp in _components_ref(m):
        mean = sum(_unit(f[:, a, b].double()) for a, b in comp)
        scores.append((float(_unit(mean) @ proto), comp))
    want_score, want_comp = max(scores, key=lambda t: t[0])
    assert len(scores) == 3 and math.isclose(score, want_score, rel_tol=1e-12)
    assert {(int(a), int(b)) for a, b in torch.nonzero(best)} == want_comp
    # a threshold nobody reaches: only the arg-max patch, scored by its own cosine
    loc, s = localize(f, proto, tau=2.0)
    cos = patch_cosine(f, proto)
    assert int(loc.sum()) == 1 and bool(loc.flatten()[cos.argmax()])
    assert math.isclose(s, float(cos.max()), rel_tol=1e-12)
    loc_all, _ = localize(f, proto, tau=-2.0)  # every patch passes: one component, the whole grid
    assert bool(loc_all.all())


# ---------------------------------------------------------------------------------------------- metrics
def test_average_precision_equals_sklearns_definition_with_ties() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(6)
    for _ in range(20):
        y = rng.random(30) > 0.6
        y[0] = True
        s = np.round(rng.random(30), 1)  # many ties
        assert math.isclose(average_precision(torch.tensor(s), torch.tensor(y)), average_precision_score(y, s),
                            rel_tol=1e-12)
    # by hand: pos 0.9, neg 0.8, pos 0.7 -> (1 + 2/3) / 2
    assert math.isclose(average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True])), 5 / 6)
    assert math.isnan(average_precision(torch.tensor([0.1]), torch.tensor([False])))


def test_mask_and_box_iou() -> None:
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    a[0:2, 0:2] = True
    b[1:3, 1:3] = True
    assert mask_iou(a, b) == 1 / 7
    assert mask_iou(a, a) == 1.0
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == 1 / 7
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_search_metrics_hand_case() -> None:
    # 2 supports; queries: two of class 0, one of class 1, one negative
    logits = torch.tensor([[0.9, 0.1], [0.4, 0.5], [0.2, 0.8], [0.6, 0.3]])
    labels = torch.tensor([0, 0, 1, -1])
    ious = torch.tensor([0.5, 0.3, 0.8, 0.0])
    m = search_metrics(logits, labels, ious, ious)
    # accuracy: class 0 -> 1/2, class 1 -> 1
    assert math.isclose(m["accuracy"], 0.75)
    # AP class 0: scores .9(p) .6(n) .4(p) .2(n) -> (1 + 2/3)/2; class 1: .8(p) first -> 1
    assert math.isclose(m["ap"], (5 / 6 + 1.0) / 2)
    assert m["miou"] == pytest.approx((0.4 + 0.8) / 2) and m["classes"] == 2 and m["positives"] == 3


# ----------------------------------------------------------------------------------------------- extractors
def test_mobilenet_patch_grids_at_stride_16_and_32() -> None:
    torch.manual_seed(0)
    net = MobileNetV2().train()  # the extractor puts it in eval mode, and keeps it there
    x = torch.randint(0, 256, (2, 3, 100, 80), dtype=torch.uint8)
    e16 = mobilenet_v2_patches(16, 64, model=net)
    e32 = mobilenet_v2_patches(32, 64, model=net)
    assert e16(x).shape == (2, 96, 4, 4) and e16.grid == (4, 4)
    e16.train()
    assert not any(m.training for c in net.features.children() for m in c.modules())
    assert e32(x).shape == (2, 1280, 2, 2)
    with torch.no_grad():  # the stride-32 grid is the trunk's last feature map (in eval mode)
        torch.testing.assert_close(e32(x), net.features(prepare_images(x, 64)))
    with pytest.raises(ConfigError, match="stride"):
        mobilenet_v2_patches(4, 64, model=net)
    with pytest.raises(ConfigError, match="multiple"):
        mobilenet_v2_patches(16, 100, model=net)


def test_vit_patch_tokens_as_a_grid() -> None:
    torch.manual_seed(0)
    vit = ViT((32, 32), 3, 10, patch_size=8, dim=16, depth=1, heads=2).eval()
    ext = vit_patches(vit, 32)
    x = torch.rand(2, 3, 32, 32)
    grid = ext(x)
    assert grid.shape == (2, 16, 4, 4)
    # patch (r, c) of the grid is token 1 + r * 4 + c of the ViT's final normalized sequence
    with torch.no_grad():
        z = prepare_images(x, 32)
        t = vit.patch_embed(z).flatten(2).transpose(1, 2)
        h = torch.cat([vit.cls_token.expand(2, -1, -1), t], 1) + vit.pos_emb
        for blk in vit.blocks:
            h = blk(h)
        h = vit.norm(h)
    torch.testing.assert_close(grid[:, :, 2, 3], h[:, 1 + 2 * 4 + 3])
    with pytest.raises(ConfigError, match="position"):
        vit_patches(vit, 48)


class _FakeHFViT(torch.nn.Module):
    """A Hugging Face-like ViT: ``config.patch_size``, two register tokens, ``last_hidden_state`` output."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(patch_size=8, num_register_tokens=2)
        self.embed = torch.nn.Conv2d(3, 5, 8, 8)

    def forward(self, pixel_values: torch.Tensor) -> object:
        from types import SimpleNamespace

        t = self.embed(pixel_values).flatten(2).transpose(1, 2)  # (B, N, 5)
        prefix = torch.full((t.shape[0], 3, 5), 99.0)  # class + 2 register tokens
        return SimpleNamespace(last_hidden_state=torch.cat([prefix, t], 1))


def test_hf_vit_patches_drop_class_and_register_tokens() -> None:
    torch.manual_seed(0)
    model = _FakeHFViT()
    ext = hf_vit_patches(model, image_size=32)
    assert ext.prefix == 3 and ext.grid == (4, 4)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model.embed(prepare_images(x, 32))
    torch.testing.assert_close(ext(x), want)


# ----------------------------------------------------------------------------------------- end to end
def _texture(kind: int, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    if kind == 0:  # red/blue checkerboard
        on = ((yy // 4 + xx // 4) % 2 == 0)[..., None]
        return np.where(on, [220, 30, 30], [30, 30, 220]).astype(np.uint8)
    if kind == 1:  # green/white stripes
        on = ((xx // 3) % 2 == 0)[..., None]
        return np.where(on, [30, 200, 40], [250, 250, 250]).astype(np.uint8)
    on = (((yy % 8) - 4) ** 2 + ((xx % 8) - 4) ** 2 < 6)[..., None]  # black dots on yellow
    return np.where(on, [0, 0, 0], [240, 220, 20]).astype(np.uint8)


def _scene(kind: int | None, top: int, left: int, seed: int, side: int = 32, size: int = 96
           ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)  # grey noise
    mask = np.zeros((size, size), dtype=bool)
    if kind is not None:
        img[top:top + side, left:left + side] = _texture(kind, side)
        mask[top:top + side, left:left + side] = True
    return img, mask


@pytest.fixture(scope="module")
def vit_extractor() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_patches(ViT((96, 96), 3, 10, patch_size=8, dim=32, depth=2, heads=4).eval(), 96)


def test_search_finds_and_identifies_synthetic_objects(vit_extractor: torch.nn.Module) -> None:
    search = PersonalObjectSearch(vit_extractor, SearchConfig(kmeans_k=3))
    for k in range(3):
        img, mask = _scene(k, 8 + 16 * k, 16, seed=k)
        if k == 2:
            ys, xs = np.nonzero(mask)
            search.add(f"obj{k}", img, box=(xs.min() - 4, ys.min() - 4, xs.max() + 5, ys.max() + 5))
        else:
            search.add(f"obj{k}", img, mask=mask)
    assert search.names == ["obj0", "obj1", "obj2"]
    logits, labels, ious = [], [], []
    for k in range(3):
        for j, (top, left) in enumerate(((56, 56), (8, 64))):
            img, mask = _scene(k, top, left, seed=100 + 10 * k + j)
            hits = {h.name: h for h in search.search(img)}
            logits.append([hits[f"obj{i}"].score for i in range(3)])
            labels.append(k)
            h = hits[f"obj{k}"]
            ious.append(mask_iou(h.mask, mask_to_grid(torch.tensor(mask), (12, 12), 0.5)))
            assert box_iou(h.box, (left, top, left + 32, top + 32)) > 0.4
            assert search.identify(img).name == f"obj{k}"
    for j in range(2):  # negatives: noise only
        img, _ = _scene(None, 0, 0, seed=200 + j)
        logits.append([h.score for h in sorted(search.search(img), key=lambda h: h.name)])
        labels.append(-1)
    m = search_metrics(torch.tensor(logits), torch.tensor(labels), torch.tensor(ious + [0, 0]))
    assert m["accuracy"] == 1.0 and m["ap"] > 0.9, m
    assert m["miou"] > 0.5, m


def test_a_broken_prototype_fails_the_same_check(vit_extractor: torch.nn.Module) -> None:
    """The end-to-end thresholds above are not vacuous: a prototype taken from the background fails them."""
    search = PersonalObjectSearch(vit_extractor)
    img, mask = _scene(0, 8, 16, seed=0)
    search.add("obj0", img, mask=~mask)  # the complement: background noise
    q, qmask = _scene(0, 56, 56, seed=100)
    h = search.search(q)[0]
    assert mask_iou(h.mask, mask_to_grid(torch.tensor(qmask), (12, 12), 0.5)) < 0.2


def test_bad_input_is_refused_with_the_fix(vit_extractor: torch.nn.Module) -> None:
    search = PersonalObjectSearch(vit_extractor)
    img, mask = _scene(0, 8, 16, seed=0)
    with pytest.raises(ConfigError, match="no personal object added"):
        search.search(img)
    with pytest.raises(ShapeError, match="mask is empty"):
        search.add("a", img, mask=np.zeros_like(mask))
    with pytest.raises(ShapeError, match=r"mask has shape \(10, 10\)"):
        search.add("a", img, mask=np.ones((10, 10), dtype=bool))
    with pytest.raises(ShapeError, match="outside"):
        search.add("a", img, box=(200, 200, 300, 300))
    with pytest.raises(ShapeError, match="empty"):
        search.add("a", img, box=(10, 10, 5, 20))
    with pytest.raises(ConfigError, match="exactly one"):
        search.add("a", img)
    with pytest.raises(ShapeError, match=r"\(H, W, 3\)"):
        search.add("a", img[..., :2], mask=mask)
    search.add("a", img, mask=mask)
    with pytest.raises(ConfigError, match="already added"):
        search.add("a", img, mask=mask)
    with pytest.raises(ConfigError, match="kmeans_k"):
        PersonalObjectSearch(vit_extractor, kmeans_k=0)
    search.remove("a")
    assert len(search) == 0
    with pytest.raises(ConfigError, match="no personal object 'a'"):
        search.remove("a")


def test_features_are_unit_invariant() -> None:
    """Scaling every patch feature leaves the answer unchanged (everything is cosine)."""
    g = torch.Generator().manual_seed(7)
    f = torch.randn(6, 5, 5, generator=g)
    proto = prototype(f, torch.ones(5, 5, dtype=torch.bool) & (torch.rand(5, 5, generator=g) > 0.5))
    a, sa = localize(f, proto, 0.2)
    b, sb = localize(3.0 * f * torch.rand(1, 5, 5, generator=g).add(0.5), proto, 0.2)
    assert torch.equal(a, b) and math.isclose(sa, sb, rel_tol=1e-6)
    assert F.normalize(proto, dim=0).norm().item() == pytest.approx(1.0)


def test_box_split_none_takes_every_patch_the_box_touches(vit_extractor: torch.nn.Module) -> None:
    img, _ = _scene(1, 16, 24, seed=3)
    whole = PersonalObjectSearch(vit_extractor, box_split="none").add("x", img, box=(20, 12, 60, 52))
    want = torch.zeros(12, 12, dtype=torch.bool)
    want[1:7, 2:8] = True  # rows 12/8 .. 52/8 -> 1..7, cols 20/8 .. 60/8 -> 2..8
    assert torch.equal(whole.mask, want)
    split = PersonalObjectSearch(vit_extractor, kmeans_k=3).add("x", img, box=(20, 12, 60, 52))
    assert not (split.mask & ~want).any()  # the k-means split stays inside the box
