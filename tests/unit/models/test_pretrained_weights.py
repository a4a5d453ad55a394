"""Weight files: safetensors/torch round trips, wrappers, and mismatch messages that name keys and shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from edgetune.core.errors import CheckpointError
from edgetune.models.pretrained.weights import load_weight_file, load_weights_into


def _net(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "wrapped", "ddp"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    src = _net()
    state = src.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pt":
        torch.save(state, path)
    elif fmt == "wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    assert sorted(load_weight_file(path)) == sorted(state)
    dst = _net()
    assert not torch.equal(dst[0].weight, src[0].weight)
    assert load_weights_into(dst, path) is dst
    _assert_same(src, dst)


def test_safetensors_detected_without_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    save_file({"a": torch.arange(6.0).view(2, 3)}, str(path))
    assert torch.equal(load_weight_file(path)["a"], torch.arange(6.0).view(2, 3))


def test_key_mismatch_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    state = _net().state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["2.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_weights_into(_net(), path)
    msg = str(err.value)
    assert "2.bias" in msg and "missing" in msg
    assert "extra.weight" in msg and "not in the model" in msg
    assert "strict=False" in msg


def test_non_strict_skips_names_but_not_shapes(tmp_path: Path) -> None:
    src = _net()
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("2.")}
    dst = load_weights_into(_net(), state, strict=False)
    assert torch.equal(dst[0].weight, src[0].weight)
    bad = dict(state, **{"0.weight": torch.zeros(8, 5)})
    with pytest.raises(CheckpointError, match="differ in shape"):
        load_weights_into(_net(), bad, strict=False)


def test_shape_mismatch_names_shapes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_net(out=10).state_dict(), str(path))
    with pytest.raises(CheckpointError) as err:
        load_weights_into(_net(out=3), path)
    msg = str(err.value)
    assert "2.weight (file (10, 8) vs model (3, 8))" in msg
    assert "2.bias (file (10,) vs model (3,))" in msg
    assert "0.weight" not in msg  # only the offending tensors are listed


def test_long_lists_are_cut(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])
    with pytest.raises(CheckpointError, match=r"20 model tensors are missing.*\(and 15 more\)"):
        load_weights_into(model, {})


class _Evil:
    """Pickles to a call that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))  # type: ignore[return-value]


def test_pickle_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed.txt"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load .*evil.pt.*more than tensors"):
        load_weight_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "kind", ["truncated_pt", "truncated_safetensors", "garbage", "missing", "not_a_dict"]
)
def test_unreadable_files_give_one_message(tmp_path: Path, kind: str) -> None:
    path = tmp_path / ("w.safetensors" if "safetensors" in kind else "w.pt")
    if kind == "truncated_pt":
        torch.save(_net().state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "truncated_safetensors":
        save_file(_net().state_dict(), str(path))
        path.write_bytes(path.read_bytes()[:-40])
    elif kind == "garbage":
        path.write_bytes(b"this is not a weight file at all" * 10)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError) as err:
        load_weight_file(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)
