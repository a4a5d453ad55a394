import numpy as np
import torch

from edgetune.core.state import atomic_write_bytes, load_tensors, save_tensors, sha256_file
from edgetune.core.tree import join_tensors, split_tensors


def test_split_join_round_trip_keeps_int_keys_tuples_and_arrays():
    obj = {"state": {0: {"m": torch.arange(3.0), "step": 5}}, "groups": [{"lr": 0.1, "params": [0]}],
           "rng": ("MT", np.arange(4, dtype=np.uint32), 1, 0.5), "none": None}
    tensors: dict = {}
    tree = split_tensors(obj, "s", tensors)
    back = join_tensors(tree, tensors)
    assert list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["m"], torch.arange(3.0))
    assert isinstance(back["rng"], tuple) and np.array_equal(back["rng"][1], np.arange(4))
    assert back["groups"] == [{"lr": 0.1, "params": [0]}] and back["none"] is None


def test_atomic_write_leaves_no_temp_files_and_hash_matches(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"hello")
    assert (tmp_path / "a.bin").read_bytes() == b"hello"
    sha = save_tensors({"w": torch.ones(2, 2)}, tmp_path / "t.safetensors")
    assert sha == sha256_file(tmp_path / "t.safetensors")
    assert torch.equal(load_tensors(tmp_path / "t.safetensors")["w"], torch.ones(2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "t.safetensors"]
