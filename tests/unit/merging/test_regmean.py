"""RegMean (Jin et al. 2023): on one linear layer the merge is the least-squares fit of every model's outputs on
its own inputs (against numpy's lstsq), alpha = 0 is the per-column Gram-weighted average, Grams are X^T X of each
Linear's (..., in) inputs, and the errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.errors import ConfigError
from edgetune.merging import merge
from edgetune.merging.config import MERGERS
from edgetune.merging.data_aware import merge_with_data
from edgetune.merging.regmean import (
    Gram,
    check_grams_cover,
    gram_matrices,
    linear_weight_keys,
    regmean_merge,
    regmean_weight,
)


def _models(n: int, out: int = 3, inp: int = 5, bias: bool = False) -> list[nn.Linear]:
    return [nn.Linear(inp, out, bias=bias) for _ in range(n)]


def _lstsq(xs: list[torch.Tensor], ws: list[torch.Tensor], row_scale: list[float]) -> np.ndarray:
    """argmin_W sum_i s_i^2 ||X_i W^T - X_i W_i^T||^2 by numpy's lstsq on the stacked, scaled rows."""
    a = np.concatenate([s * x.double().numpy() for x, s in zip(xs, row_scale, strict=True)])
    b = np.concatenate([s * (x @ w.T).double().numpy() for x, w, s in zip(xs, ws, row_scale, strict=True)])
    return np.linalg.lstsq(a, b, rcond=None)[0].T  # (out, in)


def test_alpha_1_is_the_joint_least_squares_fit() -> None:
    models = _models(3)
    xs = [torch.randn(40, 5) + i for i in range(3)]
    grams = [gram_matrices(m, x, batch_size=16) for m, x in zip(models, xs, strict=True)]
    assert all(g["weight"].count == 40 for g in grams)
    out = regmean_merge([m.state_dict() for m in models], grams, alpha=1.0)
    ref = _lstsq(xs, [m.weight.detach() for m in models], [1.0] * 3)
    np.testing.assert_allclose(out["weight"].double().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_unequal_counts_weigh_each_model_once() -> None:
    """Each model's Gram is its mean over its rows: lstsq with each model's rows scaled by 1/sqrt(n_i)."""
    models = _models(2)
    xs = [torch.randn(30, 5), 2 * torch.randn(90, 5)]
    grams = [gram_matrices(m, x) for m, x in zip(models, xs, strict=True)]
    out = regmean_merge([m.state_dict() for m in models], grams, alpha=1.0, weights=[1.0, 3.0])
    ref = _lstsq(xs, [m.weight.detach() for m in models], [1 / 30 ** 0.5, (3 / 90) ** 0.5])
    np.testing.assert_allclose(out["weight"].double().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_alpha_0_is_the_column_wise_gram_weighted_average() -> None:
    ws = [torch.randn(3, 4) for _ in range(2)]
    gs = [torch.randn(10, 4).T @ torch.randn(10, 4) for _ in range(2)]
    gs = [g @ g.T + torch.eye(4) for g in gs]  # PSD, non-diagonal
    out = regmean_weight(ws, gs, alpha=0.0)
    d = [torch.diagonal(g) for g in gs]  # (in,)
    ref = (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the same Gram for every model: the plain average whatever alpha
    same = regmean_weight(ws, [gs[0], gs[0]], alpha=0.7)
    torch.testing.assert_close(same, (ws[0] + ws[1]) / 2, rtol=1e-5, atol=1e-5)


def test_hand_computed_one_input() -> None:
    """in = 1: W = sum_i g_i W_i / sum_i g_i."""
    out = regmean_weight([torch.tensor([[1.0]]), torch.tensor([[4.0]])], [torch.tensor([[1.0]]), torch.tensor([[2.0]])])
    assert out.item() == pytest.approx((1 + 2 * 4) / 3)


def test_grams_of_sequence_inputs_nested_names_and_bias_averaged() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 2)))
    x = torch.randn(3, 7, 4)  # (B, T, in)
    grams = gram_matrices(net, x, batch_size=2)
    assert set(grams) == {"0.weight", "2.0.weight"} == set(linear_weight_keys(net))
    rows = x.reshape(-1, 4).double()
    torch.testing.assert_close(grams["0.weight"].sum, rows.T @ rows)
    assert grams["0.weight"].count == 21 and grams["2.0.weight"].sum.shape == (6, 6)
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 2)))
    out = regmean_merge([net.state_dict(), other.state_dict()], [grams, gram_matrices(other, x)])
    torch.testing.assert_close(out["0.bias"], (net[0].bias + other[0].bias).detach() / 2)
    assert out["0.weight"].dtype == torch.float32


