"""Layer chains in the engine: percolation through nn.Sequential, frozen layers, active neurons for every method."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from edgetune.core.hooks import TrainState
from edgetune.sparse import SparseConfig, SparseEngine, sparse_layers, sparsify_
from edgetune.sparse.sparsify import layer_chains
from edgetune.sparse.topology import link_count


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> TrainState:
    return TrainState(model=model, optimizer=opt, device=torch.device("cpu"), total_steps=100, steps_per_epoch=10)


def _seq(mid: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), mid, nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def test_chains_run_through_per_feature_modules_of_a_sequential():
    cfg = SparseConfig(method="chts", density=0.3, dense_head=False)
    model = sparsify_(_seq(nn.Dropout(0.1)), cfg)
    layers = sparse_layers(model)
    assert [n for n, _ in layers] == ["0", "3", "5"]
    assert layer_chains(layers, model) == [[0, 1, 2]]
    assert layer_chains(layers) == []  # without the model the gaps cannot be checked: no chain
    # a module that mixes features (LayerNorm) breaks the chain: neuron j after it is not neuron j before it
    mixed = sparsify_(_seq(nn.LayerNorm(32)), cfg)
    assert layer_chains(sparse_layers(mixed), mixed) == [[1, 2]]


def test_percolation_without_any_chain_warns(caplog):
    model = sparsify_(nn.Sequential(nn.Linear(20, 32), nn.LayerNorm(32), nn.Linear(32, 5)),
                      SparseConfig(method="chts", density=0.3, dense_head=False))
    with caplog.at_level(logging.WARNING, logger="edgetune.sparse.engine"):
        SparseEngine(model, SparseConfig(method="chts", density=0.3, dense_head=False))
    assert "no chain of sparse layers" in caplog.text


def _starve_neuron_0(model: nn.Module, which: int) -> None:
    """Cut every input link of output neuron 0 of sparse layer ``which`` (that neuron becomes dead)."""
    layer = sparse_layers(model)[which][1]
    keep = layer.indices[0] != 0
    layer.set_topology(layer.indices[:, keep], layer.values.detach()[keep])


@pytest.mark.parametrize("which", [0, 1])
def test_active_neurons_are_measured_for_methods_without_percolation(which):
    # 2 sparse layers + dense head: 16 neurons between them and 16 feeding the head, all alive at density 0.5
    torch.manual_seed(0)
    model = sparsify_(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)),
                      SparseConfig(method="set", density=0.5))
    assert SparseEngine(model, SparseConfig(method="set", density=0.5)).metrics()["sparse_active_neurons"] == 1.0
    _starve_neuron_0(model, which)
    engine = SparseEngine(model, SparseConfig(method="set", density=0.5))
    assert engine.cfg.percolation is False
    # a dead neuron between the layers or in the last hidden layer (before the dense head) counts alike
    assert engine.metrics()["sparse_active_neurons"] == 31 / 32


def test_frozen_layer_keeps_its_density_when_neighbours_percolate():
    torch.manual_seed(0)
    model = sparsify_(nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24),
                                    nn.ReLU(), nn.Linear(24, 5)), SparseConfig(method="cht", density=0.05))
    cfg = SparseConfig(method="cht", density=0.05, update_interval=1, update_unit="steps", zeta=0.5)
    engine = SparseEngine(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.on_fit_start(_state(model, opt))
    engine.frozen[1] = True  # as after the CHT early stop
    cut = 0
    for step in range(1, 6):
        before = sparse_layers(model)[1][1].mask()
        engine.update(step, opt)
        for _, layer in sparse_layers(model):
            assert layer.nnz() == link_count(layer.out_features, layer.in_features, 0.05)
        cut += int((before & ~sparse_layers(model)[1][1].mask()).sum())
    assert cut > 0, "percolation never cut a link of the frozen layer: the case was not exercised"
