"""ZipLoRA: the objective equals a naive per-sample loop, identical adapters are kept, learnt coefficients beat the
plain sum, disjoint inputs give complementary coefficients, the merged factors are exact, captured input statistics
match a naive capture, and the merged adapter saves and loads back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgetune.adapters import LoraConfig, adapter_layers, add_adapter_, load_adapter_, set_active_adapters_
from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.merging.lora_merge import LayerLora, lora_from_model, save_lora
from edgetune.merging.ziplora import (
    ZipLoraConfig,
    layer_grams,
    pair_objective,
    zip_factors,
    ziplora,
    ziplora_objective,
)

SHAPES = {"enc": (9, 6), "dec": (5, 9)}


def _lora(seed: int, rank: int = 2) -> dict[str, LayerLora]:
    g = torch.Generator().manual_seed(seed)
    return {p: LayerLora(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), 0.5)
            for p, (o, i) in SHAPES.items()}


def test_objective_equals_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    out, n = 4, 3
    w0 = torch.randn(out, n, generator=g)
    d1, d2 = torch.randn(out, n, generator=g), torch.randn(out, n, generator=g)
    m1, m2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    xs = [torch.randn(10, n, generator=g), torch.randn(7, n, generator=g) * torch.tensor([1.0, 0.1, 2.0])]
    merged = [[d1[o][j] * m1[j] + d2[o][j] * m2[j] for j in range(n)] for o in range(out)]
    ref = 0.0
    for x, d in zip(xs, (d1, d2), strict=True):
        err = own = 0.0
        for row in x:
            for o in range(out):
                y_merged = sum((w0[o][j] + merged[o][j]) * row[j] for j in range(n))
                y_own = sum((w0[o][j] + d[o][j]) * row[j] for j in range(n))
                err += float(y_merged - y_own) ** 2
                own += float(sum(d[o][j] * row[j] for j in range(n))) ** 2
        ref += err / own
    dot = float(sum(m1[j] * m2[j] for j in range(n)))
    cos = dot / float(m1.norm() * m2.norm())
    ref += 0.3 * abs(cos)
    grams = [x.T @ x / x.shape[0] for x in xs]
    got = ziplora_objective(d1, d2, m1, m2, *grams, cos_weight=0.3)
    assert float(got) == pytest.approx(ref, rel=1e-4)
    # batched: one value per layer
    batch = ziplora_objective(*(torch.stack([t, t]) for t in (d1, d2, m1, m2, *grams)), cos_weight=0.3)
    torch.testing.assert_close(batch, torch.stack([got, got]))


def test_zip_factors_are_exact() -> None:
    a, b = _lora(0), _lora(1, rank=3)
    m1, m2 = torch.randn(6), torch.randn(6)
    out = zip_factors(a["enc"], b["enc"], m1, m2)
    assert out.rank == 5
    torch.testing.assert_close(out.delta(), a["enc"].delta() @ torch.diag(m1) + b["enc"].delta() @ torch.diag(m2))


def test_identical_adapters_are_kept() -> None:
    a = _lora(0)
    res = ziplora([a, a], cfg=ZipLoraConfig(steps=150))
    for p, lay in a.items():
        rel = (res.lora[p].delta() - lay.delta()).norm() / lay.delta().norm()
        assert float(rel) < 1e-3


def test_learnt_coefficients_reduce_the_objective() -> None:
    a, b = _lora(0), _lora(1)
    cfg = ZipLoraConfig(steps=150)
    res = ziplora([a, b], cfg=cfg)
    assert res.objective_after < 0.8 * res.objective_before
    assert res.objective_before == pytest.approx(pair_objective([a, b], None, cfg=cfg))
    assert res.objective_after == pytest.approx(pair_objective([a, b], res.coefficients, cfg=cfg))
    assert res.seconds > 0
    for p, (m1, m2) in res.coefficients.items():
        torch.testing.assert_close(res.lora[p].delta(), a[p].delta() * m1 + b[p].delta() * m2)


def test_disjoint_inputs_give_complementary_columns() -> None:
    a, b = _lora(0), _lora(1)
    on, off = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    ga = {"enc": torch.diag(on + 1e-3), "dec": torch.eye(9)}
    gb = {"enc": torch.diag(off + 1e-3), "dec": torch.eye(9)}
    res = ziplora([a, b], [ga, gb], ZipLoraConfig(steps=300))
    m1, m2 = res.coefficients["enc"]
    torch.testing.assert_close(m1[:3], torch.ones(3), atol=0.05, rtol=0)
    torch.testing.assert_close(m2[3:], torch.ones(3), atol=0.05, rtol=0)
    assert float(m1[3:].abs().max()) < 0.1 and float(m2[:3].abs().max()) < 0.1
    assert res.objective_after < 0.5 * res.objective_before


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))


def _with_adapters() -> nn.Module:
    model = _model()
    for i, n in enumerate(["a", "b"]):
        add_adapter_(model, LoraConfig(rank=2, alpha=2.0, targets=["0", "2"]), name=n, seed=i)
        for _, lay in adapter_layers(model):
            nn.init.normal_(lay.adapters[n].lora_B, generator=torch.Generator().manual_seed(10 + i))
    return model


def test_layer_grams_match_a_naive_capture() -> None:
    model = _with_adapters()
    set_active_adapters_(model, ["a", "b"])
    x = torch.randn(11, 6)
    grams = layer_grams(model, "b", [x[:5], (x[5:], None)])
    assert [lay.active for _, lay in adapter_layers(model)] == [["a", "b"], ["a", "b"]]  # restored
    torch.testing.assert_close(grams["0"], x.T @ x / 11)
    set_active_adapters_(model, ["b"])
    with torch.no_grad():
        h = torch.relu(model[0](x))
    torch.testing.assert_close(grams["2"], h.T @ h / 11, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        layer_grams(model, "c", [x])
    with pytest.raises(ConfigError, match="no input reached"):
        layer_grams(model, "a", [])


def test_ziplora_on_captured_inputs_saves_and_loads(tmp_path: Path) -> None:
    model = _with_adapters()
    xa, xb = torch.randn(32, 6) * torch.tensor([1.0, 1, 1, 0.1, 0.1, 0.1]), torch.randn(32, 6)
    grams = (layer_grams(model, "a", [xa]), layer_grams(model, "b", [xb]))
    pair = (lora_from_model(model, "a"), lora_from_model(model, "b"))
    res = ziplora(pair, grams, ZipLoraConfig(steps=100))
    assert res.objective_after < res.objective_before
    save_lora(_model(), res.lora, tmp_path / "zip")
    back = _model()
    load_adapter_(back, tmp_path / "zip", "zip")
    for p, lay in lora_from_model(back, "zip").items():
        torch.testing.assert_close(lay.delta(), res.lora[p].delta(), rtol=1e-6, atol=1e-6)


def test_bad_inputs() -> None:
    a, b = _lora(0), _lora(1)
    with pytest.raises(ConfigError, match="pair"):
        ziplora([a, b, a])
    with pytest.raises(ConfigError, match="lack layer 'dec'"):
        ziplora([a, b], [{"enc": torch.eye(6)}, {"enc": torch.eye(6), "dec": torch.eye(9)}])
    with pytest.raises(ConfigError, match="Gram matrix of adapter 1 at 'enc'"):
        ziplora([a, b], [{"enc": torch.eye(6), "dec": torch.eye(9)}, {"enc": torch.eye(5), "dec": torch.eye(9)}])
    b["dec"] = LayerLora(torch.randn(2, 8), torch.randn(5, 2))
    with pytest.raises(ConfigError, match="another base shape"):
        ziplora([a, b])
    with pytest.raises(ConfigError, match="steps"):
        validate(ZipLoraConfig, {"steps": 0})
