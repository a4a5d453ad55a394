"""Lazily-read models to merge: safetensors files, Hugging Face folders (single and sharded), edgetune run
folders (a real staged run), state dicts; clear errors for missing, cut, garbage and pickle files; header-only
compatibility checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.merging.sources import TensorInfo, TensorSource, check_compatible, open_source


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.randn(6, 4, generator=g),
        "layer.0.bias": torch.randn(6, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(6, generator=g).half(),
        "norm.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "head.weight": torch.randn(3, 6, generator=g),
    }


def write_sharded(folder: Path, sd: dict[str, torch.Tensor], shards: list[list[str]]) -> None:
    """The layout transformers' save_pretrained writes for a sharded model (names, index format)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k] for k in names}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        total += sum(sd[k].numel() * sd[k].element_size() for k in names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text("{}")


def assert_same(src: TensorSource, sd: dict[str, torch.Tensor]) -> None:
    assert sorted(src.keys()) == sorted(sd)
    for k, v in sd.items():
        assert src.shape(k) == tuple(v.shape) and src.dtype(k) == v.dtype
        got = src.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k
    assert src.nbytes == sum(v.numel() * v.element_size() for v in sd.values())


# ---------------------------------------------------------------------------------- files and folders
def test_safetensors_file_reads_headers_then_one_tensor_at_a_time(tmp_path):
    sd = state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "note": "x"})
    with open_source(path) as src:
        assert_same(src, sd)
        assert src.metadata == {"format": "pt", "note": "x"}
        assert src.files == (path,)
        offsets = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
        offsets.pop("__metadata__")
        assert src.keys() == sorted(offsets, key=lambda k: offsets[k]["data_offsets"][0])  # storage order
        with pytest.raises(KeyError, match="layer.0.weight"):
            src.shape("layer.0.weigth")
    with pytest.raises(ValueError, match="closed"):
        src.get("head.weight")


