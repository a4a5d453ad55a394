"""Contracts every registered adapter method keeps, on tiny models of every layer kind it supports.

zero-init output equals the base; merged equals unmerged (float32, 1e-5); disabled equals the base; training moves
only the adapter (the base, seen through ``disable_adapters``, is untouched); the saved file reproduces the model;
bf16 forwards are finite; bad calls raise and leave the model unchanged. A method is covered the moment it is
registered.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import edgetune.adapters as ad
from edgetune.adapters.config import ADAPTERS
from edgetune.core.errors import ConfigError
from edgetune.integrations import MethodStepper

METHODS = ADAPTERS.names()


class Tiny(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear; or a conv stack on images."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv2d":
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
            self.head = nn.Linear(8, 4)
        else:
            self.emb = nn.Embedding(20, 12, padding_idx=0)
            self.fc1 = nn.Linear(12, 16)
            self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            return self.head(self.body(x).mean((2, 3)))
        return self.fc2(torch.relu(self.fc1(self.emb(x)))).mean(1)


def _inputs(kind: str, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "conv2d":
        return torch.randn(n, 3, 6, 6, generator=g)
    return torch.randint(0, 20, (n, 5), generator=g)


def _adapted(method: str, kind: str, rank: int = 2) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = Tiny(kind)
    model = copy.deepcopy(base)
    cfg = ADAPTERS.entry(method).config(rank=rank, alpha=2.0 * rank, kinds=[kind])
    try:
        ad.add_adapter_(model, cfg, seed=3)
    except ConfigError as err:
        if kind != "linear":
            pytest.skip(f"{method} does not support {kind} layers: {err}")
        raise
    return base, model


def _perturb(model: nn.Module) -> None:
    """Move every adapter tensor off its initial value (a zero B would hide a wrong merge)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in ad.adapter_layers(model):
            for p in layer.adapters.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


KINDS = ["linear", "embedding", "conv2d"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_zero_init_equals_base(method: str, kind: str) -> None:
    base, model = _adapted(method, kind)
    x = _inputs(kind)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_and_round_trips(method: str, kind: str) -> None:
    base, model = _adapted(method, kind)
    _perturb(model)
    x = _inputs(kind)
    with torch.no_grad():
        y = model(x)
        assert (y - base(x)).abs().max() > 1e-3, "the perturbed adapter should change the output"
        ad.merge_(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        with pytest.raises(ConfigError, match="already merged"):
            ad.merge_(model)
        ad.unmerge_(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        with pytest.raises(ConfigError, match="not merged"):
            ad.unmerge_(model)
        for (n, p), (_, q) in zip(ad.remove_adapters_(copy.deepcopy(model)).named_parameters(), base.named_parameters(),
                                  strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=f"{n} after unmerge + remove")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_disabled_equals_base_merged_or_not(method: str, kind: str) -> None:
    base, model = _adapted(method, kind)
    _perturb(model)
    x = _inputs(kind)
    with torch.no_grad():
        y = model(x)
        with ad.disable_adapters(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)
        ad.merge_(model)
        with ad.disable_adapters(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("method", METHODS)
def test_training_moves_only_the_adapter(method: str, kind: str) -> None:
    base, model = _adapted(method, kind, rank=2)
    x = _inputs(kind, 16)
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "an adapter must leave something to train"
    adapter_ids = {id(p) for _, lay in ad.adapter_layers(model) for p in lay.adapters.parameters()}
    assert all(id(p) in adapter_ids for p in params), "only adapter parameters train by default"
    opt = torch.optim.AdamW(params, lr=0.05)
    steps = 12
    callbacks = ad.adapter_callbacks(model, total_steps=steps, steps_per_epoch=4)
    losses = []
    with MethodStepper(model, opt, callbacks, total_steps=steps, steps_per_epoch=4) as stepper:
        for _ in range(steps):
            loss = (model(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
            stepper.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0], f"{method} did not learn: {losses}"
    with torch.no_grad(), ad.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_saved_file_reproduces_the_model(method: str, kind: str, tmp_path) -> None:
    from edgetune.adapters.io import load_adapter_, save_adapter

    base, model = _adapted(method, kind)
    _perturb(model)
    x = _inputs(kind)
    save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(base)
    load_adapter_(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_forward_is_finite(method: str) -> None:
    _, model = _adapted(method, "linear")
    _perturb(model)
    model.to(torch.bfloat16)
    y = model(_inputs("linear"))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------ bad input
def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_bad_calls_leave_the_model_unchanged(method: str) -> None:
    torch.manual_seed(0)
    model = Tiny("linear")
    before = _snapshot(model)
    cfg = ADAPTERS.entry(method).config
    with pytest.raises(ConfigError, match=r"match none.*fc1, fc2"):
        ad.add_adapter_(model, cfg(targets=["query"]))
    with pytest.raises(ConfigError, match="larger than"):
        ad.add_adapter_(model, cfg(rank=13))
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ad.add_adapter_(model, cfg(rank=2))
    with pytest.raises(ConfigError, match="already has an adapter"):
        ad.add_adapter_(model, cfg(rank=2))
    with pytest.raises(ConfigError, match="no adapter named"):
        ad.merge_(model, ["other"])


def test_config_dispatches_on_method_and_rejects_foreign_options() -> None:
    from edgetune.core.config import validate

    cfg = validate(ad.AdapterConfig, {"method": "lora", "rank": 4})
    assert isinstance(cfg, ad.LoraConfig) and cfg.to_dict()["rank"] == 4
    with pytest.raises(ConfigError, match="links"):
        validate(ad.AdapterConfig, {"method": "lora", "links": 3})
    with pytest.raises(ConfigError, match="unknown adapter method"):
        validate(ad.AdapterConfig, {"method": "loar"})
    for m in METHODS:  # every method's config round-trips through a plain dict
        c = validate(ad.AdapterConfig, {"method": m})
        assert validate(ad.AdapterConfig, c.to_dict()) == c
