"""MEST removal: |w| + lambda*|g| against a naive reference, hand cases, the engine's gradient, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import TrainState
from edgetune.models.mlp import MLP
from edgetune.sparse import SparseConfig, SparseEngine, sparse_layers, sparsify_
from edgetune.sparse.removal import magnitude_removal
from edgetune.sparse.rules.mest import MestOptions, mest_removal
from edgetune.sparse.strategies import REMOVALS, RuleContext


def ctx(grad, lam=0.01, layer="fc"):
    return RuleContext(
        layer=layer, step=4, generator=torch.Generator(), grad=grad, options=MestOptions(**{"lambda": lam})
    )


def naive(w, g, m, k, lam):
    active = [(abs(w[a, b].item()) + lam * abs(g[a, b].item()), a, b) for a, b in m.nonzero().tolist()]
    out = torch.zeros_like(m)
    for _, a, b in sorted(active)[:k]:
        out[a, b] = True
    return out


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.5, 3.0])
def test_matches_the_naive_score_order(lam):
    g0 = torch.Generator().manual_seed(0)
    for trial in range(4):
        w = torch.randn(9, 7, generator=g0, dtype=torch.float64)
        g = torch.randn(9, 7, generator=g0, dtype=torch.float64) * 10
        m = torch.rand(9, 7, generator=g0) < 0.5
        k = int(m.sum()) // 3
        assert torch.equal(mest_removal(w, m, k, ctx(g, lam)), naive(w, g, m, k, lam)), (lam, trial)


def test_a_small_weight_with_a_large_gradient_is_kept_and_lambda_0_is_magnitude():
    w = torch.tensor([[0.10, 0.20, 0.30, 0.40]])
    g = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    assert mest_removal(w, m, 1, ctx(g, 0.1)).tolist() == [[False, True, False, False]]  # 0.1 + 0.5 > 0.2
    assert torch.equal(mest_removal(w, m, 1, ctx(g, 0.0)), magnitude_removal(w, m, 1))
    assert REMOVALS.get("mest").needs_gradients


def test_engine_scores_with_the_dense_gradient_of_the_update_batch():
    c = SparseConfig(
        method="set",
        removal="mest",
        removal_options={"lambda": 2.0},
        density=0.2,
        update_interval=1,
        update_unit="steps",
        zeta=0.3,
        seed=0,
    )
    torch.manual_seed(0)
    model = sparsify_(MLP(20, 5, [48, 48], "relu", False, 0.0), c)
    engine = SparseEngine(model, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine.on_fit_start(
        TrainState(
            model=model, optimizer=opt, device=torch.device("cpu"), total_steps=100, steps_per_epoch=10
        )
    )
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    # reference dense gradient of layers.1 through an equivalent dense model
    w = [l.to_dense_weight().clone().requires_grad_(True) for _, l in sparse_layers(model)]
    h = torch.relu(x @ w[0].T + model.layers[0].bias)
    h = torch.relu(h @ w[1].T + model.layers[1].bias)
    nn.functional.cross_entropy(model.head(h), y).backward()
    mask0 = model.layers[1].mask().clone()
    w1 = w[1].detach()
    nn.functional.cross_entropy(model(x), y).backward()
    removed = {}

    def spy(weight, mask, k, rule_ctx):
        removed[rule_ctx.layer] = out = mest_removal(weight, mask, k, rule_ctx)
        return out

    engine.removal = dataclasses.replace(engine.removal, fn=spy)
    engine.update(1, opt)
    gone = removed["layers.1"]
    k = int(gone.sum())
    assert k == int(0.3 * int(mask0.sum()))
    ref = naive(w1.double(), w[1].grad.double(), mask0, k, 2.0)
    assert torch.equal(gone, ref)
    assert not torch.equal(ref, naive(w1.double(), w[1].grad.double(), mask0, k, 0.0)), "lambda had no effect"


def test_bad_input_names_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"removal_options.lambda=-0.5.*must be a finite number >= 0.*0.01"):
        validate(SparseConfig, {"method": "set", "removal": "mest", "removal_options": {"lambda": -0.5}})
    with pytest.raises(
        ConfigError, match=r"removal_options.lamda is not a parameter of removal 'mest'.*lambda"
    ):
        validate(SparseConfig, {"method": "set", "removal": "mest", "removal_options": {"lamda": 0.1}})
    with pytest.raises(
        ConfigError, match=r"removal_options.lambda is not a parameter of removal 'magnitude'"
    ):
        validate(SparseConfig, {"method": "set", "removal_options": {"lambda": 0.1}})
    m = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ConfigError, match=r"'layers.3': mest removal at step 4 found no dense gradient"):
        mest_removal(torch.ones(2, 2), m, 1, ctx(None, layer="layers.3"))
    c = SparseConfig(method="set", removal="mest", density=0.25)
    torch.manual_seed(0)
    model = sparsify_(MLP(20, 5, [48, 48], "relu", False, 0.0), c)
    engine = SparseEngine(model, c)
    engine.on_fit_start(
        TrainState(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            device=torch.device("cpu"),
            total_steps=100,
            steps_per_epoch=10,
        )
    )
    with pytest.raises(ConfigError, match=r"'layers.0': mest removal at step 5 found no dense gradient"):
        engine.update(5)
