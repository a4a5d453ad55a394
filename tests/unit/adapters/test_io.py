"""Adapter files in PEFT's format (edgetune alone; tests/integration/test_peft_interop.py checks them against PEFT).

Key mapping and alpha choice as pure functions, round trips on tiny models (linear, conv2d, grouped conv2d,
embedding, per-layer ranks, every registered method through ``as_lora()``), and every refused file leaving the
model exactly as it was.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from edgetune.adapters import (
    ADAPTERS,
    AdapterConfig,
    LoraConfig,
    adapter_configs,
    adapter_layers,
    add_adapter_,
)
from edgetune.adapters.io import load_adapter_, save_adapter
from edgetune.adapters.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    alpha_for_scale,
    collapse_grouped,
    expand_grouped,
    parse_peft_key,
    pattern_key,
    pattern_value,
    peft_key,
    peft_target_modules,
)
from edgetune.core.errors import CheckpointError, ConfigError, ShapeError

# the other adapter methods register themselves on import; whichever exist are exported through as_lora()
for _m in ("dora", "asymmetric", "chain", "dylora", "sora", "lora_fa", "rac_lora"):
    try:
        importlib.import_module(f"edgetune.adapters.{_m}")
    except ImportError:
        pass


class Tiny(nn.Module):
    """Embedding -> two linears, and a conv stack with a grouped conv: every kind an adapter sits on."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, width, padding_idx=0)
        self.block = nn.Sequential(nn.Linear(width, 5), nn.ReLU(), nn.Linear(5, 4))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gconv = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, ids: Tensor, img: Tensor) -> Tensor:
        text = self.block(self.emb(ids)).sum(1)  # (B, 4)
        return text + self.gconv(self.conv(img)).mean((2, 3))  # (B, 4)


ALL_KINDS = ["linear", "conv2d", "embedding"]


def _inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 10, (2, 5), generator=g), torch.randn(2, 3, 8, 8, generator=g)


