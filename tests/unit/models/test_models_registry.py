"""Contract over every registered model: builds from defaults, forward shapes, dtype/device, bad input specs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.models import MODELS, ModelSpec, build_model

# One tiny spec per kind of data; a model must build for at least one of them.
SPECS = [
    ModelSpec((1, 8, 8), 5),
    ModelSpec((3, 16, 16), 4),
    ModelSpec((12,), 7),
    ModelSpec((12,), 11, "lm"),
    ModelSpec((12,), 11, "seq2seq"),
]




def _inputs(spec: ModelSpec, batch: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    if spec.task == "classification":
        return (torch.randn(batch, *spec.input_shape, generator=g),)
    src = torch.randint(0, spec.num_classes, (batch, *spec.input_shape), generator=g)
    if spec.task == "lm":
        return (src,)
    return src, torch.randint(0, spec.num_classes, (batch, 5), generator=g)


def _expected(spec: ModelSpec, inputs: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    if spec.task == "classification":
        return (inputs[0].shape[0], spec.num_classes)
    return (*inputs[-1].shape, spec.num_classes)


def _buildable(name: str) -> list[ModelSpec]:
    ok = []
    for spec in SPECS:
        try:
            build_model(name, {}, spec, device="meta")
        except ConfigError:
            continue
        ok.append(spec)
    return ok


def test_builtins_registered() -> None:
    assert {"mlp", "convnet", "resnet20", "resnet12", "vit", "transformer"} <= set(MODELS.names())


@pytest.mark.parametrize("name", MODELS.names())
def test_builds_from_defaults_with_contract_shapes(name: str) -> None:
    specs = _buildable(name)
    assert specs, f"model {name!r} builds for none of the test specs"
    for spec in specs:
        torch.manual_seed(0)
        model = build_model(name, None, spec).eval()
        inputs = _inputs(spec)
        with torch.no_grad():
            out = model(*inputs)
        assert out.shape == _expected(spec, inputs), (name, spec)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS.names())
def test_dtype_and_device_are_honoured(name: str) -> None:
    spec = _buildable(name)[0]
    model = build_model(name, {}, spec, device="cpu", dtype=torch.float64)
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    inputs = [t.double() if t.is_floating_point() else t for t in _inputs(spec)]
    out = model.eval()(*inputs)
    assert out.dtype == torch.float64
    meta = build_model(name, {}, spec, device="meta")  # built in place: nothing allocated on the CPU
    assert all(p.device.type == "meta" for p in meta.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_unknown_option_is_rejected_with_hint(name: str) -> None:
    spec = _buildable(name)[0]
    with pytest.raises(ConfigError, match="unknown key 'model.bogus_key'"):
        build_model(name, {"bogus_key": 1}, spec)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("mlp", {"widthz": [4]}, 'Did you mean "widths"'),
        ("mlp", {"widths": [4, 0]}, "model.widths.1"),
        ("mlp", {"dropout": 1.0}, "model.dropout"),
        ("mlp", {"activation": "swish"}, "model.activation"),
        ("resnet20", {"width": 0}, "model.width"),
        ("resnet20", {"shortcut": "C"}, "model.shortcut"),
        ("vit", {"dim": 30, "heads": 4}, "not divisible by heads 4"),
        ("vit", {"pool": "max"}, "model.pool"),
        ("transformer", {"dim": 10, "heads": 3}, "not divisible by heads 3"),
        ("transformer", {"kind": "bert"}, "model.kind"),
    ],
)
def test_bad_options_raise_config_error(name: str, options: dict, match: str) -> None:
    spec = _buildable(name)[0]
    with pytest.raises(ConfigError, match=match):
        build_model(name, options, spec)


@pytest.mark.parametrize(
    ("name", "options", "spec", "match"),
    [
        ("resnet20", {}, ModelSpec((64,), 3), r"\(C, H, W\)"),
        ("resnet12", {}, ModelSpec((28, 28), 3), r"\(C, H, W\)"),
        ("vit", {"patch_size": 8}, ModelSpec((1, 28, 28), 3), "28x28 is not divisible by model.patch_size 8"),
        ("vit", {"patch_size": 5}, ModelSpec((3, 32, 32), 3), "not divisible by model.patch_size 5"),
        ("mlp", {}, ModelSpec((12,), 50, "lm"), "task is 'lm'"),
        ("vit", {}, ModelSpec((12,), 50, "seq2seq"), "task is 'seq2seq'"),
        ("transformer", {}, ModelSpec((3, 8, 8), 10), "task is 'classification'"),
        ("transformer", {}, ModelSpec((4, 8), 10, "lm"), r"shape \(T,\)"),
        ("transformer", {"max_len": 16}, ModelSpec((32,), 10, "lm"), "length 32 exceeds model.max_len 16"),
        ("transformer", {"kind": "seq2seq"}, ModelSpec((8,), 10, "lm"), "does not match the data task"),
        ("transformer", {"pad_id": 10}, ModelSpec((8,), 10, "seq2seq"), "pad_id 10 is outside"),
    ],
)
def test_impossible_spec_raises_config_error(name: str, options: dict, spec: ModelSpec, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(name, options, spec)


def test_unknown_model_name_suggests() -> None:
    with pytest.raises(ConfigError, match='Did you mean "resnet20"'):
        build_model("resnet2", {}, ModelSpec((3, 8, 8), 10))


def test_image_models_expose_features_and_linear_head() -> None:
    spec = ModelSpec((3, 16, 16), 6)
    x = torch.randn(2, 3, 16, 16)
    for name in ("mlp", "convnet", "resnet20", "resnet12", "vit"):
        model = build_model(name, {}, spec).eval()
        feats = model.features(x)
        assert feats.shape == (2, model.feature_dim)
        assert isinstance(model.head, nn.Linear) and model.head.in_features == model.feature_dim
        torch.testing.assert_close(model.head(feats), model(x))
