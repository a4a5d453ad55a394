"""MLP, ResNet-20/12 and ViT: layer naming, hand-checked sizes and forward, shapes over input sizes, overfitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.models import MLP, ModelSpec, build_model
from edgetune.models.resnet import BasicBlock


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_784_1568x3_10_layout() -> None:
    model = build_model("mlp", {"widths": [1568, 1568, 1568]}, ModelSpec((1, 28, 28), 10), device="meta")
    linears = [
        (n, (m.in_features, m.out_features)) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    ]
    assert linears == [
        ("layers.0", (784, 1568)),
        ("layers.1", (1568, 1568)),
        ("layers.2", (1568, 1568)),
        ("head", (1568, 10)),
    ]
    assert _n_params(model) == 784 * 1568 + 1568 + 2 * (1568 * 1568 + 1568) + 1568 * 10 + 10


def test_mlp_forward_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = MLP(6, 3, widths=[5, 4], activation="tanh", dtype=torch.float64)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    h = x.reshape(7, 6)
    for layer in model.layers:
        h = torch.tanh(h @ layer.weight.T + layer.bias)
    torch.testing.assert_close(model(x), h @ model.head.weight.T + model.head.bias)


def test_mlp_options_add_batch_norm_and_dropout() -> None:
    model = build_model("mlp", {"widths": [8], "batch_norm": True, "dropout": 0.5}, ModelSpec((4,), 2))
    assert isinstance(model.norms[0], nn.BatchNorm1d)
    x = torch.randn(16, 4)
    model.eval()
    torch.testing.assert_close(model(x), model(x))  # dropout off in eval
    model.train()
    assert not torch.allclose(model(x), model(x))  # dropout on in train
    with pytest.raises(ConfigError, match="widths"):  # validate must catch it, not a later stage
        build_model("mlp", {"widths": []}, ModelSpec((4,), 2))


def test_resnet20_parameter_count_matches_paper() -> None:
    # He et al. 2016, table 6: ResNet-20 has 0.27M parameters (option A shortcuts, 10 classes).
    # Convs 432 + 13824 + 50688 + 202752, BN 2 * 688, head 650.
    model = build_model("resnet20", {}, ModelSpec((3, 32, 32), 10), device="meta")
    assert _n_params(model) == 269_722
    option_b = build_model("resnet20", {"shortcut": "B"}, ModelSpec((3, 32, 32), 10), device="meta")
    assert _n_params(option_b) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    half = build_model("resnet20", {"width": 0.5}, ModelSpec((3, 32, 32), 10), device="meta")
    assert half.feature_dim == 32 and half.conv1.out_channels == 8


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = BasicBlock(2, 6, stride=2, shortcut="A")
    x = torch.randn(1, 2, 4, 4)
    s = block._shortcut(x)
    assert s.shape == (1, 6, 2, 2)
    torch.testing.assert_close(s[:, 2:4], x[:, :, ::2, ::2])
    assert s[:, :2].abs().sum() == 0 and s[:, 4:].abs().sum() == 0


@pytest.mark.parametrize("name", ["resnet20", "resnet12"])
@pytest.mark.parametrize(("c", "size"), [(1, 8), (3, 16), (1, 28), (3, 32), (2, 7)])
def test_resnets_take_any_channels_and_small_sizes(name: str, c: int, size: int) -> None:
    model = build_model(name, {"width": 0.25}, ModelSpec((c, size, size), 4)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, c, size, size))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_resnet12_widths_and_pooling() -> None:
    model = build_model("resnet12", {}, ModelSpec((3, 32, 32), 60), device="meta")
    assert [b.conv1.out_channels for b in model.blocks] == [64, 160, 320, 640]
    assert model.feature_dim == 640
    small = build_model("resnet12", {"width": 0.25}, ModelSpec((3, 32, 32), 5)).eval()
    with torch.no_grad():
        maps = small.blocks(torch.randn(1, 3, 32, 32))
    assert maps.shape == (1, 160, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 2


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_tokens_and_pooling(pool: str) -> None:
    model = build_model(
        "vit", {"patch_size": 4, "dim": 16, "heads": 2, "depth": 1, "pool": pool}, ModelSpec((3, 8, 12), 5)
    )
    assert model.pos_emb.shape == (1, 6 + (pool == "cls"), 16)
    assert (model.cls_token is not None) == (pool == "cls")
    assert model(torch.randn(2, 3, 8, 12)).shape == (2, 5)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


@pytest.mark.parametrize(
    ("name", "options", "shape", "steps", "lr"),
    [
        ("mlp", {"widths": [64, 64]}, (20,), 200, 1e-2),
        ("mlp", {"widths": [64], "batch_norm": True, "activation": "gelu"}, (20,), 200, 1e-2),
        ("resnet20", {"width": 0.5}, (3, 8, 8), 60, 1e-2),
        ("resnet12", {"width": 0.125}, (1, 8, 8), 60, 1e-2),
        ("vit", {"patch_size": 2, "dim": 32, "heads": 2, "depth": 2}, (1, 8, 8), 150, 3e-3),
    ],
)
def test_overfits_random_labels(
    name: str, options: dict, shape: tuple[int, ...], steps: int, lr: float
) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, *shape)
    y = torch.randint(0, 4, (64,))
    model = build_model(name, options, ModelSpec(shape, 4))
    assert _fit(model, x, y, steps, lr) > 0.95
