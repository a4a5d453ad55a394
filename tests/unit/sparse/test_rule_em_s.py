"""EM_S density schedule: the official step-down, removal to the final density, training ends on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import TrainState
from edgetune.models.mlp import MLP
from edgetune.sparse import SparseConfig, SparseEngine, sparse_layers, sparsify_
from edgetune.sparse.rules.em_s import EmsOptions, ems_density
from edgetune.sparse.strategies import ScheduleContext
from edgetune.sparse.topology import link_count


def test_density_steps_down_as_the_official_scheduler():
    c = ScheduleContext(
        density=0.01, initial_density=0.06, t_end=75, interval=1, last_update=74, zeta=0.3, options=EmsOptions()
    )
    # official (dst_scheduler.py): updates while step < T_end; step <= 0.6*T_end -> d + 5%;
    # step < T_end - delta_T -> d + 2.5%; else (the last update, T_end - delta_T) -> d
    assert [round(ems_density(s, c), 6) for s in (1, 45, 46, 73, 74)] == [0.06, 0.06, 0.035, 0.035, 0.01]
    assert SparseConfig(
        method="chts", density=0.01, density_schedule="em_s"
    ).resolved().initial_density == pytest.approx(0.06)


def test_training_follows_the_schedule_and_ends_on_the_density():
    c = SparseConfig(
        method="chts", density=0.1, density_schedule="em_s", update_interval=2, update_unit="steps", seed=0
    )
    torch.manual_seed(0)
    model = sparsify_(MLP(20, 5, [40, 40, 40], "relu", False, 0.0), c)
    layer = sparse_layers(model)[1][1]
    assert layer.nnz() == link_count(40, 40, 0.15)
    engine = SparseEngine(model, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    st = TrainState(
        model=model, optimizer=opt, device=torch.device("cpu"), total_steps=40, steps_per_epoch=10
    )
    engine.on_fit_start(st)  # T_end = 30: updates at 2, 4, ..., 28 (before T_end); the last one lands on 0.1
    seen = {}
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        st.skip_step = False
        engine.before_optimizer_step(st)
        if not st.skip_step:
            opt.step()
        before = sum(l.nnz() for _, l in sparse_layers(model))
        engine.after_optimizer_step(st)
        st.step += 1
        if engine.last.get("sparse_updates") == len(seen) + 1:
            seen[st.step] = (before, layer.nnz(), engine.last["sparse_removed"])
    assert sorted(seen) == list(range(2, 29, 2))
    assert seen[2][1] == link_count(40, 40, 0.15) and seen[18][1] == link_count(40, 40, 0.15)
    assert seen[20][1] == seen[26][1] == link_count(40, 40, 0.125)
    assert seen[28][1] == link_count(40, 40, 0.1)
    for _, l in sparse_layers(model):
        assert l.nnz() == link_count(l.out_features, l.in_features, 0.1)
    # each update removes (removal rule + percolation) at least down to the final density: zeta is not used
    final = sum(link_count(l.out_features, l.in_features, 0.1) for _, l in sparse_layers(model))
    assert all(r >= before - final for before, _, r in seen.values())
    assert seen[2][2] < 0.4 * seen[2][0], (
        "the first update removed more than the extra 5 points: zeta crept in"
    )


def test_bad_options_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"late_extra=0.1 is above extra=0.05"):
        validate(SparseConfig, {"density_schedule": "em_s", "density_schedule_options": {"late_extra": 0.1}})
    with pytest.raises(ConfigError, match=r"density_schedule_options.extra=0"):
        validate(SparseConfig, {"density_schedule": "em_s", "density_schedule_options": {"extra": 0}})
    with pytest.raises(
        ConfigError, match=r"density_schedule_options.steps is not a parameter.*extra, late_extra"
    ):
        validate(SparseConfig, {"density_schedule": "em_s", "density_schedule_options": {"steps": 3}})
    with pytest.raises(
        ConfigError,
        match=r"density_schedule=em_s does not start from initial_density.*remove initial_density",
    ):
        validate(SparseConfig, {"density_schedule": "em_s", "initial_density": 0.5})
