"""Sparse export: exact neuron compaction (bias folding, cascades, batch norm), storage rule, folders."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.state import save_tensors
from edgetune.core.surgery import replace_module
from edgetune.models.mlp import MLP
from edgetune.sparse.export import (
    StorageRule,
    apply_storage_rule_,
    choose_storage,
    compact_mlp_,
    load_exported,
    save_exported,
)
from edgetune.sparse.layer import SparseLinear

DT = torch.float64


def _sparsify(model: nn.Module, name: str, mask: torch.Tensor) -> None:
    replace_module(model, name, SparseLinear.from_dense(model.get_submodule(name), mask))


def _cascade_mlp(activation: str, batch_norm: bool = False) -> MLP:
    """6-5-4-4-3 MLP whose masks kill neurons in cascades (see the comments; expected widths 2, 2, 3)."""
    torch.manual_seed(3)
    model = MLP(6, 3, widths=(5, 4, 4), activation=activation, batch_norm=batch_norm).to(DT)
    m0 = torch.ones(5, 6, dtype=torch.bool)
    m0[1] = False  # h0 n1: no inputs -> constant act(b), folded into layer 1's bias
    m1 = torch.ones(4, 5, dtype=torch.bool)
    m1[:, 3] = False  # h0 n3: no outputs -> cut
    m1[:, 4] = False
    m1[3, 4] = True  # h0 n4 feeds only h1 n3 (dies in sweep 3)
    m1[:, 1] = False
    m1[2] = False
    m1[2, 1] = True  # h1 n2's only input is h0 n1: once n1 is folded, n2 has no inputs -> folded too
    m2 = torch.ones(4, 4, dtype=torch.bool)
    m2[1:, 3] = False  # h1 n3 feeds only h2 n0 ...
    with torch.no_grad():
        for layer in model.layers:
            layer.bias.abs_().add_(0.1)  # positive biases: relu of the folded constants is not 0
        model.layers[1].bias[2] = 3.0
        model.head.weight[:, 0] = 0.0  # ... and h2 n0 has no outputs (dense head, zero column) -> cut
    for i, m in enumerate((m0, m1, m2)):
        _sparsify(model, f"layers.{i}", m)
    if batch_norm:
        with torch.no_grad():
            for n in model.norms:
                n.running_mean.uniform_(-1, 1)
                n.running_var.uniform_(0.5, 2)
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(0.1, 0.5)
    return model.eval()


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_compaction_folds_and_cuts_in_cascade_exactly(activation: str) -> None:
    model = _cascade_mlp(activation)
    x = torch.randn(64, 6, dtype=DT)
    with torch.no_grad():
        y0 = model(x)
    act = model.act
    w1, w2 = model.layers[1].to_dense_weight(), model.layers[2].to_dense_weight()
    b0, b1, b2 = (layer.bias.detach().clone() for layer in model.layers)
    report = compact_mlp_(model)
    assert report.widths_before == (5, 4, 4)
    assert report.widths_after == (2, 2, 3)
    assert report.folded == (1, 1, 0) and report.cut == (2, 1, 1)
    assert report.sweeps == 4  # cut h2 n0 -> h1 n3 -> h0 n4, then a sweep that finds nothing
    assert [layer.out_features for layer in model.layers] == [2, 2, 3] and model.head.in_features == 3
    assert model.feature_dim == 3
    # hand-computed folds: h0 n1 outputs act(b0[1]) into h1 n2 only; h1 n2 then outputs the constant
    # c = act(b1[2] + w1[2, 1] act(b0[1])), which lands in the bias of the kept h2 neurons 1, 2, 3
    c = act(b1[2] + w1[2, 1] * act(b0[1]))
    delta = w2[[1, 2, 3], 2] * c
    assert delta.abs().min() > 1e-3  # the fold matters: dropping the neuron without it would be wrong
    torch.testing.assert_close(model.layers[2].bias.detach(), b2[[1, 2, 3]] + delta, atol=1e-15, rtol=0)
    torch.testing.assert_close(model.layers[1].bias.detach(), b1[[0, 1]], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, atol=1e-10, rtol=0)


def test_compaction_with_batch_norm_and_zero_scale() -> None:
    model = _cascade_mlp("gelu", batch_norm=True)
    with torch.no_grad():
        model.norms[2].weight[2] = 0.0  # h2 n2 has inputs but BN scale 0: constant act(beta), folded
    x = torch.randn(32, 6, dtype=DT)
    with torch.no_grad():
        y0 = model(x)
    report = compact_mlp_(model)
    assert report.widths_after == (2, 2, 2) and report.folded == (1, 1, 1)
    assert [n.num_features for n in model.norms] == [2, 2, 2]
    assert not model.norms[0].training
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, atol=1e-10, rtol=0)


def _random_sparse_mlp(sizes: tuple[int, ...], density: float, seed: int, dtype: torch.dtype = DT) -> MLP:
    g = torch.Generator().manual_seed(seed)
    model = MLP(sizes[0], sizes[-1], widths=sizes[1:-1]).to(dtype)
    for i, layer in enumerate(model.layers):
        mask = torch.rand(layer.weight.shape, generator=g) < density
        mask[0, 0] = True
        _sparsify(model, f"layers.{i}", mask)
    return model.eval()


def test_random_chain_reaches_fixed_point_and_stays_exact() -> None:
    model = _random_sparse_mlp((30, 40, 40, 40, 5), 0.04, seed=1)
    x = torch.randn(50, 30, dtype=DT)
    with torch.no_grad():
        y0 = model(x)
    report = compact_mlp_(model, rule=StorageRule(max_sparse_density=1.0))
    assert sum(report.folded) > 0 and sum(report.cut) > 0
    assert all(a <= b for a, b in zip(report.widths_after, report.widths_before, strict=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, atol=1e-10, rtol=0)
    chain = [*model.layers, model.head]
    for a, b in itertools.pairwise(chain):  # fixed point: every kept hidden neuron is alive
        wa = a.to_dense_weight() if isinstance(a, SparseLinear) else a.weight
        wb = b.to_dense_weight() if isinstance(b, SparseLinear) else b.weight
        alive = (wa != 0).any(1) & (wb != 0).any(0)
        assert bool(alive.all()) or a.out_features == 1
    assert "sparse" in report.storage  # a 4% layer stays sparse under the bytes-only rule


def test_empty_hidden_layer_keeps_one_linkless_neuron() -> None:
    model = _random_sparse_mlp((8, 6, 5, 3), 1.0, seed=2)
    with torch.no_grad():
        model.head.weight.zero_()  # nothing reaches the output: the whole chain is dead
    x = torch.randn(4, 8, dtype=DT)
    with torch.no_grad():
        y0 = model(x)
    report = compact_mlp_(model)
    assert report.widths_after == (1, 1) and report.links_after == (0, 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, atol=1e-12, rtol=0)


def test_compaction_refuses_non_mlp_and_unknown_activation() -> None:
    with pytest.raises(ConfigError, match="not an MLP"):
        compact_mlp_(nn.Sequential(nn.Linear(3, 3)))
    model = MLP(4, 2, widths=(3,))
    model.act = torch.sigmoid
    with pytest.raises(ConfigError, match="relu, gelu and tanh"):
        compact_mlp_(model)


def test_storage_rule_hand_computed() -> None:
    assert choose_storage(1568, 1568, int(0.01 * 1568 * 1568)) == "sparse"
    assert choose_storage(1568, 1568, int(0.5 * 1568 * 1568)) == "dense"
    assert choose_storage(1568, 1568, int(0.07 * 1568 * 1568)) == "dense"  # latency threshold 6%
    assert choose_storage(10, 1568, 100) == "sparse"
    latency = StorageRule(min_sparse_elements=16384)  # tiny layer: kernel overhead beats the product
    assert choose_storage(10, 1568, 100, rule=latency) == "dense"
    assert choose_storage(1568, 1568, 24586, rule=latency) == "sparse"
    bytes_only = StorageRule(max_sparse_density=1.0)
    # float32 + int32 (row, col): 12 bytes per link vs 4 per dense entry -> dense from density 1/3
    assert choose_storage(30, 100, 999, torch.float32, bytes_only) == "sparse"
    assert choose_storage(30, 100, 1000, torch.float32, bytes_only) == "dense"
    # float64: 16 bytes per link vs 8 -> dense from density 1/2
    assert choose_storage(30, 100, 1499, torch.float64, bytes_only) == "sparse"
    assert choose_storage(30, 100, 1500, torch.float64, bytes_only) == "dense"
    assert choose_storage(30, 100, 0, torch.float32, bytes_only) == "dense"


def test_apply_storage_rule_turns_dense_ish_sparse_layer_into_linear() -> None:
    g = torch.Generator().manual_seed(0)
    seq = nn.Sequential(nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 200)).to(DT)
    seq[0] = SparseLinear.from_dense(seq[0], torch.rand(200, 200, generator=g) < 0.5)
    seq[2] = SparseLinear.from_dense(seq[2], torch.rand(200, 200, generator=g) < 0.01)
    x = torch.randn(7, 200, dtype=DT)
    with torch.no_grad():
        y0 = seq(x)
        apply_storage_rule_(seq)
        assert type(seq[0]) is nn.Linear and isinstance(seq[2], SparseLinear)
        torch.testing.assert_close(seq(x), y0, atol=1e-12, rtol=0)


def test_save_load_round_trip_equal_outputs(tmp_path) -> None:
    model = _cascade_mlp("tanh", batch_norm=True)
    compact_mlp_(model, rule=StorageRule(max_sparse_density=1.0))
    model.layers[0] = SparseLinear.from_dense(model.layers[0], torch.eye(2, 6, dtype=torch.bool))  # sparse
    out = save_exported(model, tmp_path / "exp", meta={"note": "x"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "edgetune-export" and manifest["version"] == 1 and manifest["model"] == "mlp"
    arch = manifest["architecture"]
    assert arch["activation"] == "tanh" and arch["batch_norm"] and arch["in_features"] == 6
    assert arch["layers"][0]["kind"] == "sparse" and arch["layers"][0]["nnz"] == 2
    assert [e["out_features"] for e in arch["layers"]] == [2, 2, 3, 3]
    assert manifest["meta"] == {"note": "x"}
    loaded = load_exported(out)
    assert not loaded.training and isinstance(loaded.layers[0], SparseLinear)
    assert loaded.layers[0].indices.dtype == torch.int32
    x = torch.randn(9, 6, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_corrupt_foreign_and_mismatched_folders_are_refused(tmp_path) -> None:
    model = _cascade_mlp("relu")
    compact_mlp_(model)
    out = save_exported(model, tmp_path / "exp")
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_exported(tmp_path)
    tensors = out / "model.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or was changed.*export the run again"):
        load_exported(out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({"format": "peft-adapter", "version": 1}))
    with pytest.raises(CheckpointError, match="not an edgetune export manifest"):
        load_exported(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_exported(out)
    out2 = save_exported(model, tmp_path / "exp2")  # intact tensors, manifest that lies about a width
    manifest = json.loads((out2 / "manifest.json").read_text())
    manifest["architecture"]["layers"][1]["out_features"] = 7
    (out2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        load_exported(out2)


def test_non_mlp_export_needs_builder_and_round_trips_through_registry(tmp_path) -> None:
    from edgetune.models.base import ModelSpec, build_model

    builder = {"name": "vit", "options": {"patch_size": 4, "dim": 32, "depth": 1, "heads": 2},
               "input_shape": [1, 8, 8], "num_classes": 3, "task": "classification"}
    spec = ModelSpec(input_shape=(1, 8, 8), num_classes=3)
    model = build_model("vit", builder["options"], spec).eval()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear][:2]
    for n in names:
        _sparsify(model, n, torch.rand(model.get_submodule(n).weight.shape) < 0.2)
    with pytest.raises(ConfigError, match="builder="):
        save_exported(model, tmp_path / "a")
    out = save_exported(model, tmp_path / "b", builder=builder)
    assert json.loads((out / "manifest.json").read_text())["model"] == "vit"
    loaded = load_exported(out)
    assert all(isinstance(loaded.get_submodule(n), SparseLinear) for n in names)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_one_percent_784_1568x3_model_shrinks_on_disk(tmp_path) -> None:
    torch.manual_seed(0)
    model = MLP(784, 10, widths=(1568, 1568, 1568))
    dense_bytes = (tmp_path / "dense.safetensors")
    save_tensors(model.state_dict(), dense_bytes)
    for i, layer in enumerate(model.layers):
        _sparsify(model, f"layers.{i}", torch.rand(layer.weight.shape) < 0.01)
    with torch.no_grad():
        model.layers[1].values[model.layers[1].indices[0] < 100] = 0.0  # 100 neurons of h1 lose their inputs
    model.eval()
    before = tmp_path / "run.safetensors"  # what a run folder stores: SparseLinear indices + values
    save_tensors(model.state_dict(), before)
    x = torch.randn(8, 784)
    with torch.no_grad():
        y0 = model(x)
    report = compact_mlp_(model)
    assert report.storage == ("sparse", "sparse", "sparse", "dense")
    assert report.widths_after[1] <= 1568 - 100
    out = save_exported(model, tmp_path / "exp")
    after = (out / "model.safetensors").stat().st_size
    assert after < before.stat().st_size
    assert after * 20 < dense_bytes.stat().st_size
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), y0, atol=1e-5, rtol=1e-5)


def test_export_run_on_tiny_sparse_run(tmp_path) -> None:
    pytest.importorskip("sklearn")  # the bundled digits set
    from edgetune.core.config import load_yaml, validate
    from edgetune.core.sections import SECTIONS
    from edgetune.recipe import recipe_schema
    from edgetune.runner import load_run_model, run
    from edgetune.sparse.export import export_run

    if "sparse" not in SECTIONS.names():
        pytest.skip("the sparse recipe section is not registered")
    import edgetune

    data = load_yaml(Path(edgetune.__file__).parent / "recipes" / "foundation" / "digits-mlp.yaml")
    data["train"].update(epochs=2)
    data["data"].update(limit_train=512)
    data["sparse"] = {"method": "set", "density": 0.05}
    run_dir = tmp_path / "run"
    run(validate(recipe_schema(), data), run_dir, write_report=False, command="test")
    report = export_run(load_run_model(run_dir, with_data=True), run_dir, latency_repeats=2)
    out = run_dir / "export"
    assert json.loads((out / "export_report.json").read_text()) == report
    assert report["compacted"] and report["widths_before"] == [128, 64]
    assert report["storage"] == ["sparse", "sparse", "dense"]
    assert report["test_acc_after"] == report["test_acc_before"] and report["max_abs_logit_diff"] < 1e-4
    assert report["bytes_after"] < 1.01 * report["bytes_before"]
    assert all(report[f"latency_ms_batch{b}_{w}"] > 0 for b in (1, 256) for w in ("before", "after"))
    assert isinstance(load_exported(out).layers[0], SparseLinear)
