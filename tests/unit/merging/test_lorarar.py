"""LoRA.rar: the hypernetwork's forward (shapes, determinism, order equivariance, the plain sum untrained), training
lowers the held-out ZipLoRA objective below the plain sum (and, where the weights carry the signal, below the
average), save/load round trip, merged adapters load back, and the benchmark runs end to end at toy sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgetune.adapters import LoraConfig, add_adapter_, load_adapter_
from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.merging.bench.lora import lora_merge_bench
from edgetune.merging.lora_merge import LayerLora, lora_from_model, save_lora
from edgetune.merging.lorarar import (
    FEATURES,
    STAT_FEATURES,
    LoraPair,
    LoraRarConfig,
    LoraRarNet,
    column_features,
    load_lorarar,
    lorarar_merge,
    predict_coefficients,
    save_lorarar,
    train_lorarar,
)
from edgetune.merging.ziplora import ZipLoraConfig, pair_objective

OUT, IN, RANK = 8, 12, 2


def _pair(g: torch.Generator, informative: bool) -> LoraPair:
    """Two LoRAs on one (OUT, IN) layer; ``informative``: each adapter's inputs live on its own random half of the
    features, and its update's other columns are small (as when A has moved far from its initialisation)."""
    loras, grams = [], []
    for _ in range(2):
        a, b = torch.randn(RANK, IN, generator=g), torch.randn(OUT, RANK, generator=g)
        energy = torch.ones(IN)
        if informative:
            used = torch.randperm(IN, generator=g)[: IN // 2]
            mask = torch.full((IN,), 0.05)
            mask[used] = 1.0
            a, energy = a * mask, mask.square()
        loras.append({"l": LayerLora(a, b, float(torch.rand((), generator=g)) + 0.5)})
        grams.append({"l": torch.diag(energy)})
    return LoraPair(loras[0], loras[1], (grams[0], grams[1]) if informative else None)


def _objective(net: LoraRarNet | None, pairs: list[LoraPair], average: bool = False) -> float:
    total = 0.0
    for p in pairs:
        two = (p.first, p.second)
        coefs = {"l": (torch.full((IN,), 0.5),) * 2} if average else (
            None if net is None else predict_coefficients(net, two, p.grams))
        total += pair_objective(two, coefs, p.grams, ZipLoraConfig())
    return total / len(pairs)


def test_forward_shapes_determinism_and_symmetry() -> None:
    torch.manual_seed(0)
    net = LoraRarNet(hidden=8, depth=2)
    d1, d2 = torch.randn(OUT, IN), torch.randn(OUT, IN)
    assert column_features(d1, d2).shape == (IN, 2, len(FEATURES))
    g = torch.eye(IN)
    assert column_features(d1, d2, g, g).shape == (IN, 2, len(FEATURES) + len(STAT_FEATURES))
    m1, m2 = net.coefficients(d1, d2)
    assert m1.shape == m2.shape == (IN,)
    torch.testing.assert_close(m1, torch.ones(IN))  # untrained: the plain sum
    torch.testing.assert_close(m2, torch.ones(IN))
    for p in net.parameters():
        nn.init.normal_(p, generator=torch.Generator().manual_seed(1))
    m1, m2 = net.coefficients(d1, d2)
    again = net.coefficients(d1, d2)
    torch.testing.assert_close(again[0], m1, rtol=0, atol=0)
    s1, s2 = net.coefficients(d2, d1)  # swapping the adapters swaps the coefficients
    torch.testing.assert_close(s1, m2)
    torch.testing.assert_close(s2, m1)
    t1, _ = net.coefficients(3.0 * d1, 3.0 * d2)  # a common scale changes nothing
    torch.testing.assert_close(t1, m1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("informative", [False, True])
def test_training_beats_the_plain_sum_on_held_out_pairs(informative: bool) -> None:
    g = torch.Generator().manual_seed(0)
    train = [_pair(g, informative) for _ in range(40)]
    held = [_pair(g, informative) for _ in range(10)]
    net = train_lorarar(train, LoraRarConfig(steps=150, lr=1e-2, hidden=16), held_out=held)
    got, plain, avg = _objective(net, held), _objective(None, held), _objective(None, held, average=True)
    assert got < 0.7 * plain
    if informative:  # the weights say which columns each adapter's inputs use
        assert got < 0.7 * avg
    else:
        assert got < 1.05 * avg


def test_input_stats_network_needs_and_uses_grams() -> None:
    g = torch.Generator().manual_seed(1)
    train = [_pair(g, True) for _ in range(40)]
    held = [_pair(g, True) for _ in range(10)]
    net = train_lorarar(train, LoraRarConfig(steps=150, lr=1e-2, hidden=16, input_stats=True))
    assert _objective(net, held) < 0.7 * _objective(None, held, average=True)
    with pytest.raises(ConfigError, match="input statistics"):
        predict_coefficients(net, (held[0].first, held[0].second))
    diag = tuple({"l": gr["l"].diagonal()} for gr in held[0].grams)  # a diagonal is enough
    full = predict_coefficients(net, (held[0].first, held[0].second), held[0].grams)
    torch.testing.assert_close(predict_coefficients(net, (held[0].first, held[0].second), diag)["l"][0], full["l"][0])


@pytest.mark.parametrize("stats", [False, True])
def test_save_load_round_trip(tmp_path: Path, stats: bool) -> None:
    g = torch.Generator().manual_seed(2)
    pairs = [_pair(g, True) for _ in range(6)]
    cfg = LoraRarConfig(steps=5, hidden=6, depth=3, input_stats=stats)
    net = train_lorarar(pairs, cfg)
    files = save_lorarar(net, tmp_path / "h", cfg)
    assert sorted(f.name for f in files) == ["lorarar.json", "lorarar.safetensors"]
    conf = json.loads((tmp_path / "h" / "lorarar.json").read_text())
    assert conf["config"]["hidden"] == 6 and conf["config"]["depth"] == 3 and conf["config"]["input_stats"] == stats
    back = load_lorarar(tmp_path / "h")
    two = (pairs[0].first, pairs[0].second)
    a, b = predict_coefficients(net, two, pairs[0].grams), predict_coefficients(back, two, pairs[0].grams)
    torch.testing.assert_close(a["l"][0], b["l"][0], rtol=0, atol=0)
    torch.testing.assert_close(a["l"][1], b["l"][1], rtol=0, atol=0)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lacks lorarar.json"):
        load_lorarar(tmp_path)
    save_lorarar(LoraRarNet(4, 1), tmp_path / "h")
    conf = json.loads((tmp_path / "h" / "lorarar.json").read_text())
    conf["features"] = ["other"]
    (tmp_path / "h" / "lorarar.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="not a LoRA.rar network"):
        load_lorarar(tmp_path / "h")
    conf["features"], conf["config"]["hidden"] = list(FEATURES), 5
    (tmp_path / "h" / "lorarar.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="does not hold this network's tensors"):
        load_lorarar(tmp_path / "h")


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="at least one training pair"):
        train_lorarar([])
    a = {"l": LayerLora(torch.randn(2, IN), torch.randn(OUT, 2))}
    with pytest.raises(ConfigError, match="pair"):
        predict_coefficients(LoraRarNet(4, 1), (a,))


def test_merged_pair_loads_back_on_the_base(tmp_path: Path) -> None:
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))

    m = model()
    for i, n in enumerate(["a", "b"]):
        add_adapter_(m, LoraConfig(rank=2, targets=["0", "2"], init_a="gaussian"), name=n, seed=i)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad and p.abs().sum() == 0:
                    p.normal_(generator=torch.Generator().manual_seed(i))
    pair = (lora_from_model(m, "a"), lora_from_model(m, "b"))
    net = LoraRarNet(4, 1)
    merged = lorarar_merge(net, pair)
    for p in pair[0]:  # untrained: the plain sum
        torch.testing.assert_close(merged[p].delta(), pair[0][p].delta() + pair[1][p].delta(), rtol=1e-5, atol=1e-6)
    save_lora(model(), merged, tmp_path / "rar")
    back = model()
    load_adapter_(back, tmp_path / "rar", "rar")
    for p, lay in lora_from_model(back, "rar").items():
        torch.testing.assert_close(lay.delta(), merged[p].delta(), rtol=1e-6, atol=1e-6)


def test_bench_runs_at_toy_sizes() -> None:
    rows = lora_merge_bench(train_tasks=4, test_tasks=3, train_pairs=5, test_pairs=2, d_in=8, widths=(8,), classes=3,
                            rank=2, active=3, n_train=64, n_test=64, lora_steps=15,
                            zip_cfg=ZipLoraConfig(steps=10), rar_cfg=LoraRarConfig(steps=10, hidden=4))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"base", "own", "linear", "concat", "svd", "ziplora", "ziplora_gaussian", "lorarar",
                       "lorarar_stats"}
    assert by["base"]["rel_error"] == pytest.approx(1.0) and by["own"]["rel_error"] == 0.0
    assert all(r["seconds"] > 0 for r in rows if r["method"] not in ("base", "own"))
    assert by["ziplora"]["pairs"] == 2