def test_each_read_is_a_fresh_tensor_that_an_in_place_change_does_not_reach(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(state(), str(path))
    with open_source(path) as src:
        first = src.get("layer.0.weight")
        first.add_(1.0)  # a merge method that works in place must not change what the next read returns
        assert torch.equal(src.get("layer.0.weight"), state()["layer.0.weight"])


def test_hf_folder_with_one_file_and_sharded_folder_with_index(tmp_path):
    sd = state(1)
    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, str(single / "model.safetensors"))
    (single / "config.json").write_text("{}")
    with open_source(str(single)) as src:
        assert_same(src, sd)
    sharded = tmp_path / "sharded"
    write_sharded(sharded, sd, [["layer.0.weight", "layer.0.bias"], ["norm.weight", "norm.num_batches_tracked",
                                                                      "head.weight"]])
    with open_source(sharded) as src:
        assert_same(src, sd)
        assert [p.name for p in src.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert set(src.keys()[:2]) == {"layer.0.weight", "layer.0.bias"}  # shard by shard
        assert src.metadata == {"format": "pt"}
    with open_source(sharded / "model.safetensors.index.json") as src:  # the index file itself
        assert_same(src, sd)


def test_sharded_folder_missing_shard_or_mismatched_index_is_refused(tmp_path):
    sd = state()
    folder = tmp_path / "hf"
    write_sharded(folder, sd, [["layer.0.weight", "layer.0.bias"], ["norm.weight", "norm.num_batches_tracked",
                                                                     "head.weight"]])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["head.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"head\.weight.*model-00001-of-00002.*copy the folder again"):
        open_source(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing.*model-00002-of-00002\.safetensors.*incomplete"):
        open_source(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        open_source(folder)


def test_state_dict_and_module_sources():
    sd = state(2)
    with open_source(sd) as src:
        assert src.keys() == list(sd)  # insertion order
        assert_same(src, sd)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    src = open_source(model)
    assert src.keys() == list(model.state_dict()) and src.dtype("1.num_batches_tracked") == torch.int64
    assert open_source(src) is src
    with pytest.raises(ConfigError, match="'w' holds a list"):
        open_source({"w": [1, 2]})


# ---------------------------------------------------------------------------------- run folders
@pytest.fixture(scope="module")
def staged_run(tmp_path_factory) -> Path:
    """A real two-stage run (base, then tuned from it), written by the runner in a few seconds."""
    from edgetune import runner
    from edgetune.recipe import load_recipe

    root = tmp_path_factory.mktemp("merging-runs")
    recipe = load_recipe({
        "name": "merge-src", "seed": 0, "output_dir": str(root / "runs"), "data": {"name": "digits"},
        "model": {"name": "mlp", "widths": [16]},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 64, "progress": False, "num_threads": 1,
                  "optimizer": {"name": "adam", "lr": 0.01}},
        "stages": [{"name": "base"}, {"name": "tuned", "model": {"from": "stage:base"}}],
    })
    runner.run(recipe, root / "run", write_report=False)
    return root / "run"


def test_run_folder_gives_last_stage_or_the_stage_asked_for(staged_run):
    tuned = load_file(str(staged_run / "stages" / "tuned" / "model.safetensors"))
    base = load_file(str(staged_run / "stages" / "base" / "model.safetensors"))
    assert any(not torch.equal(tuned[k], base[k]) for k in tuned)
    with open_source(staged_run) as src:
        assert src.files == (staged_run / "stages" / "tuned" / "model.safetensors",)
        assert_same(src, tuned)
        assert src.metadata == {"format": "edgetune-model"}
    with open_source(staged_run / "stages" / "base") as src:  # a stage folder is itself a run folder
        assert_same(src, base)


def test_unfinished_staged_run_is_ambiguous_and_lists_its_stages(staged_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(staged_run, copy)
    (copy / "summary.json").unlink()  # written only when every stage has finished
    (copy / "stages" / "tuned" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"ambiguous.*with weights: base; without: tuned.*stages/NAME.*--resume"):
        open_source(copy)
    with pytest.raises(ConfigError, match=r"did not finish.*edgetune run --resume"):
        open_source(copy / "stages" / "tuned")  # config.yaml and checkpoints/, no model yet


# ---------------------------------------------------------------------------------- errors
def test_missing_path_names_it_and_the_near_miss(tmp_path):
    save_file(state(), str(tmp_path / "model-a.safetensors"))
    with pytest.raises(ConfigError, match=r"model-b\.safetensors does not exist.*model-a\.safetensors"):
        open_source(tmp_path / "model-b.safetensors")
    with pytest.raises(ConfigError, match=r"'nope' does not"):
        open_source(tmp_path / "nope" / "deeper" / "m.safetensors")


def test_truncated_and_garbage_files_say_what_and_what_to_do(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(state(), str(good))
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is not a readable safetensors file \(truncated or "
                                              r"corrupt: .*\); copy or download it again, or re-export"):
        open_source(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors is not a readable safetensors file"):
        open_source(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors"):
        open_source(empty)
    other = tmp_path / "notes.txt"
    other.write_text("hello " * 100)
    with pytest.raises(CheckpointError, match=r"notes\.txt is not a safetensors file"):
        open_source(other)


def test_pickle_checkpoints_are_refused_with_the_conversion(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save(state(), pt)
    with pytest.raises(CheckpointError, match=r"model\.pt is a PyTorch pickle.*only safetensors.*save_file"):
        open_source(pt)
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(pt, hf / "pytorch_model.bin")
    (hf / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds pytorch_model\.bin, a PyTorch pickle.*save_pretrained"):
        open_source(hf)


def test_folder_without_weights_lists_what_is_there(tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    save_file(state(), str(folder / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"no model weights.*adapter_model\.safetensors, config\.json, "
                                          r"tokenizer\.json.*give the file itself"):
        open_source(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="it is empty"):
        open_source(empty)


# ---------------------------------------------------------------------------------- compatibility
def header_only(sd: dict[str, torch.Tensor], name: str) -> TensorSource:
    """A source that knows names and shapes but fails if any tensor is read."""
    infos = {k: TensorInfo(tuple(v.shape), v.dtype, v.numel() * v.element_size()) for k, v in sd.items()}

    def fetch(key: str) -> torch.Tensor:
        raise AssertionError(f"check_compatible read {key}")

    return TensorSource(name, infos, fetch)


def test_check_compatible_reads_no_tensor_and_names_the_first_mismatches():
    a = state()
    check_compatible([header_only(a, "a"), header_only(state(1), "b")], base=header_only(state(2), "base"))
    b = dict(a)
    del b["head.weight"]
    b["extra.bias"] = torch.zeros(2)
    b["layer.0.weight"] = torch.zeros(6, 5)
    b["norm.weight"] = b["norm.weight"].float()  # dtypes may differ
    with pytest.raises(ConfigError) as err:
        check_compatible([header_only(a, "a"), header_only(b, "b")])
    msg = str(err.value)
    assert "model 1 (b) lacks 1 tensor(s) of model 0: head.weight" in msg
    assert "model 1 (b) has 1 tensor(s) model 0 lacks: extra.bias" in msg
    assert "'layer.0.weight' is (6, 4) in model 0 but (6, 5) in model 1 (b)" in msg
    assert "norm.weight" not in msg
    with pytest.raises(ConfigError, match=r"the base \(base\) lacks 1 tensor\(s\) of model 0: head\.weight"):
        check_compatible([header_only(a, "a")], base=header_only({k: v for k, v in a.items() if k != "head.weight"},
                                                                  "base"))
    many = {f"w{i}": torch.zeros(1) for i in range(9)}
    with pytest.raises(ConfigError, match=r"lacks 9 tensor\(s\) of model 0: w0, w1, w2, w3, w4 \(and 4 more\)"):
        check_compatible([header_only(many, "a"), header_only({}, "b")])
    with pytest.raises(ConfigError, match="at least one"):
        check_compatible([])
