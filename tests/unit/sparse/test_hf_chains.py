"""Percolation chains on Hugging Face layer names: GPT-2 c_fc/c_proj, Llama gated MLPs, BERT intermediate/output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetune.core.hooks import TrainState
from edgetune.sparse import SparseConfig, SparseEngine, sparse_layers, sparsify_
from edgetune.sparse.sparsify import layer_chains

transformers = pytest.importorskip("transformers")


def _chains_by_name(model: nn.Module) -> list[list[str]]:
    layers = sparse_layers(model)
    return sorted([layers[i][0] for i in chain] for chain in layer_chains(layers, model))


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg)


def test_llama_gate_and_up_feed_down_and_values_feed_o_proj():
    model = sparsify_(tiny_llama(), SparseConfig(method="chts", density=0.3))
    chains = _chains_by_name(model)
    for b in (0, 1):
        p = f"model.layers.{b}."
        assert [p + "mlp.gate_proj", p + "mlp.down_proj"] in chains
        assert [p + "mlp.up_proj", p + "mlp.down_proj"] in chains
        assert [p + "self_attn.v_proj", p + "self_attn.o_proj"] in chains
    assert len(chains) == 6  # nothing else pairs (q/k do not feed o_proj neuron for neuron)


def test_bert_intermediate_feeds_output_and_value_feeds_attention_output():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    model = sparsify_(transformers.BertModel(cfg), SparseConfig(method="chts", density=0.3))
    p = "encoder.layer.0."
    assert _chains_by_name(model) == sorted(
        [
            [p + "attention.self.value", p + "attention.output.dense"],
            [p + "intermediate.dense", p + "output.dense"],
        ]
    )


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(16, 48)
        self.attn.c_proj = nn.Linear(16, 16)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(16, 64)
        self.mlp.c_proj = nn.Linear(64, 16)


def test_gpt2_names_pair_c_fc_with_its_own_c_proj_only():
    torch.manual_seed(0)
    model = nn.Module()
    model.h = nn.ModuleList([_Block(), _Block()])
    model.lm_head = nn.Linear(16, 40)
    sparsify_(model, SparseConfig(method="chts", density=0.3))
    assert _chains_by_name(model) == [["h.0.mlp.c_fc", "h.0.mlp.c_proj"], ["h.1.mlp.c_fc", "h.1.mlp.c_proj"]]


def test_gated_mlp_percolates_to_a_fixed_point_across_both_chains():
    model = sparsify_(
        tiny_llama(),
        SparseConfig(method="chts", density=0.3, include=["*gate_proj", "*up_proj", "*down_proj"]),
    )
    named = dict(sparse_layers(model))
    up = named["model.layers.0.mlp.up_proj"]
    keep = up.indices[0] != 5  # hidden neuron 5 loses every input of up_proj: gate row 5 must go too
    up.set_topology(up.indices[:, keep], up.values.detach()[keep])
    cfg = SparseConfig(
        method="chts",
        density=0.3,
        include=["*gate_proj", "*up_proj", "*down_proj"],
        update_interval=1,
        update_unit="steps",
        zeta=0.2,
    )
    engine = SparseEngine(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine.on_fit_start(
        TrainState(model=model, optimizer=opt, device=torch.device("cpu"), total_steps=10, steps_per_epoch=5)
    )
    after: dict[str, torch.Tensor] = {}  # masks right after removal + percolation, before regrowth
    percolate = engine._percolate

    def spy(work):
        percolate(work)
        after.update({u.name: u.mask.clone() for u in work})

    engine._percolate = spy
    engine.update(1, opt)
    for b in (0, 1):
        gate, upm, down = (after[f"model.layers.{b}.mlp.{n}"] for n in ("gate_proj", "up_proj", "down_proj"))
        g, u, d = gate.any(dim=1), upm.any(dim=1), down.any(dim=0)
        assert torch.equal(g, d) and torch.equal(u, d), "a hidden neuron is half connected after percolation"
    assert not after["model.layers.0.mlp.gate_proj"][5].any()
    assert not after["model.layers.0.mlp.down_proj"][:, 5].any()
