"""AdaMerging (Yang et al. 2024): zero steps is task arithmetic at the initial lambda; on a toy of two experts
(each fine-tuned from one base on its own head's task) the learned lambdas lower the entropy, rise towards 1 and
raise the accuracy over the initial 0.3; layer-wise lambdas; seeded determinism; clamp; errors.

Toy: inputs x (8-d Gaussian) with a head index; head t labels x by the sign of ``x . u_t``. The base learns head 0;
expert t in {1, 2} is the base fine-tuned on head t. The unlabelled data are inputs of heads 1 and 2.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.data.batches import DictDataset
from edgetune.merging import merge
from edgetune.merging.adamerging import AdaMergingConfig, adamerging, prediction_entropy
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.data_aware import merge_with_data

D, H, T = 8, 32, 3


class Headed(nn.Module):
    """A shared trunk and one 2-way head per task; ``head`` (B,) picks each example's head -> logits (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(H, 2) for _ in range(T))

    def forward(self, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.stack([m(h) for m in self.heads], 1)[torch.arange(len(x)), head]


def _task(t: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = torch.randn(T, D, generator=torch.Generator().manual_seed(99))[t]
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x, torch.full((n,), t), (x @ u > 0).long()


def _train(model: nn.Module, t: int, steps: int, seed: int) -> nn.Module:
    x, h, y = _task(t, 2048, seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[i], h[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def toy() -> dict[str, Any]:
    torch.manual_seed(0)
    base = _train(Headed(), 0, 200, seed=1)
    experts = [_train(copy.deepcopy(base), t, 150, seed=10 + t).state_dict() for t in (1, 2)]
    sets = [_task(t, 256, seed=50 + t) for t in (1, 2)]
    data = DictDataset({"x": torch.cat([s[0] for s in sets]), "head": torch.cat([s[1] for s in sets])})
    tests = [_task(t, 1000, seed=70 + t) for t in (1, 2)]
    return {"base": base.state_dict(), "experts": experts, "data": data, "tests": tests}


def _acc(sd: dict[str, torch.Tensor], tests: list[Any]) -> list[float]:
    m = Headed()
    m.load_state_dict(sd)
    with torch.no_grad():
        return [(m(x, h).argmax(1) == y).float().mean().item() for x, h, y in tests]


FAST = {"steps": 60, "lr": 0.05, "batch_size": 64}


def test_zero_steps_is_task_arithmetic_at_init(toy: dict[str, Any]) -> None:
    r = adamerging(Headed(), toy["base"], toy["experts"], toy["data"], AdaMergingConfig(steps=0, init=0.3))
    ref = merge(toy["experts"], {"method": "task_arithmetic", "scaling": 0.3}, base=toy["base"])
    for k, v in ref.items():
        torch.testing.assert_close(r.merged[k], v)
    assert r.losses == [] and r.lambdas.shape == (1, 2) and r.groups == ["*"]


def test_task_wise_lambdas_lower_the_entropy_and_recover_the_experts(toy: dict[str, Any]) -> None:
    init = merge(toy["experts"], {"method": "task_arithmetic", "scaling": 0.3}, base=toy["base"])
    r = adamerging(Headed(), toy["base"], toy["experts"], toy["data"], FAST)
    before = prediction_entropy(Headed(), init, toy["data"])
    after = prediction_entropy(Headed(), r.merged, toy["data"])
    assert after < before - 0.1, (before, after)
    assert (r.lambdas > 0.6).all(), r.lambdas  # both experts pulled up from 0.3 (measured ~1, clamped)
    acc_init, acc = _acc(init, toy["tests"]), _acc(r.merged, toy["tests"])
    assert min(acc) > 0.85 and sum(acc) > sum(acc_init) + 0.05, (acc_init, acc)


def test_layer_wise(toy: dict[str, Any]) -> None:
    r = adamerging(Headed(), toy["base"], toy["experts"], toy["data"], {**FAST, "granularity": "layer"})
    assert r.groups == list(toy["base"]) and r.lambdas.shape == (len(toy["base"]), 2)
    init = merge(toy["experts"], {"method": "task_arithmetic", "scaling": 0.3}, base=toy["base"])
    assert prediction_entropy(Headed(), r.merged, toy["data"]) < prediction_entropy(Headed(), init, toy["data"]) - 0.1


def test_seeded_and_clamped(toy: dict[str, Any]) -> None:
    cfg = {"steps": 15, "lr": 0.05, "batch_size": 32, "seed": 3, "clamp": [0.0, 0.5], "granularity": "layer"}
    a = adamerging(Headed(), toy["base"], toy["experts"], toy["data"], cfg)
    b = adamerging(Headed(), toy["base"], toy["experts"], toy["data"], cfg)
    assert torch.equal(a.lambdas, b.lambdas) and a.losses == b.losses
    assert float(a.lambdas.max()) <= 0.5
    free = adamerging(Headed(), toy["base"], toy["experts"], toy["data"], {**FAST, "clamp": None})
    assert float(free.lambdas.max()) > 1.0  # unclamped, entropy keeps rewarding larger task vectors


def test_merge_with_data_dispatches(toy: dict[str, Any]) -> None:
    module = Headed()
    before = copy.deepcopy(module.state_dict())
    cfg = {"method": "adamerging", "steps": 5, "lr": 0.05}
    got = merge_with_data(cfg, module, toy["experts"], toy["base"], toy["data"])
    ref = adamerging(Headed(), toy["base"], toy["experts"], toy["data"], cfg).merged
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())  # the module is not modified


def test_registered_but_data_aware(toy: dict[str, Any]) -> None:
    assert MERGERS.get("adamerging").data_aware
    with pytest.raises(ConfigError, match="data-aware.*adamerging"):
        merge(toy["experts"], {"method": "adamerging"}, base=toy["base"])
    with pytest.raises(ConfigError, match="clamp"):
        validate(MergeConfig, {"method": "adamerging", "clamp": [1.0, 0.0]})


def test_errors(toy: dict[str, Any]) -> None:
    base, experts, data = toy["base"], toy["experts"], toy["data"]
    with pytest.raises(ConfigError, match="needs the base model"):
        adamerging(Headed(), None, experts, data, FAST)
    with pytest.raises(ConfigError, match="no AdaMerging data"):
        adamerging(Headed(), base, experts, None, FAST)
    with pytest.raises(ConfigError, match="holds no example"):
        adamerging(Headed(), base, experts, [], FAST)
    with pytest.raises(ConfigError, match="takes no weights"):
        adamerging(Headed(), base, experts, data, {**FAST, "weights": [1.0, 1.0]})
    bad = dict(experts[1])
    bad["heads.0.weight"] = torch.zeros(3, H)
    with pytest.raises(ConfigError, match="shapes differ"):
        adamerging(Headed(), base, [experts[0], bad], data, FAST)
    with pytest.raises(ConfigError, match="other keys"):
        adamerging(Headed(), base, [experts[0], {k: v for k, v in experts[1].items() if k != "heads.2.bias"}], data,
                   FAST)
    with pytest.raises(ConfigError, match="do not fit the module"):
        adamerging(nn.Linear(D, 2), base, experts, data, FAST)
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge_with_data({"method": "adamerge"}, Headed(), experts, base, data)
    with pytest.raises(ConfigError, match="not data-aware"):
        merge_with_data({"method": "linear"}, Headed(), experts, base, data)


def test_warns_when_every_lambda_collapses_to_the_base(toy: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    # "fine-tunes" less confident than the base everywhere (its heads' logits shrunk): entropy falls only towards
    # lambda 0, so the merge returns the base and says why
    base = toy["base"]
    timid = [{k: v * (0.5 if k.startswith("heads.") else 1.0) for k, v in base.items()},
             {k: v * (0.3 if k.startswith("heads.") else 1.0) for k, v in base.items()}]
    with caplog.at_level("WARNING", logger="edgetune.merging.adamerging"):
        r = adamerging(Headed(), base, timid, toy["data"], FAST)
    assert float(r.lambdas.max()) <= 0.05, r.lambdas
    assert any("the merged model is (almost) the base" in m and "cross_entropy" in m for m in caplog.messages)
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgetune.merging.adamerging"):
        adamerging(Headed(), base, toy["experts"], toy["data"], FAST)
    assert not caplog.messages  # lambdas rise on the experts' tasks: no warning