def test_singular_gram_takes_the_average_where_no_input_reaches() -> None:
    models = _models(2, inp=4)
    x = torch.randn(20, 4)
    x[:, 2] = 0  # a dead input: column 2 of W is unconstrained
    grams = [gram_matrices(m, x) for m in models]
    out = regmean_merge([m.state_dict() for m in models], grams, alpha=1.0)["weight"]
    assert torch.isfinite(out).all()
    avg = (models[0].weight + models[1].weight).detach() / 2
    torch.testing.assert_close(out[:, 2], avg[:, 2], rtol=1e-4, atol=1e-5)
    zero = regmean_weight([m.weight.detach() for m in models], [torch.zeros(4, 4)] * 2)
    torch.testing.assert_close(zero, avg)


def test_unreached_layer_is_averaged(caplog: pytest.LogCaptureFixture) -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    nets = [TwoHeads() for _ in range(2)]
    with caplog.at_level(logging.WARNING):
        grams = [gram_matrices(n, torch.randn(5, 3)) for n in nets]
    assert grams[0]["unused.weight"].count == 0 and "never reached" in caplog.text
    out = regmean_merge([n.state_dict() for n in nets], grams)
    torch.testing.assert_close(out["unused.weight"], (nets[0].unused.weight + nets[1].unused.weight).detach() / 2)


def test_merge_with_data_per_model() -> None:
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).state_dict() for _ in range(2)]
    sets = [TensorDataset(torch.randn(12, 4), torch.zeros(12, dtype=torch.long)) for _ in range(2)]
    got = merge_with_data({"method": "regmean", "alpha": 0.5}, module, models, None, sets, per_model=True)
    grams = []
    for sd, d in zip(models, sets, strict=True):
        module.load_state_dict(sd)
        grams.append(gram_matrices(module, d))
    ref = regmean_merge(models, grams, alpha=0.5)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v)


def test_registered_but_data_aware() -> None:
    assert MERGERS.get("regmean").data_aware
    sd = nn.Linear(2, 2).state_dict()
    with pytest.raises(ConfigError, match="data-aware.*regmean_merge"):
        merge([sd, sd], {"method": "regmean"})
    with pytest.raises(ConfigError, match="alpha"):
        merge([sd, sd], {"method": "regmean", "alpha": 1.5})


def test_errors() -> None:
    models = _models(2)
    sds = [m.state_dict() for m in models]
    g = {"weight": Gram(torch.eye(5, dtype=torch.float64), 1)}
    with pytest.raises(ConfigError, match="no Gram for the linear layer 'weight' in model 1"):
        regmean_merge(sds, [g, {}])
    with pytest.raises(ConfigError, match="alpha"):
        regmean_merge(sds, [g, g], alpha=2.0)
    with pytest.raises(ConfigError, match="one dict of Grams"):
        regmean_merge(sds, [g])
    with pytest.raises(ConfigError, match="empty"):
        regmean_merge(sds, [{}, {}])
    with pytest.raises(ConfigError, match="expected \\(5, 5\\)"):
        regmean_merge(sds, [g, {"weight": torch.eye(3)}])
    with pytest.raises(ConfigError, match="not a linear weight"):
        regmean_merge([{**sd, "v": torch.ones(5)} for sd in sds], [{**g, "v": torch.eye(5)}] * 2)
    with pytest.raises(ConfigError, match="shapes differ"):
        regmean_merge([sds[0], nn.Linear(4, 3, bias=False).state_dict()], [g, g])
    with pytest.raises(ConfigError, match="no Gram for the linear layer 'weight' in model 0"):
        check_grams_cover(models[0], [{}])
    with pytest.raises(ConfigError, match="no nn.Linear"):
        gram_matrices(nn.Conv1d(2, 2, 1), torch.randn(2, 2, 3))
    with pytest.raises(ConfigError, match="no RegMean data"):
        gram_matrices(models[0], None)
    with pytest.raises(ConfigError, match="holds no example"):
        gram_matrices(models[0], torch.zeros(0, 5))
    with pytest.raises(ConfigError, match="n_batches"):
        gram_matrices(models[0], torch.zeros(2, 5), n_batches=0)
