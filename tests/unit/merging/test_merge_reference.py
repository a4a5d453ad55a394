"""Each merge method equals a naive per-element Python loop on tiny tensors (3 models of shape (4, 5) and (5,)),
plus a TIES case computed by hand; TIES's trim, sign election and disjoint mean are checked one by one."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from edgetune.merging import merge
from edgetune.merging.dare import dare_generator
from edgetune.merging.ties import top_magnitude_mask, trim

KEYS = {"layer.weight": (4, 5), "layer.bias": (5,)}
Vec = list[float]


def _models(n: int = 3, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in KEYS.items()}
    models = [{k: base[k] + 0.5 * torch.randn(s, generator=g) for k, s in KEYS.items()} for _ in range(n)]
    return models, base


def _flat(t: torch.Tensor) -> Vec:
    return [float(v) for v in t.flatten()]


def _check(out: dict[str, torch.Tensor], ref: dict[str, Vec]) -> None:
    for k, shape in KEYS.items():
        assert out[k].shape == shape
        torch.testing.assert_close(out[k], torch.tensor(ref[k]).view(shape), rtol=1e-5, atol=1e-5, msg=k)


def _weights(w: Vec | None, n: int) -> Vec:
    return list(w) if w is not None else [1.0] * n


def _count(fraction: float, n: int) -> int:
    return min(n, int(fraction * n + 0.5))


def _order(tau: Vec) -> list[int]:
    """Entries by decreasing magnitude, ties by index (Python's sort is stable)."""
    return sorted(range(len(tau)), key=lambda j: -abs(tau[j]))


# ------------------------------------------------------------------------------------------ naive references
def ref_trim(tau: Vec, density: float) -> Vec:
    if density >= 1:
        return list(tau)
    keep = set(_order(tau)[: max(1, _count(density, len(tau)))])
    return [v if j in keep else 0.0 for j, v in enumerate(tau)]


def ref_sign(v: float) -> int:
    return (v > 0) - (v < 0)


def ref_elect_mean(base: Vec, taus: list[Vec], w: Vec, scaling: float, elect: bool, disjoint: bool) -> Vec:
    out = []
    for j in range(len(base)):
        weighted = [w[i] * taus[i][j] for i in range(len(taus))]
        if elect:
            gamma = ref_sign(sum(weighted))
            agree = [i for i in range(len(taus)) if gamma != 0 and ref_sign(weighted[i]) == gamma]
        else:
            agree = [i for i in range(len(taus)) if weighted[i] != 0] if disjoint else list(range(len(taus)))
        total = sum(weighted[i] for i in agree)
        if disjoint:
            div = sum(abs(w[i]) for i in agree)
            total = total / div if div != 0 else total
        out.append(base[j] + scaling * total)
    return out


def ref_ties(xs: list[Vec], base: Vec, w: Vec, scaling: float, density: float, elect: bool, disjoint: bool) -> Vec:
    taus = [ref_trim([a - b for a, b in zip(x, base)], density) for x in xs]
    return ref_elect_mean(base, taus, w, scaling, elect, disjoint)


def ref_task_arithmetic(xs: list[Vec], base: Vec, w: Vec, scaling: float) -> Vec:
    return [base[j] + scaling * sum(w[i] * (xs[i][j] - base[j]) for i in range(len(xs))) for j in range(len(base))]


def ref_breadcrumbs(xs: list[Vec], base: Vec, w: Vec, scaling: float, density: float, beta: float) -> Vec:
    taus = []
    for x in xs:
        tau = [a - b for a, b in zip(x, base)]
        n = len(tau)
        n_out = _count(beta, n)
        n_keep = min(max(1, _count(density, n)), n - n_out)
        keep = set(_order(tau)[n_out: n_out + n_keep])
        taus.append([v if j in keep else 0.0 for j, v in enumerate(tau)])
    return [base[j] + scaling * sum(w[i] * taus[i][j] for i in range(len(xs))) for j in range(len(base))]


def ref_model_stock(xs: list[Vec], base: Vec) -> Vec:
    n = len(xs)
    if n == 1:
        return list(xs[0])
    taus = [[a - b for a, b in zip(x, base)] for x in xs]
    cosines = []
    for i in range(n):
        for k in range(i + 1, n):
            dot = sum(a * b for a, b in zip(taus[i], taus[k]))
            den = math.sqrt(sum(a * a for a in taus[i])) * math.sqrt(sum(b * b for b in taus[k]))
            cosines.append(dot / den if den > 0 else 0.0)
    cos = min(1.0, max(0.0, sum(cosines) / len(cosines)))
    t = n * cos / (1 + (n - 1) * cos)
    return [t * sum(x[j] for x in xs) / n + (1 - t) * base[j] for j in range(len(base))]


def _per_key(models, base, fn) -> dict[str, Vec]:
    return {k: fn(k, [_flat(m[k]) for m in models], _flat(base[k])) for k in KEYS}


# ------------------------------------------------------------------------------------------ methods vs references
@pytest.mark.parametrize("weights,normalize", [(None, True), ([1.0, 2.0, 3.0], True), ([0.5, -1.0, 2.0], False)])
def test_linear(weights: Vec | None, normalize: bool) -> None:
    models, base = _models()
    out = merge(models, {"method": "linear", "weights": weights, "normalize": normalize})
    w = [1.0 / 3] * 3 if weights is None else weights
    if normalize:
        w = [x / sum(w) for x in w]
    _check(out, _per_key(models, base, lambda k, xs, b: [sum(w[i] * xs[i][j] for i in range(3)) for j in range(len(b))]))


@pytest.mark.parametrize("weights,scaling", [(None, 1.0), ([0.5, -1.0, 2.0], 0.4)])
def test_task_arithmetic(weights: Vec | None, scaling: float) -> None:
    models, base = _models()
    out = merge(models, {"method": "task_arithmetic", "weights": weights, "scaling": scaling}, base=base)
    _check(out, _per_key(models, base, lambda k, xs, b: ref_task_arithmetic(xs, b, _weights(weights, 3), scaling)))


@pytest.mark.parametrize("elect,disjoint", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights,scaling", [(None, 1.0), ([0.5, -1.0, 2.0], 0.7)])
def test_ties(density: float, elect: bool, disjoint: bool, weights: Vec | None, scaling: float) -> None:
    models, base = _models()
    cfg = {"method": "ties", "density": density, "elect_sign": elect, "disjoint_mean": disjoint, "weights": weights,
           "scaling": scaling}
    out = merge(models, cfg, base=base)
    _check(out, _per_key(models, base,
                         lambda k, xs, b: ref_ties(xs, b, _weights(weights, 3), scaling, density, elect, disjoint)))


def test_ties_by_hand() -> None:
    """density 0.4 of 5 entries keeps 2 per task vector; see the comments for each step."""
    base = torch.ones(5)
    taus = [torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0]),   # trimmed: [3, 0, 0, 2, 0]
            torch.tensor([-2.0, -4.0, 1.0, 0.1, 0.0]),  # trimmed: [-2, -4, 0, 0, 0]
            torch.tensor([4.0, 0.2, -3.0, 0.3, 5.0])]   # trimmed: [4, 0, 0, 0, 5]
    # sum of trimmed [5, -4, 0, 2, 5] -> signs [+, -, 0, +, +]; disjoint mean [(3 + 4) / 2, -4, 0, 2, 5]
    out = merge([{"w": base + t} for t in taus], {"method": "ties", "density": 0.4}, base={"w": base})
    torch.testing.assert_close(out["w"], torch.tensor([4.5, -3.0, 1.0, 3.0, 6.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.45, 0.5, 0.99, 1.0])
def test_ties_trim_element_by_element(density: float) -> None:
    tau = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    got = trim(tau, density)
    want = ref_trim(_flat(tau), density)
    assert _flat(got) == want
    assert sum(v != 0 for v in _flat(got)) == max(1, _count(density, 20))


def test_top_magnitude_ties_go_to_the_lower_index() -> None:
    x = torch.tensor([1.0, -1.0, 0.5, 1.0, -2.0])
    assert top_magnitude_mask(x, 2).tolist() == [True, False, False, False, True]
    assert top_magnitude_mask(x, 3).tolist() == [True, True, False, False, True]
    assert top_magnitude_mask(x, 0).sum() == 0 and top_magnitude_mask(x, 9).all()


def test_ties_elect_and_disjoint_mean_element_by_element() -> None:
    """Each entry of the merge is the weighted mean of exactly the models agreeing with the elected sign."""
    models, base = _models(seed=5)
    w = [1.0, 2.0, 0.5]
    out = merge(models, {"method": "ties", "density": 0.5, "weights": w}, base=base)["layer.weight"].flatten()
    b = _flat(base["layer.weight"])
    taus = [ref_trim([a - c for a, c in zip(_flat(m["layer.weight"]), b)], 0.5) for m in models]
    for j in range(len(b)):
        mass = sum(w[i] * taus[i][j] for i in range(3))
        agree = [i for i in range(3) if taus[i][j] != 0 and (taus[i][j] > 0) == (mass > 0)]
        want = sum(w[i] * taus[i][j] for i in agree) / sum(w[i] for i in agree) if agree else 0.0
        assert abs(float(out[j]) - (b[j] + want)) < 1e-5, f"entry {j}: agreeing models {agree}"


def _dare_taus(k: str, xs: list[Vec], b: Vec, seed: int, density: float) -> list[Vec]:
    shape = KEYS[k]
    taus = []
    for i, x in enumerate(xs):
        r = _flat(torch.rand(shape, generator=dare_generator(seed, k, i)))
        taus.append([(a - c) / density if r[j] < density else 0.0 for j, (a, c) in enumerate(zip(x, b))])
    return taus


@pytest.mark.parametrize("combine", ["sum", "ties"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare(density: float, combine: str) -> None:
    models, base = _models()
    w, seed = [0.5, 1.0, 2.0], 11
    out = merge(models, {"method": "dare", "density": density, "combine": combine, "weights": w, "seed": seed,
                         "scaling": 0.8}, base=base)

    def ref(k: str, xs: list[Vec], b: Vec) -> Vec:
        taus = _dare_taus(k, xs, b, seed, density)
        return ref_elect_mean(b, taus, w, 0.8, elect=combine == "ties", disjoint=combine == "ties")

    _check(out, _per_key(models, base, ref))


@pytest.mark.parametrize("density,beta", [(0.9, 0.01), (0.5, 0.1), (0.3, 0.25), (1.0, 0.0), (0.05, 0.0)])
def test_breadcrumbs(density: float, beta: float) -> None:
    models, base = _models()
    w = [1.0, -0.5, 2.0]
    out = merge(models, {"method": "breadcrumbs", "density": density, "beta": beta, "weights": w, "scaling": 0.6},
                base=base)
    _check(out, _per_key(models, base, lambda k, xs, b: ref_breadcrumbs(xs, b, w, 0.6, density, beta)))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock(n: int) -> None:
    models, base = _models(n)
    out = merge(models, {"method": "model_stock"}, base=base)
    _check(out, _per_key(models, base, lambda k, xs, b: ref_model_stock(xs, b)))


def test_model_stock_guards(caplog: pytest.LogCaptureFixture) -> None:
    base = {"w": torch.zeros(4)}
    up, down = {"w": torch.tensor([1.0, 2.0, 0.0, 0.0])}, {"w": torch.tensor([-1.0, -2.0, 0.0, 0.1])}
    # opposite fine-tunes (cos < 0): t = 0, the base
    torch.testing.assert_close(merge([up, down], {"method": "model_stock"}, base=base)["w"], base["w"])
    # a model that did not move: its pairs count cos 0, so cos = 1/3 over the three pairs, t = 3 * (1/3) / (1 + 2/3)
    out = merge([up, up, base], {"method": "model_stock"}, base=base)["w"]
    t = 1.0 / (5.0 / 3.0)
    torch.testing.assert_close(out, t * (2 * up["w"] / 3), rtol=1e-6, atol=1e-6)
    # all task vectors zero: the base
    torch.testing.assert_close(merge([base, base], {"method": "model_stock"}, base=base)["w"], base["w"])
    # one model: that model, with one warning per merge
    with caplog.at_level(logging.WARNING, logger="edgetune.merging.model_stock"):
        two = {"a": up["w"], "b": down["w"]}
        out1 = merge([two], {"method": "model_stock"}, base={"a": torch.zeros(4), "b": torch.zeros(4)})
    assert torch.equal(out1["a"], up["w"]) and torch.equal(out1["b"], down["w"])
    assert sum("at least 2" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------ slices of rows
def _whole_tensor_merge(cfg: dict, xs: list[torch.Tensor], base: torch.Tensor, name: str) -> torch.Tensor:
    """The pre-slicing maths: every step on whole tensors (trim / masks / drops of the whole task vector)."""
    from edgetune.merging.breadcrumbs import breadcrumbs_mask
    from edgetune.merging.dare import dare_drop
    from edgetune.merging.task_arithmetic import add_task_vectors
    from edgetune.merging.ties import elect_and_mean

    taus = [x - base for x in xs]
    w = [1.0] * len(xs) if cfg.get("weights") is None else cfg["weights"]
    method, scaling = cfg["method"], cfg.get("scaling", 1.0)
    if method == "task_arithmetic":
        return add_task_vectors(base, taus, w, scaling)
    if method == "ties":
        return elect_and_mean(base, [trim(t, cfg["density"]) for t in taus], w, scaling)
    if method == "breadcrumbs":
        masks = [breadcrumbs_mask(t, cfg["density"], cfg["beta"]) for t in taus]
        return add_task_vectors(base, [t if m is None else t * m for t, m in zip(taus, masks)], w, scaling)
    dropped = [dare_drop(t, cfg["density"], dare_generator(cfg.get("seed", 0), name, i)) for i, t in enumerate(taus)]
    if cfg.get("combine") == "ties":
        return elect_and_mean(base, dropped, w, scaling)
    return add_task_vectors(base, dropped, w, scaling)


@pytest.mark.parametrize("cfg", [
    {"method": "task_arithmetic", "scaling": 0.4, "weights": [0.5, -1.0, 2.0]},
    {"method": "ties", "density": 0.2, "scaling": 1.0},
    {"method": "ties", "density": 0.5, "scaling": 0.7, "weights": [0.5, -1.0, 2.0]},
    {"method": "breadcrumbs", "density": 0.6, "beta": 0.1, "scaling": 0.5},
    {"method": "dare", "density": 0.3, "scaling": 0.5, "seed": 3},
    {"method": "dare", "density": 0.5, "combine": "ties", "seed": 1},
])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10**9])
def test_slices_of_rows_equal_the_whole_tensor_merge(cfg: dict, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merging a tensor slice by slice (here slices of ``chunk`` entries) gives bit for bit the whole-tensor result,
    with many equal magnitudes (values on a coarse grid) so that the tie-breaking by flat index crosses slices."""
    from edgetune.merging import task_arithmetic

    monkeypatch.setattr(task_arithmetic, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    for shape in [(23, 9), (40,), (6, 3, 5), ()]:
        base = torch.randn(shape, generator=g)
        xs = [base + torch.randint(-3, 4, shape, generator=g).float() * 0.25 for _ in range(3)]
        out = merge([{"t": x} for x in xs], cfg, base={"t": base})["t"]
        ref = _whole_tensor_merge(cfg, xs, base, "t")
        assert out.shape == base.shape
        assert torch.equal(out, ref), (cfg, chunk, shape, (out - ref).abs().max())


def test_magnitude_cuts_keep_what_the_whole_tensor_mask_keeps() -> None:
    from edgetune.merging.task_arithmetic import row_chunks
    from edgetune.merging.ties import magnitude_cuts

    g = torch.Generator().manual_seed(1)
    x = torch.randint(-4, 5, (37, 11), generator=g).double()  # many ties
    for k in (0, 1, 50, 200, 406, 407):
        (cut,) = magnitude_cuts(x.abs(), [k])  # the scratch copy is reordered, x is not
        seen, parts = 0, []
        for sl in row_chunks(x.shape, 30):
            keep, ties = cut.mask(x[sl].abs(), seen)
            seen += ties
            parts.append(keep)
        assert torch.equal(torch.cat(parts), top_magnitude_mask(x, k)), k
        assert int(torch.cat(parts).sum()) == min(k, x.numel())