def _pair(seed: int = 0, width: int = 6) -> tuple[Tiny, Tiny]:
    torch.manual_seed(seed)
    a = Tiny(width).eval()
    b = Tiny(width).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def _randomize(model: nn.Module, name: str = "default") -> None:
    """Every adapter tensor random (B non-zero), so a wrong mapping changes the output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, lay in adapter_layers(model):
            for p in lay.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "types": [(n, type(m).__name__) for n, m in model.named_modules()],
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "adapters": dict(adapter_configs(model))}


def _assert_unchanged(model: nn.Module, snap: dict[str, Any]) -> None:
    now = _snapshot(model)
    assert now["types"] == snap["types"] and now["grad"] == snap["grad"] and now["adapters"] == snap["adapters"]
    assert now["state"].keys() == snap["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in snap["state"].items())


def _write(folder: Path, conf: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(conf))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def _peft_conf(**over: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0", "2"], "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, **over}


def _linear_tensors(r: int = 2, width: int = 6) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"base_model.model.block.0.lora_A.weight": torch.randn(r, width, generator=g),
            "base_model.model.block.0.lora_B.weight": torch.randn(5, r, generator=g),
            "base_model.model.block.2.lora_A.weight": torch.randn(r, 5, generator=g),
            "base_model.model.block.2.lora_B.weight": torch.randn(4, r, generator=g)}


# --- pure functions ------------------------------------------------------------------------------------------


def test_keys_map_both_ways() -> None:
    assert peft_key("block.0", "linear", "A") == "base_model.model.block.0.lora_A.weight"
    assert peft_key("conv", "conv2d", "B") == "base_model.model.conv.lora_B.weight"
    assert peft_key("emb", "embedding", "A") == "base_model.model.emb.lora_embedding_A"
    assert peft_key("q", "linear", "M") == "base_model.model.q.lora_magnitude_vector"
    for path, kind in [("encoder.layer.0.attention.self.query", "linear"), ("emb", "embedding"), ("c", "conv2d")]:
        for part in "ABM":
            parsed = parse_peft_key(peft_key(path, kind, part))
            assert parsed == (path, part, kind == "embedding" and part != "M", None)
    # keys that carry the adapter name (older PEFT, raw state dicts); DoRA's magnitude with or without .weight
    assert parse_peft_key("base_model.model.a.b.lora_A.default.weight") == ("a.b", "A", False, "default")
    assert parse_peft_key("base_model.model.e.lora_embedding_B.my-name") == ("e", "B", True, "my-name")
    assert parse_peft_key("base_model.model.q.lora_magnitude_vector.weight") == ("q", "M", False, None)
    assert parse_peft_key("base_model.model.q.lora_magnitude_vector.other.weight") == ("q", "M", False, "other")
    assert parse_peft_key("base_model.model.model.embed_tokens.weight") is None
    assert parse_peft_key("block.0.lora_A.weight") is None  # no base_model.model. prefix


def test_pattern_value_follows_peft_matching() -> None:
    patterns = {"layers.1.q": 3, "q": 5}
    assert pattern_value(patterns, "model.layers.1.q", 8) == 3  # first matching key wins
    assert pattern_value(patterns, "model.layers.2.q", 8) == 5
    assert pattern_value(patterns, "model.layers.2.xq", 8) == 8  # a suffix only at a "." boundary
    assert pattern_value({"^block.0": 1}, "block.0", 2) == 1
    assert pattern_value({}, "anything", 4) == 4


def test_pattern_keys_select_one_layer_each() -> None:
    paths = ["0", "1.0", "block.0", "block_0", "enc.q"]
    keys = {p: pattern_key(p, paths) for p in paths}
    assert keys == {"0": "^0", "1.0": "1.0", "block.0": "^block\\.0", "block_0": "block_0", "enc.q": "enc.q"}
    for p, key in keys.items():  # under PEFT's rule each key picks its own path and no other
        assert [q for q in paths if pattern_value({key: 1}, q, 0)] == [p]


def test_target_modules_short_names_only_when_exact() -> None:
    modules = ["enc", "enc.0", "enc.0.query", "enc.0.value", "enc.1", "enc.1.query", "enc.1.value", "head"]
    assert peft_target_modules(["enc.0.query", "enc.1.query"], modules) == ["query"]
    # one query of two: its full path, or PEFT would adapt the other one too
    assert peft_target_modules(["enc.1.query", "enc.0.value", "enc.1.value"], modules) == ["enc.1.query", "value"]
    assert peft_target_modules(["enc.0"], modules) == ["0"]
    assert peft_target_modules(["enc.0"], [*modules, "dec", "dec.0"]) == ["enc.0"]  # "0" would pick dec.0 too


@pytest.mark.parametrize("scale,rank,rslora", [(2.0, 8, False), (0.1, 3, False), (1 / 3, 7, False), (0.7, 5, True),
                                              (2.0, 2, True), (1.3e-3, 64, True), (123.456, 9, False)])
def test_alpha_reproduces_the_scale_exactly(scale: float, rank: int, rslora: bool) -> None:
    alpha = alpha_for_scale(scale, rank, rslora)
    got = alpha / (math.sqrt(rank) if rslora else rank)
    assert abs(got - scale) <= math.ulp(scale)  # no float alpha gives 0.1 * 3 / 3 exactly: the nearest one
    assert torch.tensor(got, dtype=torch.float32) == torch.tensor(scale, dtype=torch.float32)
    if (scale, rank) != (0.1, 3):
        assert got == scale
    assert alpha_for_scale(2.0, 8) == 16 and alpha_for_scale(2.0, 4, True) == 4


def test_grouped_conv_layout_round_trip() -> None:
    a = torch.randn(3, 2, 3, 3)  # r=3, in/groups=2
    big = expand_grouped(a, 4)
    assert big.shape == (12, 8, 3, 3) and torch.equal(big[3:6, 2:4], a) and big[3:6, :2].abs().sum() == 0
    assert torch.equal(collapse_grouped(big, 4), a)  # type: ignore[arg-type]
    big[0, 7] = 1.0  # no longer block-diagonal
    assert collapse_grouped(big, 4) is None


# --- round trips -------------------------------------------------------------------------------------------------


def test_round_trip_every_kind(tmp_path: Path) -> None:
    src, dst = _pair()
    add_adapter_(src, LoraConfig(rank=2, alpha=3, kinds=ALL_KINDS, dropout=0.1))
    _randomize(src)
    ids, img = _inputs()
    files = save_adapter(src, tmp_path / "ad")
    assert [f.name for f in files] == [CONFIG_FILE, WEIGHTS_FILE]
    conf = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 2 and conf["lora_alpha"] == 3 and conf["lora_dropout"] == 0.1
    assert conf["target_modules"] == ["0", "2", "conv", "emb", "gconv"] and conf["task_type"] is None
    assert conf["bias"] == "none" and conf["fan_in_fan_out"] is False and conf["use_dora"] is False
    assert conf["rank_pattern"] == {"gconv": 4} and conf["alpha_pattern"] == {"gconv": 6}  # PEFT's grouped layout
    with safe_open(str(tmp_path / "ad" / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
        block = json.loads(f.metadata()["edgetune"])
        assert tuple(f.get_tensor("base_model.model.gconv.lora_A.weight").shape) == (4, 4, 3, 3)
    assert {"base_model.model.emb.lora_embedding_A", "base_model.model.conv.lora_B.weight"} <= keys
    assert len(keys) == 10 and block["method"] == "lora" and block["config"]["dropout"] == 0.1

    load_adapter_(dst, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(src.eval()(ids, img), dst.eval()(ids, img))  # eval: the adapters' new dropouts off
    cfg = adapter_configs(dst)["default"]
    assert cfg.method == "lora" and cfg.rank == 2 and cfg.alpha == 3 and cfg.dropout == 0.1
    assert sorted(cfg.targets) == ["block.0", "block.2", "conv", "emb", "gconv"]
    trainable = {n for n, p in dst.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)


def test_round_trip_per_layer_ranks_and_rslora(tmp_path: Path) -> None:
    src, dst = _pair()
    add_adapter_(src, LoraConfig(rank=2, alpha=3, rslora=True, rank_pattern={"block.2": 4},
                                 alpha_pattern={"block.0": 0.5}))
    _randomize(src)
    save_adapter(src, tmp_path / "ad")
    conf = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    assert conf["use_rslora"] and conf["rank_pattern"] == {"block.2": 4}
    alphas = {"block.0": conf["lora_alpha"], "block.2": conf["lora_alpha"], **conf["alpha_pattern"]}
    assert alphas == {"block.0": 0.5, "block.2": 3}
    load_adapter_(dst, tmp_path / "ad", name="loaded")
    ids, img = _inputs()
    with torch.no_grad():
        assert torch.equal(src.eval()(ids, img), dst.eval()(ids, img))
    assert dst.block[2].adapters["loaded"].lora_A.shape == (4, 5)
    assert dst.block[0].adapters["loaded"].scale == src.block[0].adapters["default"].scale


def _methods() -> list[str]:
    return sorted(ADAPTERS.names())


@pytest.mark.parametrize("method", _methods())
def test_every_method_exports_what_it_computes(method: str, tmp_path: Path) -> None:
    """Each registered method's file (its as_lora(), and DoRA's magnitude) reloads as a lora / dora adapter with
    the same outputs."""
    src, dst = _pair()
    cfg = AdapterConfig.model_validate({"method": method, "rank": 2, "alpha": 3, "kinds": ["linear"]})
    add_adapter_(src, cfg)
    _randomize(src)
    ids, img = _inputs()
    save_adapter(src, tmp_path / "ad")
    load_adapter_(dst, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(ids, img), src.eval()(ids, img), rtol=1e-5, atol=1e-6)
    assert adapter_configs(dst)["default"].method == ("dora" if method == "dora" else "lora")


def test_adapter_names_in_keys_and_loading_into_an_existing_adapter(tmp_path: Path) -> None:
    tensors = {k.replace(".weight", ".default.weight"): v for k, v in _linear_tensors().items()}
    folder = _write(tmp_path / "old", _peft_conf(), tensors)
    model, ref = _pair()
    load_adapter_(model, folder)
    add_adapter_(ref, LoraConfig(rank=2, alpha=4, targets=["block.0", "block.2"]))
    load_adapter_(ref, folder)  # same layers and ranks: the tensors are replaced in place
    ids, img = _inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, img), ref.eval()(ids, img))
        assert torch.equal(ref.block[0].adapters["default"].lora_B, tensors["base_model.model.block.0.lora_B.default.weight"])


# --- refused files leave the model as it was -------------------------------------------------------------------


def _refused(model: nn.Module, folder: Path, error: type[Exception], match: str, **kw: Any) -> None:
    snap = _snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter_(model, folder, **kw)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("conf,match", [
    ({"peft_type": "IA3"}, r"PEFT 'IA3' adapter.*reads LORA files"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out=True \(weights stored \(in, out\)"),
    ({"bias": "all"}, r"bias='all'"),
    ({"modules_to_save": ["classifier"]}, r"modules_to_save=\['classifier'\]"),
    ({"use_dora": True}, r"DoRA magnitude None vs use_dora=True"),
    ({"r": 3}, r"inconsistent.*config rank 3, tensors rank 2"),
    ({"lora_dropout": 1.5}, r"adapter file's options.dropout: Input should be less than 1"),
])
def test_unsupported_options_are_refused(conf: dict[str, Any], match: str, tmp_path: Path) -> None:
    folder = _write(tmp_path / "f", _peft_conf(**conf), _linear_tensors())
    model, _ = _pair()
    _refused(model, folder, ShapeError if "DoRA" in match else ConfigError, match)


def test_other_architecture_names_the_missing_layers(tmp_path: Path) -> None:
    tensors = _linear_tensors()
    tensors["base_model.model.decoder.out.lora_A.weight"] = torch.zeros(2, 4)
    tensors["base_model.model.decoder.out.lora_B.weight"] = torch.zeros(4, 2)
    folder = _write(tmp_path / "f", _peft_conf(), tensors)
    model, _ = _pair()
    _refused(model, folder, ConfigError, r"another architecture: 1 of its 3 layers.*\['decoder.out'\]")


def test_other_sizes_and_ranks_are_shape_errors(tmp_path: Path) -> None:
    folder = _write(tmp_path / "f", _peft_conf(), _linear_tensors(width=7))
    model, _ = _pair()
    _refused(model, folder, ShapeError, r"block.0: file A \(2, 7\), B \(5, 2\) vs layer A \(2, 6\)")
    # an existing adapter of another rank
    good = _write(tmp_path / "g", _peft_conf(r=3), _linear_tensors(r=3))
    add_adapter_(model, LoraConfig(rank=2, alpha=4, targets=["block.0", "block.2"]))
    _refused(model, good, ShapeError, r"another rank\?.*file A \(3, 6\) vs adapter A \(2, 6\)")


def test_module_kind_edgetune_lacks(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Linear(4, 4))
    tensors = {"base_model.model.0.lora_A.weight": torch.zeros(2, 3, 3),
               "base_model.model.0.lora_B.weight": torch.zeros(4, 2, 1)}
    folder = _write(tmp_path / "f", _peft_conf(target_modules=["0"]), tensors)
    _refused(model, folder, ConfigError, r"module kinds edgetune lacks: \['0 \(Conv1d\)'\].*linear, conv2d and embed")


def test_foreign_tensors_and_broken_folders(tmp_path: Path) -> None:
    model, _ = _pair()
    tensors = {**_linear_tensors(), "base_model.model.emb.weight": torch.zeros(10, 6)}
    _refused(model, _write(tmp_path / "f", _peft_conf(), tensors), ConfigError,
             r"not LoRA factors: \['base_model.model.emb.weight'\].*save_embedding_layers=False")
    half = {k: v for k, v in _linear_tensors().items() if "block.2.lora_B" not in k}
    _refused(model, _write(tmp_path / "h", _peft_conf(), half), ConfigError, r"lacks lora_A or lora_B of \['block.2'\]")
    _refused(model, tmp_path / "nothing", ConfigError, "has no adapter_config.json")
    folder = _write(tmp_path / "bad", _peft_conf(), _linear_tensors())
    (folder / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    _refused(model, folder, CheckpointError, "not a readable safetensors file")
    (folder / CONFIG_FILE).write_text("{oops")
    _refused(model, folder, CheckpointError, "not readable JSON")


def test_a_failure_while_copying_takes_the_new_adapter_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write(tmp_path / "f", _peft_conf(), _linear_tensors())
    model, _ = _pair()
    model.emb.weight.requires_grad_(False)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk vanished")

    monkeypatch.setattr("edgetune.adapters.io.load_adapter_state_", boom)
    _refused(model, folder, RuntimeError, "disk vanished")


def test_save_errors(tmp_path: Path) -> None:
    model, _ = _pair()
    with pytest.raises(ConfigError, match="no adapter named 'default'"):
        save_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
