"""Model sources: architecture + weight file, a finished run folder, freezing by pattern, features, one source."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgetune import runner
from edgetune.core.config import validate
from edgetune.core.errors import CheckpointError, ConfigError, EdgetuneError
from edgetune.core.freeze import set_trainable_
from edgetune.models.base import ModelSpec, build_model
from edgetune.pipeline.sources import load_model_source
from edgetune.recipe import ModelSection, load_recipe

CPU = torch.device("cpu")
DIGITS = ModelSpec(input_shape=(1, 8, 8), num_classes=10, task="classification")


def section(**kw) -> ModelSection:
    return validate(ModelSection, kw)


def recipe(tmp_path, model=None, train=None, data=None, **top):
    base = {"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"), "data": data or {"name": "digits"},
            "model": model or {"name": "mlp", "widths": [32]},
            "train": {"epochs": 2, "batch_size": 64, "progress": False, "optimizer": {"name": "adam", "lr": 0.01},
                      **(train or {})}}
    base.update(top)
    return load_recipe(base)


def go(cfg, folder):
    return runner.run(cfg, folder, write_report=False).summary


def x_batch(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(11))


# ---------------------------------------------------------------------------------- weights file
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_architecture_with_weights_file_predicts_like_the_saved_model(tmp_path, fmt):
    torch.manual_seed(5)
    ref = build_model("mlp", {"widths": [32]}, DIGITS).eval()
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save(ref.state_dict(), path)
    else:
        save_file(ref.state_dict(), str(path))
    torch.manual_seed(99)  # a different init: only the file can make them equal
    loaded = load_model_source(section(name="mlp", widths=[32], weights=str(path)), DIGITS, CPU)
    assert str(path) in loaded.source and loaded.head == "head"
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x_batch()), ref(x_batch()))


def test_weights_through_a_recipe_evaluate_the_saved_model(tmp_path):
    trained = go(recipe(tmp_path), tmp_path / "a")
    w = tmp_path / "a" / "model.safetensors"
    out = go(recipe(tmp_path, model={"name": "mlp", "widths": [32], "weights": str(w)}, step="evaluate"), tmp_path / "b")
    assert out["steps"] == 0
    assert out["test_acc"] == trained["test_acc"] and out["test_loss"] == pytest.approx(trained["test_loss"])
    assert str(w) in out["model_source"]


def test_weights_with_wrong_keys_or_shapes_name_them(tmp_path):
    torch.manual_seed(0)
    state = build_model("mlp", {"widths": [32]}, DIGITS).state_dict()
    bad_key = dict(state)
    bad_key["layers.0.extra"] = bad_key.pop("layers.0.bias")
    save_file(bad_key, str(tmp_path / "keys.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model_source(section(name="mlp", widths=[32], weights=str(tmp_path / "keys.safetensors")), DIGITS, CPU)
    assert "layers.0.bias" in str(err.value) and "layers.0.extra" in str(err.value)
    wide = build_model("mlp", {"widths": [48]}, DIGITS).state_dict()
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model_source(section(name="mlp", widths=[32], weights=str(tmp_path / "wide.safetensors")), DIGITS, CPU)
    assert "layers.0.weight" in str(err.value) and "(48, 64)" in str(err.value) and "(32, 64)" in str(err.value)
    with pytest.raises(EdgetuneError):
        load_model_source(section(name="mlp", widths=[32], weights=str(tmp_path / "nope.pt")), DIGITS, CPU)


# ------------------------------------------------------------------------------------- from: RUN_DIR
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("src")
    summary = go(recipe(tmp), tmp / "run")
    return tmp / "run", summary


def _mlp_from_file(folder, num_classes=10):
    m = build_model("mlp", {"widths": [32]}, ModelSpec((1, 8, 8), num_classes)).eval()
    m.load_state_dict(load_file(str(folder / "model.safetensors")))
    return m


def test_from_run_dir_reloads_the_trained_model(finished_run, tmp_path):
    folder, summary = finished_run
    loaded = load_model_source(section(**{"from": str(folder)}), DIGITS, CPU)
    ref = _mlp_from_file(folder)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x_batch()), ref(x_batch()))
    assert not loaded.notes  # same classes: the head is kept
    out = go(recipe(tmp_path, model={"from": str(folder)}, step="evaluate"), tmp_path / "e")
    assert out["test_acc"] == summary["test_acc"]


def test_from_run_dir_refits_the_head_for_new_classes(finished_run, tmp_path):
    folder, _ = finished_run
    spec4 = ModelSpec((1, 8, 8), 4, "classification")
    loaded = load_model_source(section(**{"from": str(folder)}), spec4, CPU, generator=torch.Generator().manual_seed(0))
    ref = _mlp_from_file(folder)
    model = loaded.model
    assert model.head.out_features == 4 and model.head.in_features == 32
    assert torch.equal(model.layers[0].weight, ref.layers[0].weight)  # the backbone is the trained one
    assert any("10 -> 4" in n for n in loaded.notes)
    glyphs = {"name": "synglyph", "options": {"num_classes": 4, "size": 8, "train_per_class": 40, "test_per_class": 10}}
    out = go(recipe(tmp_path, model={"from": str(folder)}, data=glyphs), tmp_path / "g")
    assert out["steps"] > 0 and 0.0 <= out["test_acc"] <= 1.0
    assert any("10 -> 4" in n for n in out["model_notes"])
    assert load_file(str(tmp_path / "g" / "model.safetensors"))["head.weight"].shape == (4, 32)


def test_from_a_missing_or_non_run_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_source(section(**{"from": str(tmp_path / "missing")}), DIGITS, CPU)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="not a finished run folder"):
        load_model_source(section(**{"from": str(tmp_path / "plain")}), DIGITS, CPU)
    with pytest.raises(ConfigError, match="does not exist"):
        go(recipe(tmp_path, model={"from": str(tmp_path / "missing")}), tmp_path / "r")


# ------------------------------------------------------------------------------------------- freezing
def _initial_weights(tmp_path, model=None):
    """The model a recipe starts from (an evaluate step saves it untrained)."""
    go(recipe(tmp_path, model=model, step="evaluate"), tmp_path / "init")
    return load_file(str(tmp_path / "init" / "model.safetensors"))


@pytest.mark.parametrize(("patterns", "trained"), [
    (["head"], {"head.weight", "head.bias"}),
    (["layers.1.*", "head.*"], {"layers.1.weight", "layers.1.bias", "head.weight", "head.bias"}),
    (["*.bias"], {"layers.0.bias", "layers.1.bias", "head.bias"}),
    (["re:^layers\\.0\\."], {"layers.0.weight", "layers.0.bias"}),
])
def test_trainable_patterns_freeze_the_rest(tmp_path, patterns, trained):
    model = {"name": "mlp", "widths": [32, 16]}
    init = _initial_weights(tmp_path, model)
    out = go(recipe(tmp_path, model=model, train={"trainable": patterns}), tmp_path / "run")
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    for k in init:
        assert torch.equal(init[k], final[k]) == (k not in trained), k
    assert out["trainable_parameters"] == sum(init[k].numel() for k in trained)
    # requires_grad as set by the same call on a fresh model
    m = build_model("mlp", {"widths": [32, 16]}, DIGITS)
    assert set(set_trainable_(m, patterns, head="head")) == trained
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trained


def test_a_pattern_that_matches_nothing_is_named(tmp_path):
    m = build_model("mlp", {"widths": [32]}, DIGITS)
    with pytest.raises(ConfigError, match="encoder"):
        set_trainable_(m, ["head", "encoder.*"], head="head")
    assert all(p.requires_grad for p in m.parameters())  # nothing changed before the error
    with pytest.raises(ConfigError, match="lyers"):
        go(recipe(tmp_path, train={"trainable": ["lyers.0.*"]}), tmp_path / "run")


def test_features_task_trains_only_the_head(tmp_path):
    init = _initial_weights(tmp_path)
    out = go(recipe(tmp_path, model={"name": "mlp", "widths": [32], "task": "features"}), tmp_path / "run")
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert torch.equal(init["layers.0.weight"], final["layers.0.weight"])
    assert not torch.equal(init["head.weight"], final["head.weight"])
    assert out["trainable_parameters"] == 32 * 10 + 10 and out["task"] == "classification"


# ------------------------------------------------------------------------------------------ one source
@pytest.mark.parametrize("model", [
    {"name": "mlp", "from": "runs/x"},
    {"from": "runs/x", "hf": "some/folder"},
    {"name": "mlp", "hf": "some/folder"},
    {"hf": "some/folder", "weights": "w.safetensors"},
    {"from": "runs/x", "weights": "w.safetensors"},
])
def test_two_sources_at_once_are_a_config_error(tmp_path, model):
    with pytest.raises(ConfigError, match="source|weights go with"):
        recipe(tmp_path, model=model)


def test_loading_a_run_folder_leaves_the_global_rng_to_the_caller(finished_run):
    folder, _ = finished_run
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        load_model_source(section(**{"from": str(folder)}), DIGITS, CPU)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
