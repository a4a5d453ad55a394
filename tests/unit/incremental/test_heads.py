"""CosineHead and ETFHead: logits against loops, frozen buffer, reserved slots, shapes, learning checks."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.etf import etf_geometry_error, simplex_etf
from edgetune.incremental.heads import CosineHead, ETFHead


def _naive_cosine_logits(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """x (B, D), w (C, D) -> (B, C), one dot product at a time."""
    out = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
    for b in range(x.shape[0]):
        for c in range(w.shape[0]):
            out[b, c] = scale * torch.dot(x[b], w[c]) / (x[b].norm() * w[c].norm())
    return out


def test_cosine_head_matches_loop_and_scale() -> None:
    torch.manual_seed(0)
    head = CosineHead(6, 4, scale=16.0)
    x = torch.randn(5, 6)
    got = head(x)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, _naive_cosine_logits(x, head.weight.detach(), 16.0))
    unit = CosineHead(6, 4, scale=1.0)
    unit.weight.data.copy_(head.weight.data)
    torch.testing.assert_close(got, 16.0 * unit(x))
    assert float(unit(x).detach().abs().max()) <= 1.0 + 1e-6
    # (B, T, D) inputs, like nn.Linear
    torch.testing.assert_close(head(x.reshape(5, 1, 6)).reshape(5, 4), got)


def test_cosine_head_hand_computed() -> None:
    head = CosineHead(2, 3, scale=2.0)
    head.weight.data = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    got = head(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(got, torch.tensor([[1.2, 1.6, 2.0 * 7.0 / (5.0 * math.sqrt(2.0))]]))
    torch.testing.assert_close(
        head.class_vectors, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    )


def test_cosine_head_gradients_and_learnable_scale() -> None:
    torch.manual_seed(1)
    head = CosineHead(6, 4)
    assert [n for n, _ in head.named_parameters()] == ["weight"]
    assert head.in_features == 6 and head.num_classes == head.out_features == 4
    x = torch.randn(3, 6, requires_grad=True)
    head(x).square().sum().backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0
    assert x.grad is not None and float(x.grad.abs().sum()) > 0  # the backbone trains through it
    assert head.scale.grad is None and not head.scale.requires_grad
    learned = CosineHead(6, 4, scale=10.0, learn_scale=True)
    assert sorted(n for n, _ in learned.named_parameters()) == ["scale", "weight"]
    learned(x.detach()).sum().backward()
    assert learned.scale.grad is not None
    assert set(learned.state_dict()) == set(head.state_dict()) == {"weight", "scale"}


def test_etf_head_buffer_is_frozen() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), ETFHead(8, 5, seed=3))
    head = model[2]
    assert isinstance(head, ETFHead)
    assert "2.etf" not in dict(model.named_parameters()) and "2.etf" in model.state_dict()
    assert all(p is not head.etf for p in model.parameters())
    before = head.etf.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 5, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(head.etf, before)
    assert not torch.equal(model[0].weight, nn.Linear(4, 8).weight)  # the rest did train
    torch.testing.assert_close(head.etf, simplex_etf(5, 8, seed=3, dtype=torch.float32))


def test_etf_head_logits_match_loop() -> None:
    head = ETFHead(7, 6, scale=16.0, seed=1)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(head(x), _naive_cosine_logits(x, head.etf, 16.0))
    assert head.weight.shape == head.class_vectors.shape == (6, 7)
    assert etf_geometry_error(head.class_vectors) < 1e-6
    # a feature equal to class vector c scores s on c and -s/(K-1) elsewhere
    logits = head(head.slot(2).unsqueeze(0))[0]
    assert int(logits.argmax()) == 2 and float(logits[2]) == pytest.approx(16.0, abs=1e-4)
    assert float(logits[0]) == pytest.approx(-16.0 / 5, abs=1e-4)


def test_etf_head_reserved_slots() -> None:
    head = ETFHead(16, 5, total_classes=8, seed=0)
    full = simplex_etf(8, 16, seed=0, dtype=torch.float32)
    assert head.num_classes == head.out_features == 5 and head.num_reserved == 3 and head.total_classes == 8
    x = torch.randn(3, 16)
    assert head(x).shape == (3, 5)
    torch.testing.assert_close(head.slot(6), full[6])  # a reserved slot is readable before activation
    assert head.activate(2) == [5, 6]
    assert head.num_classes == 7 and head(x).shape == (3, 7) and head.num_reserved == 1
    torch.testing.assert_close(head(x), _naive_cosine_logits(x, full[:7], 16.0))
    # the state dict carries the activation and restores it in a fresh head
    fresh = ETFHead(16, 5, total_classes=8, seed=0)
    fresh.load_state_dict(head.state_dict())
    assert fresh.num_classes == 7 and fresh(x).shape == (3, 7)
    assert head.activate() == [7]
    with pytest.raises(ConfigError, match=r"cannot activate 1 more.*8 of total_classes=8.*larger total"):
        head.activate()
    with pytest.raises(ConfigError, match=r"slot 8 does not exist.*0\.\.7"):
        head.slot(8)
    with pytest.raises(ConfigError, match="total_classes=3 is smaller than num_classes=5"):
        ETFHead(16, 5, total_classes=3)


def test_etf_head_near_etf_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgetune.incremental.etf"):
        head = ETFHead(4, 3, total_classes=10)
    assert "needs dim >= K-1 = 9" in caplog.text
    assert head.etf.shape == (10, 4)


@pytest.mark.parametrize("make", [lambda: CosineHead(8, 3), lambda: ETFHead(8, 3)])
def test_shape_errors_name_both_dims(make) -> None:  # type: ignore[no-untyped-def]
    head = make()
    with pytest.raises(ShapeError, match=r"in_features=8.*\(2, 5\).*last dimension 5"):
        head(torch.randn(2, 5))
    with pytest.raises(ShapeError, match="in_features=8"):
        head(torch.tensor(1.0))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="scale.*positive.*got 0"):
        CosineHead(4, 2, scale=0.0)
    with pytest.raises(ConfigError, match="in_features must be an integer >= 1"):
        ETFHead(0, 2)
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 1"):
        CosineHead(4, 0)


def test_drop_in_for_linear() -> None:
    torch.manual_seed(0)
    for head in (CosineHead(8, 3), ETFHead(8, 3)):
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        model[2] = head
        out = model(torch.randn(2, 4, 5))  # (B, T, in) -> (B, T, C), like nn.Linear
        assert out.shape == (2, 4, 3)
        assert head.in_features == 8 and head.out_features == 3


# ------------------------------------------------------------------------------------ tiny learning checks


def _blobs(num_classes: int, dim: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around well-separated random centres: (N, dim) inputs, (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(100))
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def _train(head: nn.Module, steps: int = 300) -> tuple[float, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), head)
    x, y = _blobs(8, 10, 40, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    xt, yt = _blobs(8, 10, 50, seed=1)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return acc, model


def _alignment(model: nn.Module, class_vectors: torch.Tensor) -> torch.Tensor:
    """(C, C) cosine between each class's mean test feature (rows) and every class vector (columns)."""
    x, y = _blobs(8, 10, 50, seed=1)
    with torch.no_grad():
        feats = nn.functional.normalize(model[:3](x), dim=1)
    means = nn.functional.normalize(torch.stack([feats[y == c].mean(0) for c in range(8)]), dim=1)
    return means @ class_vectors.T


def test_mlp_learns_with_fixed_etf_head() -> None:
    head = ETFHead(16, 8, seed=0)
    acc, model = _train(head)
    assert acc > 0.95, acc
    # each class's mean feature points at its own ETF slot: the head read as prototypes classifies
    align = _alignment(model, head.class_vectors)
    assert align.argmax(1).tolist() == list(range(8)) and float(align.diagonal().min()) > 0.5


def test_broken_etf_frame_does_not_learn() -> None:
    """The learning check can fail: a head whose class vectors all coincide stays at chance."""
    head = ETFHead(16, 8, seed=0)
    head.etf.copy_(head.etf[:1].expand_as(head.etf))
    acc, _ = _train(head, steps=100)
    assert acc < 0.3, acc


def test_mlp_learns_with_cosine_head() -> None:
    head = CosineHead(16, 8)
    acc, model = _train(head)
    assert acc > 0.95, acc
    assert _alignment(model, head.class_vectors).argmax(1).tolist() == list(range(8))
