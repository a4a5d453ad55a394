"""LoRA merging in factor space: concat / linear equal the weighted sum of the updates exactly, SVD at full rank is
exact and at rank k is the truncated-SVD optimum (Eckart-Young) with its error reported right; merged adapters
saved as PEFT folders load back on the base with the merged update; bad inputs raise ConfigError."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from edgetune.adapters import (
    LoraConfig,
    adapter_layers,
    adapter_names,
    add_adapter_,
    load_adapter_,
    save_adapter,
)
from edgetune.core.errors import ConfigError
from edgetune.merging.lora_merge import (
    LayerLora,
    add_lora_,
    lora_concat,
    lora_from_model,
    lora_linear,
    lora_svd,
    read_loras,
    save_lora,
)

SHAPES = {"enc": (7, 5), "dec": (4, 7)}  # path -> (out, in)


def _lora(rank: int, seed: int, scale: float = 0.5) -> dict[str, LayerLora]:
    g = torch.Generator().manual_seed(seed)
    return {p: LayerLora(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), scale)
            for p, (o, i) in SHAPES.items()}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))


def _trained_adapters(model: nn.Module, names: list[str]) -> None:
    for i, n in enumerate(names):
        add_adapter_(model, LoraConfig(rank=2 + i, alpha=3.0, targets=["0", "2"]), name=n, seed=i)
        for _, lay in adapter_layers(model):
            nn.init.normal_(lay.adapters[n].lora_B, generator=torch.Generator().manual_seed(10 + i))


def test_concat_equals_weighted_sum_exactly() -> None:
    a, b, c = _lora(2, 0), _lora(3, 1, scale=2.0), _lora(1, 2, scale=0.25)
    w = [0.3, -1.2, 2.0]
    out = lora_concat([a, b, c], w)
    for p in SHAPES:
        ref = sum(wi * ad[p].scale * (ad[p].b @ ad[p].a) for wi, ad in zip(w, (a, b, c), strict=True))
        assert out[p].rank == 6
        assert out[p].scale == 1.0
        torch.testing.assert_close(out[p].delta(), ref, rtol=1e-6, atol=1e-6)
    # default weights: the plain sum; lora_linear: the average
    for p in SHAPES:
        torch.testing.assert_close(lora_concat([a, b])[p].delta(), a[p].delta() + b[p].delta(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lora_linear([a, b])[p].delta(), (a[p].delta() + b[p].delta()) / 2, rtol=1e-6,
                                   atol=1e-6)


def test_hand_computed_concat() -> None:
    a = {"l": LayerLora(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0]]), 2.0)}
    b = {"l": LayerLora(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [3.0]]), 1.0)}
    out = lora_concat([a, b])["l"]
    torch.testing.assert_close(out.delta(), torch.tensor([[2.0, 4.0], [0.0, 3.0]]))


def test_svd_full_rank_is_exact() -> None:
    a, b = _lora(2, 0), _lora(2, 1)
    res = lora_svd([a, b], rank=4)
    for p in SHAPES:
        torch.testing.assert_close(res.lora[p].delta(), a[p].delta() + b[p].delta(), rtol=1e-5, atol=1e-5)
        assert res.errors[p] < 1e-6
    assert res.error < 1e-6


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_svd_is_the_eckart_young_optimum(rank: int) -> None:
    a, b = _lora(2, 0), _lora(3, 1)
    w = [0.7, 0.4]
    res = lora_svd([a, b], w, rank=rank)
    lost = kept = 0.0
    for p in SHAPES:
        dense = (0.7 * a[p].delta() + 0.4 * b[p].delta()).double()
        u, s, vh = torch.linalg.svd(dense)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert res.lora[p].rank == rank
        torch.testing.assert_close(res.lora[p].delta().double(), best, rtol=1e-4, atol=1e-4)
        err = float(torch.linalg.matrix_norm(dense - best) / torch.linalg.matrix_norm(dense))
        assert res.errors[p] == pytest.approx(err, rel=1e-5, abs=1e-7)
        lost += float(torch.linalg.matrix_norm(dense - best)) ** 2
        kept += float(torch.linalg.matrix_norm(dense)) ** 2
        # sqrt(S) on each side: both factors carry the same singular values
        torch.testing.assert_close(torch.linalg.svdvals(res.lora[p].a.double()),
                                   torch.linalg.svdvals(res.lora[p].b.double()), rtol=1e-4, atol=1e-5)
    assert res.error == pytest.approx(math.sqrt(lost / kept), rel=1e-5)


def test_svd_rank_above_the_sum_pads_with_zeros() -> None:
    a = _lora(1, 0)
    res = lora_svd([a, a], rank=3)  # update of rank 1, asked for rank 3
    for p in SHAPES:
        assert res.lora[p].rank == 3
        torch.testing.assert_close(res.lora[p].delta(), 2 * a[p].delta(), rtol=1e-5, atol=1e-5)


def test_read_from_model_and_folder(tmp_path: Path) -> None:
    model = _model()
    _trained_adapters(model, ["a", "b"])
    save_adapter(model, tmp_path / "b", "b")
    from_model = read_loras(model, ["a", "b"])
    from_folder = read_loras(model, [tmp_path / "b"])[0]
    assert adapter_names(model) == ["a", "b"]  # the folder's adapter was taken off again
    for p, lay in from_model[1].items():
        torch.testing.assert_close(from_folder[p].delta(), lay.delta())
    for p, lay in from_model[0].items():
        ad = dict(adapter_layers(model))[p].adapters["a"]
        torch.testing.assert_close(lay.delta(), ad.delta_weight().detach())


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_saved_merge_loads_back_with_the_merged_delta(tmp_path: Path, method: str) -> None:
    model = _model()
    _trained_adapters(model, ["a", "b"])
    loras = read_loras(model, ["a", "b"])
    merged = lora_concat(loras, [0.5, 2.0]) if method == "concat" else lora_svd(loras, rank=3).lora
    base = _model()  # the same base weights, no adapters
    save_lora(base, merged, tmp_path / "merged")
    assert adapter_names(base) == [] and not adapter_layers(base)  # left as it was
    load_adapter_(base, tmp_path / "merged", "m")
    got = lora_from_model(base, "m")
    assert set(got) == set(merged)
    for p, lay in merged.items():
        torch.testing.assert_close(got[p].delta(), lay.delta(), rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 6)
    ref = _model()
    with torch.no_grad():
        ref[0].weight += merged["0"].delta()
        ref[2].weight += merged["2"].delta()
        torch.testing.assert_close(base(x), ref(x), rtol=1e-5, atol=1e-5)


def test_ranks_differing_per_layer_save_through_rank_pattern(tmp_path: Path) -> None:
    model = _model()
    _trained_adapters(model, ["a"])
    lay = lora_from_model(model, "a")
    merged = {"0": lay["0"], "2": LayerLora(lay["2"].a[:1], lay["2"].b[:, :1], 0.7)}
    add_lora_(model, merged, "mixed")
    got = lora_from_model(model, "mixed")
    assert got["0"].rank == 2 and got["2"].rank == 1
    save_lora(_model(), merged, tmp_path / "m")
    back = _model()
    load_adapter_(back, tmp_path / "m", "m")
    got = lora_from_model(back, "m")
    for p, lay in merged.items():
        torch.testing.assert_close(got[p].delta(), lay.delta())


# ------------------------------------------------------------------------------------------ bad inputs
def test_different_layers_name_the_first_difference() -> None:
    a, b = _lora(2, 0), _lora(2, 1)
    del b["dec"]
    with pytest.raises(ConfigError, match="adapter 0 adapts 'dec', adapter 1 does not"):
        lora_concat([a, b])
    b = {**_lora(2, 1), "extra": a["enc"]}
    with pytest.raises(ConfigError, match="adapter 1 adapts 'extra'"):
        lora_svd([a, b], rank=1)


def test_different_base_shapes_named() -> None:
    a, b = _lora(2, 0), _lora(2, 1)
    b["enc"] = LayerLora(torch.randn(2, 6), torch.randn(7, 2))
    with pytest.raises(ConfigError, match="layer 'enc' has another base shape in adapter 1"):
        lora_linear([a, b])


@pytest.mark.parametrize("rank", [0, -1, 6, 2.5])
def test_bad_rank(rank: object) -> None:
    a, b = _lora(2, 0), _lora(2, 1)
    with pytest.raises(ConfigError, match="rank"):
        lora_svd([a, b], rank=rank)  # type: ignore[arg-type]


def test_rank_above_min_names_the_layer() -> None:
    with pytest.raises(ConfigError, match=r"above what layer 'enc' allows \(min\(out, in\) = 5"):
        lora_svd([_lora(2, 0), _lora(2, 1)], rank=6)


def test_weights_count_and_value() -> None:
    a, b = _lora(2, 0), _lora(2, 1)
    with pytest.raises(ConfigError, match="weights has 3 entries for 2 adapters"):
        lora_concat([a, b], [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="finite"):
        lora_linear([a, b], [1.0, float("nan")])


def test_no_adapters_or_bad_sources() -> None:
    with pytest.raises(ConfigError, match="non-empty list"):
        lora_concat([])
    with pytest.raises(ConfigError, match="neither an adapter of the model"):
        read_loras(_model(), ["nope"])


def test_merged_lora_must_fit_the_model() -> None:
    with pytest.raises(ConfigError, match="not an adaptable layer"):
        add_lora_(_model(), _lora(2, 0))
    bad = {"0": LayerLora(torch.randn(2, 5), torch.randn(8, 2))}
    model = _model()
    with pytest.raises(ConfigError, match="do not fit this model's layer"):
        add_lora_(model, bad)
    assert not adapter_layers(model)


def test_concat_above_the_layers_rank_is_refactorised_exactly(tmp_path: Path) -> None:
    model = _model()  # layer "2": 8 -> 5, so at most rank 5
    _trained_adapters(model, ["a", "b"])  # ranks 2 and 3
    loras = read_loras(model, ["a", "b"])
    merged = lora_concat([*loras, loras[1]])  # rank 8 on both layers
    assert merged["2"].rank == 8
    save_lora(_model(), merged, tmp_path / "m")
    back = _model()
    load_adapter_(back, tmp_path / "m", "m")
    got = lora_from_model(back, "m")
    assert got["2"].rank == 5 and got["0"].rank == 6
    for p in merged:
        torch.testing.assert_close(got[p].delta(), merged[p].delta(), rtol=1e-5, atol=1e-5)
