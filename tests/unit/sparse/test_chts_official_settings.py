"""Settings of the official CHT/CHTs MLP code: CSTI tiled over every layer, SWI on out-degree, EM_S's fixed
regrowth (percolation_refund=False). Naive references on tiny tensors and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.core.hooks import TrainState
from edgetune.models.mlp import MLP
from edgetune.sparse import SparseConfig, SparseEngine, sparse_layers, sparsify_
from edgetune.sparse.rules.csti_tiled import tiled_correlated_topology, tiled_scores
from edgetune.sparse.rules.swi_out import swi_out_init
from edgetune.sparse.topology import input_correlation, link_count


def _naive_corr(x: torch.Tensor) -> torch.Tensor:
    f = x.shape[1]
    c = torch.zeros(f, f, dtype=torch.float64)
    for i in range(f):
        for j in range(f):
            a, b = x[:, i].double(), x[:, j].double()
            sa, sb = a.std(), b.std()
            if sa > 0 and sb > 0:
                c[i, j] = ((a - a.mean()) * (b - b.mean())).mean() / (a.std(unbiased=False) * b.std(unbiased=False))
    return c


def test_tiled_scores_match_the_official_block_tiling():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 4, generator=g)
    x[:, 3] = 0.5  # a constant feature: correlation 0 (official: NaN -> 0)
    corr = input_correlation(x)
    assert torch.allclose(corr, _naive_corr(x), atol=1e-12)
    # official dim=2: [[C, C], [C, C]] with zero diagonal blocks' diagonals, sliced [:out, :in]
    c0 = corr.clone()
    c0.fill_diagonal_(0.0)
    big = torch.cat([torch.cat([c0, c0], 1), torch.cat([c0, c0], 1)], 0).abs()
    assert torch.equal(tiled_scores(corr, 8, 4), big[:8, :4])
    assert torch.equal(tiled_scores(corr, 8, 8), big)
    assert torch.equal(tiled_scores(corr, 5, 7), big[:5, :7])
    assert float(tiled_scores(corr, 8, 8)[:, 3].abs().sum()) == 0.0


def test_tiled_topology_takes_the_strongest_correlations_with_the_exact_count():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(200, 6, generator=g)
    x[:, 1] = x[:, 0] + 0.01 * torch.rand(200, generator=g)  # 0 and 1 strongly correlated
    corr = input_correlation(x)
    mask = tiled_correlated_topology(corr, 12, 12, 0.1, torch.Generator().manual_seed(0))
    n = link_count(12, 12, 0.1)
    assert mask.dtype == torch.bool and mask.shape == (12, 12) and int(mask.sum()) == n
    score = tiled_scores(corr, 12, 12)
    # every chosen link scores at least as high as every link left out
    assert float(score[mask].min()) >= float(score[~mask].max()) - 1e-12
    # the 0-1 pair and its tiled copies (rows/cols 0, 1, 6, 7) are all in
    for a in (0, 6):
        for b in (1, 7):
            assert mask[a, b] and mask[b, a]


def test_every_layer_gets_the_tiled_correlation_not_er():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(300, 16, generator=g)
    x[:, :4] = 0.0  # four dead pixels: their tiled neurons get no links at all
    c = SparseConfig(method="chts", density=0.1, topology="csti", topology_options={"hidden": "tiled"}, seed=0)
    model = sparsify_(MLP(16, 3, [32, 32], "relu", False, 0.0), c, train_inputs=x.view(300, 1, 4, 4))
    layers = sparse_layers(model)
    assert len(layers) == 2
    score1 = tiled_scores(input_correlation(x), 32, 32)
    m1 = layers[1][1].mask()
    assert int(m1.sum()) == link_count(32, 32, 0.1)
    assert float(score1[m1].min()) >= float(score1[~m1].max()) - 1e-12  # hidden layer: tiled CSTI, not ER
    dead = [0, 1, 2, 3, 16, 17, 18, 19]
    assert not m1[dead].any() and not m1[:, dead].any()
    assert not layers[0][1].mask()[:, :4].any()


def test_csti_tiled_without_data_is_refused_with_the_fix():
    c = SparseConfig(method="chts", density=0.1, topology="csti", topology_options={"hidden": "tiled"})
    with pytest.raises(ConfigError, match="train_inputs"):
        sparsify_(MLP(16, 3, [32, 32], "relu", False, 0.0), c)
    # the default keeps Erdos-Renyi on hidden layers (and everywhere without data)
    sparsify_(MLP(16, 3, [32, 32], "relu", False, 0.0), SparseConfig(method="chts", density=0.1, topology="csti"))


def test_swi_out_uses_the_out_degree():
    mask = torch.ones(400, 100, dtype=torch.bool)
    mask[:, 50:] = False
    w = swi_out_init(mask, torch.Generator().manual_seed(0), 0.05, torch.float32)
    assert float(w[~mask].abs().sum()) == 0.0
    assert float(w[mask].std()) == pytest.approx(math.sqrt(2 / (0.05 * 400)), rel=0.03)


def _train(refund: bool, steps: int = 24):
    c = SparseConfig(method="chts", density=0.05, density_schedule="em_s", removal="magnitude", update_interval=2,
                     update_unit="steps", seed=0, percolation_refund=refund,
                     density_schedule_options={"extra": 0.3, "late_extra": 0.2})
    torch.manual_seed(0)
    model = sparsify_(MLP(20, 5, [40, 40, 40], "relu", False, 0.0), c)
    engine = SparseEngine(model, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    st = TrainState(model=model, optimizer=opt, device=torch.device("cpu"), total_steps=steps, steps_per_epoch=steps)
    engine.on_fit_start(st)
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(steps):
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        st.skip_step = False
        engine.before_optimizer_step(st)
        if not st.skip_step:
            opt.step()
        u = engine.updates
        engine.after_optimizer_step(st)
        st.step += 1
        if engine.updates != u:
            counts.append([l.nnz() for _, l in sparse_layers(model)])
    return model, engine, counts


def test_without_refund_the_regrowth_is_fixed_and_percolated_links_are_lost():
    model, _, counts = _train(refund=False)
    _, _, refunded = _train(refund=True)
    layers = sparse_layers(model)
    finals = [link_count(l.out_features, l.in_features, 0.05) for _, l in layers]
    # with refund every update lands exactly on the scheduled count; without it never above, and the end
    # is at most the final density (the official EM_S ends below it when percolation cut links)
    assert all(n <= link_count(40, 40, 0.35) for row in counts for n in row)
    assert all(n <= f for n, f in zip(counts[-1], finals))
    assert refunded[-1] == finals
    assert sum(counts[-1]) <= sum(refunded[-1])
    # the first update's percolation cuts links here (seed 0): with refund they are regrown (the scheduled
    # d + extra = 35%), without it they are lost
    assert refunded[0] == [link_count(40, 20, 0.35), link_count(40, 40, 0.35), link_count(40, 40, 0.35)]
    assert sum(counts[0]) < sum(refunded[0])


def _dense(layer, v: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(layer.out_features, layer.in_features)
    out[layer.indices[0], layer.indices[1]] = v.detach()
    return out


def _one_update(mode: str):
    """A 3-step-trained EM_S MLP (momentum on every link) before and after one update in ``mode``."""
    c = SparseConfig(method="chts", density=0.05, density_schedule="em_s", removal="magnitude", update_interval=2,
                     update_unit="steps", seed=0, regrown_removed=mode,
                     density_schedule_options={"extra": 0.3, "late_extra": 0.2})
    torch.manual_seed(0)
    model = sparsify_(MLP(20, 5, [40, 40], "relu", False, 0.0), c)
    engine = SparseEngine(model, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine.on_fit_start(TrainState(model=model, optimizer=opt, device=torch.device("cpu"), total_steps=40,
                                   steps_per_epoch=40))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    layers = [lay for _, lay in sparse_layers(model)]

    def snap():
        return [(lay.mask(), _dense(lay, lay.values), _dense(lay, opt.state[lay.values]["momentum_buffer"]))
                for lay in layers]

    before = snap()
    engine.update(2, opt)
    return before, snap()


def test_regrown_removed_links_keep_or_reset_weight_and_momentum():
    before, reset = _one_update("reset")
    before_k, keep = _one_update("keep")
    readded = 0
    for (old, w0, m0), (new, wr, mr), (old_k, w0k, _), (new_k, wk, mk) in zip(before, reset, before_k, keep):
        # the same topology either way; only the values of the links differ
        assert torch.equal(old, old_k) and torch.equal(new, new_k) and torch.equal(w0, w0k)
        fresh = new & ~old  # links new to the layer: 0 with zero momentum in both modes
        for w, m in ((wr, mr), (wk, mk)):
            assert float(w[fresh].abs().sum()) == 0.0 and float(m[fresh].abs().sum()) == 0.0
        both = new & old
        # keep: every link that was there before keeps its weight and momentum
        assert torch.equal(wk[both], w0[both]) and torch.equal(mk[both], m0[both])
        # reset: survivors the same, links removed and regrown in this update start at 0 with zero momentum
        readd = both & (wr != w0)
        assert float(wr[readd].abs().sum()) == 0.0 and float(mr[readd].abs().sum()) == 0.0
        assert torch.equal(mr[both & ~readd], m0[both & ~readd])
        readded += int(readd.sum())
    # EM_S cuts to 5% by magnitude and regrows to 35% by CH scores: some removed links come back
    assert readded > 0
