"""Merge jobs on files: edgetune's flat job format, mergekit's YAML, side files, bad input before any output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgetune.core.errors import ConfigError
from edgetune.merging import merge_state_dicts
from edgetune.merging.job import load_job, run_merge
from edgetune.merging.mergekit import from_mergekit


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(6, 5, generator=g), "layer.bias": torch.randn(6, generator=g),
            "bn.num_batches_tracked": torch.tensor(3)}


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A Hugging Face-like base folder (config + tokenizer files) and two fine-tune files."""
    base = tmp_path / "base"
    base.mkdir()
    save_file(_sd(0), str(base / "model.safetensors"))
    (base / "config.json").write_text('{"model_type": "toy"}')
    (base / "tokenizer.json").write_text("{}")
    out = {"base": base}
    for i in (1, 2):
        p = tmp_path / f"ft{i}.safetensors"
        save_file(_sd(i), str(p))
        out[f"ft{i}"] = p
    return out


def _job(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_flat_job_streams_the_same_merge_as_in_memory(tmp_path, models):
    job = load_job(_job(tmp_path, {"method": "ties", "density": 0.4, "base": str(models["base"]),
                                   "models": [{"model": str(models["ft1"]), "weight": 1},
                                              {"model": str(models["ft2"]), "weight": 0.5}],
                                   "output": str(tmp_path / "out")}))
    assert job.weighted_config().weights == [1.0, 0.5]
    rep = run_merge(job)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = merge_state_dicts([_sd(1), _sd(2)], {"method": "ties", "density": 0.4, "weights": [1.0, 0.5]}, base=_sd(0))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert rep.tensors == 3
    # the reference model's side files come along; the recipe is in the metadata and in merge.json
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "toy"}'
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    info = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert info["method"]["method"] == "ties" and info["method"]["density"] == 0.4
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "ties" in f.metadata()["edgetune.merge"]


def test_per_model_weights_and_overrides(tmp_path, models):
    job = load_job(_job(tmp_path, {"method": "linear", "models": [{"model": str(models["ft1"]), "weight": 3},
                                                                   {"model": str(models["ft2"]), "weight": 1}],
                                   "output": str(tmp_path / "x.safetensors")}), overrides=["normalize=false"])
    assert job.weighted_config().weights == [3.0, 1.0]
    run_merge(job)
    got = load_file(str(tmp_path / "x.safetensors"))
    torch.testing.assert_close(got["layer.weight"], 3 * _sd(1)["layer.weight"] + _sd(2)["layer.weight"])


@pytest.mark.parametrize(("data", "match"), [
    ({"method": "ties", "models": ["A", "B"]}, "needs a base model"),
    ({"method": "linear", "models": ["A", "B"], "weights": [1.0]}, "weights has 1 entries for 2 models"),
    ({"method": "ties", "density": 1.5, "models": ["A", "B"], "base": "BASE"}, "density"),
    ({"method": "linear", "models": [{"model": "A", "weight": 1}, "B"]}, "some models have a weight"),
    ({"method": "linear", "models": ["A", "MISSING"]}, "does not exist"),
    ({"method": "tiess", "models": ["A", "B"]}, "Did you mean"),
])
def test_bad_jobs_leave_no_output(tmp_path, models, data, match):
    paths = {"A": str(models["ft1"]), "B": str(models["ft2"]), "BASE": str(models["base"]),
             "MISSING": str(tmp_path / "nope.safetensors")}
    data = {**data, "models": [({**m, "model": paths[m["model"]]} if isinstance(m, dict) else paths[m])
                               for m in data["models"]]}
    if "base" in data:
        data["base"] = paths[data["base"]]
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        run_merge(load_job(_job(tmp_path, {**data, "output": str(out)})))
    assert not out.exists()


def test_shape_mismatch_named_before_writing(tmp_path, models):
    other = _sd(3)
    other["layer.weight"] = torch.zeros(6, 4)
    save_file(other, str(tmp_path / "bad.safetensors"))
    job = load_job(_job(tmp_path, {"method": "linear", "models": [str(models["ft1"]), str(tmp_path / "bad.safetensors")],
                                   "output": str(tmp_path / "o.safetensors")}))
    with pytest.raises(ConfigError, match="layer.weight"):
        run_merge(job)
    assert not (tmp_path / "o.safetensors").exists()


