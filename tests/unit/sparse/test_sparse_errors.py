"""Bad input to the sparse family: each error names the layer and the value, and says what to change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.core.hooks import TrainState
from edgetune.models.mlp import MLP
from edgetune.sparse import SparseConfig, SparseEngine, sparse_layers, sparsify_
from edgetune.sparse.topology import link_count


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(20, 5, [48, 48], "relu", False, 0.0)


def test_final_density_too_small_is_caught_before_training():
    # CHTss starts denser: the initial density fits, the final one leaves fewer links than neurons
    with pytest.raises(ConfigError, match=r"'layers.0' \(final density\).*too small"):
        sparsify_(mlp(), SparseConfig(method="chtss", density=0.01, initial_density=0.3))


def test_given_masks_are_checked_against_their_layer():
    good = torch.zeros(48, 20, dtype=torch.bool)
    good.view(-1)[torch.randperm(960)[: link_count(48, 20, 0.25)]] = True
    model = sparsify_(mlp(), SparseConfig(method="set", density=0.25), masks={"layers.0": good})
    assert torch.equal(sparse_layers(model)[0][1].mask(), good)

    with pytest.raises(ShapeError, match=r"'layers.0': mask shape \(20, 48\).*\(out, in\) = \(48, 20\)"):
        sparsify_(mlp(), SparseConfig(method="set", density=0.25), masks={"layers.0": good.t()})
    with pytest.raises(ConfigError, match=r"'layers.0': the mask holds 960 links but density 0.25 means 240"):
        sparsify_(
            mlp(),
            SparseConfig(method="set", density=0.25),
            masks={"layers.0": torch.ones(48, 20, dtype=torch.bool)},
        )
    with pytest.raises(ConfigError, match=r"masks given for \['head'\].*\['layers.0', 'layers.1'\]"):
        sparsify_(mlp(), SparseConfig(method="set", density=0.25), masks={"head": good})


def test_gradient_regrowth_without_a_gradient_names_the_layer():
    cfg = SparseConfig(method="rigl", density=0.25)
    model = sparsify_(mlp(), cfg)
    engine = SparseEngine(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.on_fit_start(
        TrainState(
            model=model, optimizer=opt, device=torch.device("cpu"), total_steps=100, steps_per_epoch=10
        )
    )
    with pytest.raises(ConfigError, match=r"'layers.0': gradient regrowth at step 5 found no dense gradient"):
        engine.update(5)


def test_density_decay_without_an_update_before_the_stop_is_refused():
    cfg = SparseConfig(method="chtss", density=0.05, initial_density=0.25)  # one update per epoch
    model = sparsify_(mlp(), cfg)
    engine = SparseEngine(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    one_epoch = TrainState(
        model=model, optimizer=opt, device=torch.device("cpu"), total_steps=10, steps_per_epoch=10
    )
    with pytest.raises(ConfigError, match=r"decay from 0.25 to 0.05 needs topology updates.*every 10 steps"):
        engine.on_fit_start(one_epoch)


def _engine(cfg: SparseConfig) -> SparseEngine:
    model = sparsify_(mlp(), cfg)
    engine = SparseEngine(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.on_fit_start(
        TrainState(
            model=model, optimizer=opt, device=torch.device("cpu"), total_steps=100, steps_per_epoch=10
        )
    )
    return engine


def test_a_rule_that_breaks_its_contract_is_refused_with_the_layer_and_counts():
    import dataclasses

    engine = _engine(SparseConfig(method="set", density=0.25, update_interval=1, update_unit="steps"))
    # a plug-in regrowth rule that grows one link too few would silently lower the density
    engine.regrowth = dataclasses.replace(engine.regrowth, fn=lambda m, k, ctx: _first_free(m, k - 1))
    with pytest.raises(
        ConfigError,
        match=r"'layers.0': regrowth rule 'random' returned \d+ links .*exactly k=\d+ "
        r"inactive links.*fix the rule",
    ):
        engine.update(1)
    engine = _engine(SparseConfig(method="set", density=0.25, update_interval=1, update_unit="steps"))
    engine.removal = dataclasses.replace(
        engine.removal, fn=lambda w, m, k, ctx: _first_free(m, k)
    )  # inactive ones
    with pytest.raises(
        ConfigError,
        match=r"'layers.0': removal rule 'magnitude' returned \d+ links \(\d+ of them "
        r"inactive\)",
    ):
        engine.update(1)


def _first_free(mask: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(mask).view(-1)
    out[(~mask).view(-1).nonzero().squeeze(1)[:k]] = True
    return out.view(mask.shape)


def test_a_rule_refusal_is_prefixed_with_the_layer():
    import dataclasses

    from edgetune.sparse.regrowth import random_regrowth

    engine = _engine(SparseConfig(method="set", density=0.25, update_interval=1, update_unit="steps"))
    engine.regrowth = dataclasses.replace(
        engine.regrowth, fn=lambda m, k, ctx: random_regrowth(m, m.numel(), ctx.generator)
    )
    with pytest.raises(
        ConfigError, match=r"sparse layer 'layers.0' \(regrowth 'random'\): cannot regrow k=960 links"
    ):
        engine.update(1)


def test_unknown_rule_names_list_the_registered_ones_and_mest_lambda_below_zero_is_refused():
    from edgetune.core.config import validate

    with pytest.raises(
        ConfigError,
        match=r"sparse.removal='mets'.*Did you mean \"mest\".*magnitude, mest, "
        r"relative_importance, soft_magnitude, soft_relative_importance",
    ):
        validate(SparseConfig, {"removal": "mets"})
    with pytest.raises(ConfigError, match=r"sparse.removal_options.lambda=-1.*>= 0"):
        validate(SparseConfig, {"removal": "mest", "removal_options": {"lambda": -1}})
