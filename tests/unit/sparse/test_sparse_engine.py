"""sparsify_ and SparseEngine: selection, exact densities, update invariants, determinism, resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.config import validate
from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.hooks import Callback, TrainState
from edgetune.models.mlp import MLP
from edgetune.sparse import SparseConfig, SparseEngine, SparseLinear, sparse_layers, sparsify_
from edgetune.sparse.regrowth import ch_hard_regrowth, gradient_regrowth, random_regrowth, regrow
from edgetune.sparse.topology import link_count
from edgetune.train.config import TrainConfig
from edgetune.train.loop import Trainer


def mlp(widths=(48, 48, 48), seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(20, 5, list(widths), "relu", False, 0.0)


def cfg(**kw) -> SparseConfig:
    return SparseConfig(**{"method": "chts", "density": 0.2, **kw})


def test_sparsify_replaces_hidden_layers_keeps_head_dense_with_exact_counts():
    m = sparsify_(mlp(), cfg())
    names = [n for n, _ in sparse_layers(m)]
    assert names == ["layers.0", "layers.1", "layers.2"]
    assert isinstance(m.head, nn.Linear)
    for _, layer in sparse_layers(m):
        assert layer.nnz() == link_count(layer.out_features, layer.in_features, 0.2)
    std = m.layers[1].values.std().item()
    assert std == pytest.approx(math.sqrt(2 / (0.2 * 48)), rel=0.2)  # SWI on fan-in


def test_sparsify_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no nn.Linear layer matches"):
        sparsify_(mlp(), cfg(include=["nothing*"]))
    with pytest.raises(ConfigError, match="layers.0.*too small"):
        sparsify_(mlp(), cfg(density=0.001))
    with pytest.raises(ConfigError, match="density"):
        validate(SparseConfig, {"density": 1.5})
    with pytest.raises(ConfigError, match="density"):
        validate(SparseConfig, {"density": 0})
    with pytest.raises(ConfigError, match='unknown sparse method.*Did you mean "rigl"'):
        validate(SparseConfig, {"method": "rigll"})


def state_for(model, opt, steps_per_epoch=10, total=100) -> TrainState:
    return TrainState(
        model=model,
        optimizer=opt,
        device=torch.device("cpu"),
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
    )


def train_steps(model, opt, engine, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = state_for(model, opt)
    engine.on_fit_start(st)
    for _ in range(n):
        x = torch.randn(16, 20, generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        st.skip_step = False
        engine.before_optimizer_step(st)
        if not st.skip_step:
            opt.step()
        engine.after_optimizer_step(st)
        st.step += 1
    return st


# the update invariants and seeded determinism of every method and rule: test_strategies.py (loops the registries)


def test_chtss_decays_density_to_target_by_the_stop():
    c = cfg(method="chtss", density=0.1, update_interval=5, update_unit="steps")
    assert c.resolved().initial_density == pytest.approx(0.5)
    model = sparsify_(mlp(), c)
    engine = SparseEngine(model, c)
    assert model.layers[0].density == pytest.approx(0.5, abs=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_steps(model, opt, engine, 100)
    densities = [l.density for _, l in sparse_layers(model)]
    assert densities == pytest.approx([0.1] * 3, abs=0.002)


def test_regrowth_rules_exact_count_never_on_live_links_and_fallback():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(30, 40, generator=g) < 0.1
    for rule in ("random", "ch_hard", "ch_soft"):
        new = regrow(rule, mask, 50, torch.Generator().manual_seed(1))
        assert int(new.sum()) == 50 and not bool((new & mask).any())
    grad = torch.zeros(30, 40)
    grad[0, :5] = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0])
    m = torch.zeros(30, 40, dtype=torch.bool)
    m[0, 2] = True  # a live link with a big gradient must not be "regrown"
    new = gradient_regrowth(grad, m, 3, torch.Generator().manual_seed(0))
    assert new[0, 0] and new[0, 1] and new[0, 3] and int(new.sum()) == 3
    new = gradient_regrowth(grad, m, 10, torch.Generator().manual_seed(0))  # 4 scored + 6 uniform
    assert int(new.sum()) == 10 and not bool((new & m).any())
    scores = torch.zeros(30, 40)
    new = ch_hard_regrowth(scores, m, 7, torch.Generator().manual_seed(0))
    assert int(new.sum()) == 7  # no positive score at all: uniform fallback, still exact
    with pytest.raises(ConfigError, match="dense gradient"):
        gradient_regrowth(None, m, 3, torch.Generator())
    with pytest.raises(ConfigError, match="free positions"):
        random_regrowth(torch.ones(3, 3, dtype=torch.bool), 1, torch.Generator())


def test_rigl_regrows_where_the_dense_gradient_is_largest():
    c = cfg(method="rigl", update_interval=1, update_unit="steps", zeta=0.3, seed=0)
    model = sparsify_(mlp(), c)
    engine = SparseEngine(model, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    st = state_for(model, opt)
    engine.on_fit_start(st)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    # reference dense gradient of layers.1 through an equivalent dense model
    w = [l.to_dense_weight().clone().requires_grad_(True) for _, l in sparse_layers(model)]
    h = torch.relu(x @ w[0].T + model.layers[0].bias)
    h = torch.relu(h @ w[1].T + model.layers[1].bias)
    h = torch.relu(h @ w[2].T + model.layers[2].bias)
    nn.functional.cross_entropy(model.head(h), y).backward()
    ref = w[1].grad.abs()
    mask0 = model.layers[1].mask().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    engine.update(1, opt)
    new = model.layers[1].mask() & ~mask0
    k = int(new.sum())
    assert k > 0
    cand = ref.clone()
    cand[mask0] = -1
    top = torch.zeros_like(mask0).view(-1)
    top[cand.view(-1).topk(k).indices] = True
    # regrown among non-links of the post-removal mask: the new ones are the top-|grad| non-links
    assert torch.equal(new.view(-1), top)


def blobs(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(5, 20, generator=g)[y] * 2 + torch.randn(n, 20, generator=g)
    return TensorDataset(x, y)


def tcfg(**kw):
    return validate(
        TrainConfig,
        {
            "epochs": 4,
            "batch_size": 20,
            "progress": False,
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_steps": 7, "keep_last": 50},
            **kw,
        },
    )


def test_resume_restores_masks_and_schedule_state(tmp_path):
    c = cfg(method="chts", update_interval=5, update_unit="steps", seed=3)

    def trainer(run_dir, extra=()):
        model = sparsify_(mlp(), c)
        return Trainer(
            model,
            blobs(),
            tcfg(),
            test=blobs(50, 1),
            callbacks=[SparseEngine(model, c), *extra],
            run_dir=run_dir,
            seed=0,
        )

    ref = trainer(tmp_path / "a", [Callback()])
    ref.fit()

    class Crash(Callback):
        def after_optimizer_step(self, s):
            if s.step == 23:
                raise RuntimeError("crash")

    t = trainer(tmp_path / "b", [Crash()])
    with pytest.raises(RuntimeError):
        t.fit()
    again = trainer(tmp_path / "b", [Callback()])
    assert again.resume() and again.state.step == 21
    again.fit()
    for (n, a), (_, b) in zip(sparse_layers(ref.model), sparse_layers(again.model)):
        assert torch.equal(a.indices, b.indices), n
        assert torch.equal(a.values, b.values), n
    assert again.callbacks[0].updates == ref.callbacks[0].updates

    other = SparseConfig(method="chts", density=0.3, update_interval=5, update_unit="steps", seed=3)
    model = sparsify_(mlp(), other)
    wrong = Trainer(
        model, blobs(), tcfg(), callbacks=[SparseEngine(model, other), Callback()], run_dir=tmp_path / "b"
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="density"):
        wrong.resume()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint must not half-load"


def test_sparse_layer_counts_in_measurements():
    from edgetune.measure import count_nonzeros

    m = sparsify_(mlp(), cfg())
    n = sum(l.nnz() for _, l in sparse_layers(m))
    dense_rest = sum(p.numel() for name, p in m.named_parameters() if not name.endswith("values"))
    assert count_nonzeros(m) <= n + dense_rest
    assert all(isinstance(l, SparseLinear) for _, l in sparse_layers(m))


def test_batch_of_one_does_not_touch_the_bias():
    """Regression: the CSR kernel once accumulated a batch-1 product into the bias itself."""
    torch.manual_seed(0)
    for backend in ("csr", "gather", "dense"):
        layer = SparseLinear.from_dense(nn.Linear(8, 4), torch.rand(4, 8) < 0.5, backend=backend)
        bias = layer.bias.detach().clone()
        x = torch.randn(1, 8)
        y1 = layer(x)
        y2 = layer(x)
        assert torch.equal(layer.bias.detach(), bias), backend
        assert torch.allclose(y1, y2) and torch.allclose(y1, x @ layer.to_dense_weight().T + bias, atol=1e-6)