def test_truncated_input_is_a_clear_error_and_no_output(tmp_path, models):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(models["ft2"].read_bytes()[:-20])
    job = load_job(_job(tmp_path, {"method": "linear", "models": [str(models["ft1"]), str(cut)],
                                   "output": str(tmp_path / "o.safetensors")}))
    with pytest.raises(Exception, match="cut.safetensors") as err:
        run_merge(job)
    assert "Traceback" not in str(err.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_job_without_output_says_how(tmp_path, models):
    with pytest.raises(ConfigError, match="--out"):
        load_job(_job(tmp_path, {"method": "linear", "models": [str(models["ft1"])]}))


# ------------------------------------------------------------------------------------------------ mergekit
def test_mergekit_ties_maps_to_edgetune(models):
    cfg = {"merge_method": "ties", "base_model": str(models["base"]),
           "models": [{"model": str(models["base"])},  # mergekit lists the base too; it is not merged
                      {"model": str(models["ft1"]), "parameters": {"density": 0.5, "weight": 0.7}},
                      {"model": str(models["ft2"]), "parameters": {"density": 0.5, "weight": 0.3}}],
           "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16"}
    out = from_mergekit(cfg)
    assert out == {"method": "ties", "base": str(models["base"]), "weights": [0.7, 0.3], "density": 0.5,
                   "disjoint_mean": True, "dtype": "bfloat16", "models": [str(models["ft1"]), str(models["ft2"])]}


def test_mergekit_defaults_follow_mergekit(models):
    ft = [{"model": str(models["ft1"]), "parameters": {"weight": 1.0}},
          {"model": str(models["ft2"]), "parameters": {"weight": 3.0}}]
    ta = from_mergekit({"merge_method": "task_arithmetic", "base_model": str(models["base"]), "models": ft,
                        "parameters": {"normalize": True, "lambda": 0.5}})
    assert ta["weights"] == [0.25, 0.75] and ta["scaling"] == 0.5
    ties = from_mergekit({"merge_method": "ties", "base_model": str(models["base"]), "models": ft})
    assert ties["density"] == 1.0 and ties["disjoint_mean"] is True  # mergekit's defaults, not the paper's 0.2
    dt = from_mergekit({"merge_method": "dare_ties", "base_model": str(models["base"]), "models": ft})
    assert dt["method"] == "dare" and dt["combine"] == "ties" and dt["disjoint_mean"] is False
    bc = from_mergekit({"merge_method": "breadcrumbs", "base_model": str(models["base"]),
                        "models": [{"model": m["model"], "parameters": {"weight": 1, "density": 0.9, "gamma": 0.02}}
                                   for m in ft]})
    assert bc["density"] == 0.9 and bc["beta"] == 0.02
    lin = from_mergekit({"merge_method": "linear", "models": ft})
    assert lin["normalize"] is True and lin["weights"] == [1.0, 3.0]


def test_mergekit_file_runs_through_load_job(tmp_path, models):
    cfg = {"merge_method": "linear", "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1}},
                                                {"model": str(models["ft2"]), "parameters": {"weight": 1}}]}
    job = load_job(_job(tmp_path, cfg), output=tmp_path / "m.safetensors")
    run_merge(job)
    got = load_file(str(tmp_path / "m.safetensors"))
    torch.testing.assert_close(got["layer.bias"], (_sd(1)["layer.bias"] + _sd(2)["layer.bias"]) / 2)


@pytest.mark.parametrize(("change", "match"), [
    ({"merge_method": "slerp"}, "not supported by edgetune.*linear"),
    ({"slices": []}, "slices"),
    ({"tokenizer_source": "union"}, "tokenizer_source"),
    ({"parameters": {"epsilon": 0.1}}, "'epsilon' is not supported for ties"),
    ({"models_x": []}, "unknown key 'models_x'"),
    ({"chat_template": "chatml"}, "chat_template"),
])
def test_mergekit_unsupported_keys_are_named(models, change, match):
    cfg = {"merge_method": "ties", "base_model": str(models["base"]),
           "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1, "density": 0.5}}], **change}
    with pytest.raises(ConfigError, match=match):
        from_mergekit(cfg)


def test_mergekit_per_model_values_edgetune_cannot_take(models):
    base = str(models["base"])
    differ = {"merge_method": "ties", "base_model": base,
              "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1, "density": 0.5}},
                         {"model": str(models["ft2"]), "parameters": {"weight": 1, "density": 0.3}}]}
    with pytest.raises(ConfigError, match="density differs between models"):
        from_mergekit(differ)
    gradient = {"merge_method": "ties", "base_model": base,
                "models": [{"model": str(models["ft1"]), "parameters": {"weight": [0, 0.5, 1]}}]}
    with pytest.raises(ConfigError, match="gradient"):
        from_mergekit(gradient)
    hub = {"merge_method": "linear", "models": [{"model": "org/some-model", "parameters": {"weight": 1}}]}
    with pytest.raises(ConfigError, match="downloads nothing"):
        from_mergekit(hub)


def test_whole_model_method_runs_in_memory(tmp_path):
    """re-basin needs every tensor at once: the job merges in memory (stream_merge refuses it) with the same result."""
    from edgetune.merging import stream_merge
    from edgetune.merging.base import merger_for
    from edgetune.models.mlp import MLP

    sds = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sd = MLP(in_features=12, num_classes=3, widths=[16, 16]).state_dict()
        p = tmp_path / f"m{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        sds.append((p, sd))
    job = load_job(_job(tmp_path, {"method": "rebasin", "models": [str(p) for p, _ in sds],
                                   "output": str(tmp_path / "rb.safetensors")}))
    rep = run_merge(job)
    got = load_file(str(rep.out_path))
    want = merge_state_dicts([sd for _, sd in sds], {"method": "rebasin"})
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match="cannot stream"):
        stream_merge([str(p) for p, _ in sds], merger_for({"method": "rebasin"}), tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def test_mergekit_linear_averages_the_base_and_breadcrumbs_cuts_gamma(models):
    """Found by running mergekit side by side (scripts/compare_mergekit.py): mergekit's linear averages a listed
    base_model like any model and refuses an unlisted one; breadcrumbs removes fewer outliers when density + gamma
    pass 1."""
    base = str(models["base"])
    ft = [{"model": str(models["ft1"]), "parameters": {"weight": 1.0}}]
    lin = from_mergekit({"merge_method": "linear", "base_model": base,
                         "models": [{"model": base, "parameters": {"weight": 1.0}}, *ft]})
    assert lin["models"] == [base, str(models["ft1"])] and "base" not in lin and lin["weights"] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="needs a weight"):
        from_mergekit({"merge_method": "linear", "base_model": base, "models": ft})
    bc = from_mergekit({"merge_method": "breadcrumbs", "base_model": base,
                        "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1, "density": 0.995}}]})
    assert bc["density"] == 0.995 and abs(bc["beta"] - 0.005) < 1e-12


def test_output_onto_an_input_and_late_buffer_mismatch_are_refused_up_front(tmp_path, models):
    """Review findings: writing over an input is refused; differing integer buffers are found before any output
    (and no empty output folder stays)."""
    with pytest.raises(ConfigError, match="one of the inputs"):
        run_merge(load_job(_job(tmp_path, {"method": "linear", "models": [str(models["ft1"]), str(models["ft2"])],
                                           "output": str(models["ft2"])})))
    assert torch.equal(load_file(str(models["ft2"]))["layer.weight"], _sd(2)["layer.weight"])
    odd = _sd(4)
    odd["pos_ids"] = torch.arange(3)
    good = _sd(5)
    good["pos_ids"] = torch.arange(3) + 1
    save_file(odd, str(tmp_path / "o.safetensors"))
    save_file(good, str(tmp_path / "g.safetensors"))
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="pos_ids"):
        run_merge(load_job(_job(tmp_path, {"method": "linear", "models": [str(tmp_path / "o.safetensors"),
                                                                         str(tmp_path / "g.safetensors")],
                                           "output": str(out)})))
    assert not out.exists()


def test_review_fixes_mergekit_globals_stale_shards_and_running_var(tmp_path, models):
    """mergekit's global `parameters: {density}` is a default for every model; an output folder holding another
    model's shards is refused; a merge that drives batch-norm running variances negative clamps them at 0."""
    base = str(models["base"])
    ft = [{"model": str(models["ft1"]), "parameters": {"weight": 1}},
          {"model": str(models["ft2"]), "parameters": {"weight": 1, "density": 0.5}}]
    with pytest.raises(ConfigError, match="density differs"):  # 0.3 by default for ft1, 0.5 given for ft2
        from_mergekit({"merge_method": "ties", "base_model": base, "models": ft, "parameters": {"density": 0.3}})
    out = from_mergekit({"merge_method": "ties", "base_model": base, "models": ft, "parameters": {"density": 0.5}})
    assert out["density"] == 0.5
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ConfigError, match="other weights"):
        run_merge(load_job(_job(tmp_path, {"method": "linear", "models": [str(models["ft1"])], "output": str(folder)})))
    var = {"bn.running_var": torch.tensor([1.0, 1.0])}
    merged = merge_state_dicts([{"bn.running_var": torch.tensor([3.0, 1.5])}], {"method": "task_arithmetic",
                                                                              "weights": [-1.0]}, base=var)
    assert torch.equal(merged["bn.running_var"], torch.tensor([0.0, 0.5]))
