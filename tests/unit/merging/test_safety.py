"""Safety-preserving merging (Hammoud et al. 2024): one bad model spoils task arithmetic, the safety merge keeps the
must-keep behaviour; must_keep_from_reference; keep_weight 0 is AdaMerging; errors.

Toy ("one bad model"): inputs x (16-d Gaussian) with a head index; head t labels x by the sign of ``x . u_t``. The
base learns head 0: the must-keep (aligned) behaviour. Two aligned experts are fine-tuned from it on heads 1 and 2
(keeping head 0 with its data, as aligned experts do); the bad expert learns head 3 but is also trained to flip
head 0. Domain data: unlabelled inputs of heads 1-3; must-keep set: head-0 inputs labelled by the base.

Measured on seeds 0-4 (``OMP_NUM_THREADS=1 .venv/bin/python tests/unit/merging/test_safety.py``, CPU, torch 2.13;
must-keep accuracy / mean accuracy on the aligned experts' tasks 1-2 / on tasks 1-3)::

    base              0.976-0.984   ~0.5 (untrained heads)
    task arithmetic   0.444-0.604   0.784-0.919 / 0.770-0.878   (must-keep down 0.37-0.54: the damage spreads)
    TIES (0.2)        0.872-0.966   0.855-0.921 / 0.805-0.852   (down 0.02-0.10: sign election out-votes some of it)
    average (linear)  0.960-0.976   0.836-0.883 / 0.738-0.811
    AdaMerging        0.938-0.981   0.883-0.960 / 0.779-0.843
    safety, task      0.966-0.981   0.911-0.960 / 0.701-0.809   (within 0.013 of the base)
    safety, layer     0.969-0.981   0.909-0.952 / 0.778-0.848   (within 0.009 of the base)

The safety merge keeps the must-keep behaviour by driving the bad expert's lambda down, which also drops most of its
own task (head 3) unless layer-wise lambdas keep part of it. Entropy alone (AdaMerging) already rejects much of the bad
vector here (it raises the domain entropy); the must-keep term matters most where it does not (seed 4: 0.938 ->
0.974). With domain data labelled by the experts (cross-entropy), keep_weight 0 -> 1 lifts the must-keep accuracy
from 0.887-0.973 to 0.956-0.980. The tests below run seed 0; the thresholds leave room on every seed.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.data.batches import DictDataset
from edgetune.merging import merge
from edgetune.merging.adamerging import adamerging
from edgetune.merging.config import MERGERS
from edgetune.merging.data_aware import merge_with_data
from edgetune.merging.safety import SafetyConfig, must_keep_from_reference, safety_merge

D, H, T = 16, 128, 4
SAFETY = {"steps": 100, "lr": 0.05, "batch_size": 64, "keep_weight": 1.0}

KEEP_DROP_TA = 0.3  # task arithmetic loses at least this much must-keep accuracy (measured >= 0.37)
KEEP_SLACK = 0.03  # the safety merge stays within this of the base (measured <= 0.013)
TASK_GAIN = 0.02  # the safety merge beats plain averaging on the aligned experts' tasks by this (measured >= 0.038)


class Headed(nn.Module):
    """A shared trunk and one 2-way head per task; ``head`` (B,) picks each example's head -> logits (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(H, 2) for _ in range(T))

    def forward(self, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.stack([m(h) for m in self.heads], 1)[torch.arange(len(x)), head]


Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _task(rules: torch.Tensor, t: int, n: int, seed: int, flip: bool = False) -> Split:
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    y = (x @ rules[t] > 0).long()
    return x, torch.full((n,), t), (1 - y) if flip else y


def _train(model: nn.Module, splits: list[Split], steps: int, seed: int) -> nn.Module:
    x, h, y = (torch.cat([s[i] for s in splits]) for i in range(3))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        i = torch.randint(0, len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[i], h[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _inputs(splits: list[Split]) -> DictDataset:
    return DictDataset({"x": torch.cat([s[0] for s in splits]), "head": torch.cat([s[1] for s in splits])})


def build(seed: int) -> dict[str, Any]:
    """Base, the two aligned experts and the bad one, domain inputs, the must-keep set, test splits."""
    torch.manual_seed(seed)
    rules = torch.randn(T, D, generator=torch.Generator().manual_seed(1000 + seed))
    s = 100 * seed
    base = _train(Headed(), [_task(rules, 0, 4096, s)], 400, seed)
    keep = [_task(rules, 0, 4096, s + 11)]
    experts = [_train(copy.deepcopy(base), [_task(rules, 1, 4096, s + 1), *keep], 150, seed + 1),
               _train(copy.deepcopy(base), [_task(rules, 2, 4096, s + 2), *keep], 150, seed + 2),
               _train(copy.deepcopy(base), [_task(rules, 3, 4096, s + 3), _task(rules, 0, 4096, s + 9, flip=True)],
                      150, seed + 3)]
    domain = _inputs([_task(rules, t, 256, s + 70 + t) for t in (1, 2, 3)])
    must_keep = must_keep_from_reference(base, _inputs([_task(rules, 0, 512, s + 80)]))
    return {"base": base.state_dict(), "experts": [e.state_dict() for e in experts], "domain": domain,
            "must_keep": must_keep, "tests": [_task(rules, t, 1000, s + 50 + t) for t in range(T)], "seed": seed}


def accuracies(sd: dict[str, torch.Tensor], tests: list[Split]) -> list[float]:
    m = Headed()
    m.load_state_dict(sd)
    with torch.no_grad():
        return [(m(x, h).argmax(1) == y).float().mean().item() for x, h, y in tests]


def merges(toy: dict[str, Any], which: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    base, experts = toy["base"], toy["experts"]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in which:
        if name == "task_arithmetic":
            out[name] = merge(experts, {"method": "task_arithmetic"}, base=base)
        elif name == "ties":
            out[name] = merge(experts, {"method": "ties"}, base=base)
        elif name == "average":
            out[name] = merge(experts, {"method": "linear"})
        elif name == "adamerging":
            cfg = {k: v for k, v in SAFETY.items() if k != "keep_weight"}
            out[name] = adamerging(Headed(), base, experts, toy["domain"], cfg).merged
        else:  # safety_task, safety_layer
            cfg = {**SAFETY, "granularity": name.removeprefix("safety_")}
            out[name] = safety_merge(Headed(), base, experts, toy["domain"], toy["must_keep"], cfg).merged
    return out


def figures(acc: list[float]) -> tuple[float, float, float]:
    """(must-keep accuracy, mean over the aligned experts' tasks 1-2, mean over tasks 1-3)."""
    return acc[0], (acc[1] + acc[2]) / 2, (acc[1] + acc[2] + acc[3]) / 3


@pytest.fixture(scope="module")
def toy() -> dict[str, Any]:
    return build(0)


def test_one_bad_model_spoils_task_arithmetic_but_not_the_safety_merge(toy: dict[str, Any]) -> None:
    keep_base = accuracies(toy["base"], toy["tests"])[0]
    assert keep_base > 0.95
    bad = accuracies(toy["experts"][2], toy["tests"])
    assert bad[0] < 0.2 and bad[3] > 0.8  # the bad expert knows its task and flipped the must-keep behaviour
    m = merges(toy, ("task_arithmetic", "average", "safety_task", "safety_layer"))
    fig = {k: figures(accuracies(sd, toy["tests"])) for k, sd in m.items()}
    assert fig["task_arithmetic"][0] < keep_base - KEEP_DROP_TA, fig
    for name in ("safety_task", "safety_layer"):
        assert fig[name][0] > keep_base - KEEP_SLACK, (name, fig)
        assert fig[name][1] > fig["average"][1] + TASK_GAIN, (name, fig)
    assert fig["safety_layer"][2] > fig["average"][2] - 0.05, fig  # all three tasks: about averaging or better


def test_the_must_keep_term_is_what_keeps_it_where_entropy_does_not() -> None:
    """Seed 4, where entropy alone (AdaMerging, keep_weight 0) lets part of the bad vector in: the must-keep term
    lifts the must-keep accuracy (measured 0.938 -> 0.974). On seed 0 both keep it, so this is the test a safety
    merge that ignored its must-keep set would fail."""
    toy4 = build(4)
    m = merges(toy4, ("adamerging", "safety_task"))
    ada, safe = (figures(accuracies(m[k], toy4["tests"]))[0] for k in ("adamerging", "safety_task"))
    assert safe > ada + 0.015, (ada, safe)


def test_keep_weight_0_on_unlabelled_domain_is_adamerging(toy: dict[str, Any]) -> None:
    cfg = {"steps": 10, "lr": 0.05, "batch_size": 64}
    a = safety_merge(Headed(), toy["base"], toy["experts"], toy["domain"], toy["must_keep"], {**cfg, "keep_weight": 0})
    b = adamerging(Headed(), toy["base"], toy["experts"], toy["domain"], cfg)
    assert torch.equal(a.lambdas, b.lambdas)


def test_must_keep_from_reference() -> None:
    model = nn.Linear(3, 4)
    x = torch.randn(10, 3)
    batches = must_keep_from_reference(model, x, batch_size=4)
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    with torch.no_grad():
        assert torch.equal(torch.cat([b[1] for b in batches]), model(x).argmax(1))
    other = nn.Linear(3, 4)
    relabelled = must_keep_from_reference(model, [[x, torch.zeros(10, dtype=torch.long)]], state_dict=other.state_dict())
    with torch.no_grad():
        assert torch.equal(relabelled[0][1], other(x).argmax(1))  # labels replaced by the reference's
    d = must_keep_from_reference(Headed(), _inputs([(torch.randn(5, D), torch.zeros(5, dtype=torch.long),
                                                     torch.zeros(5))]))
    assert set(d[0]) == {"x", "head", "labels"} and d[0]["labels"].shape == (5,)


def test_merge_with_data_dispatches(toy: dict[str, Any]) -> None:
    cfg = {"method": "safety", "steps": 3, "lr": 0.05}
    got = merge_with_data(cfg, Headed(), toy["experts"], toy["base"], toy["domain"], must_keep=toy["must_keep"])
    ref = safety_merge(Headed(), toy["base"], toy["experts"], toy["domain"], toy["must_keep"], SafetyConfig(
        steps=3, lr=0.05)).merged
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v)


def test_registered_but_data_aware(toy: dict[str, Any]) -> None:
    assert MERGERS.get("safety").data_aware
    with pytest.raises(ConfigError, match="data-aware.*safety_merge"):
        merge(toy["experts"], {"method": "safety"}, base=toy["base"])


def test_errors(toy: dict[str, Any]) -> None:
    base, experts, domain, keep = toy["base"], toy["experts"], toy["domain"], toy["must_keep"]
    with pytest.raises(ConfigError, match="needs a must-keep set"):
        safety_merge(Headed(), base, experts, domain, None, SAFETY)
    unlabelled = _inputs([(torch.randn(4, D), torch.zeros(4, dtype=torch.long), torch.zeros(4))])
    with pytest.raises(ConfigError, match="without labels.*must_keep_from_reference"):
        safety_merge(Headed(), base, experts, domain, unlabelled, SAFETY)
    with pytest.raises(ConfigError, match="needs labelled domain data"):
        safety_merge(Headed(), base, experts, domain, keep, {**SAFETY, "domain_loss": "cross_entropy"})
    with pytest.raises(ConfigError, match="no domain data"):
        safety_merge(Headed(), base, experts, None, keep, SAFETY)
    with pytest.raises(ConfigError, match="holds no example"):
        safety_merge(Headed(), base, experts, domain, [], SAFETY)
    with pytest.raises(ConfigError, match="needs the base model"):
        safety_merge(Headed(), None, experts, domain, keep, SAFETY)
    with pytest.raises(ConfigError, match="keep_weight"):
        merge_with_data({"method": "safety", "keep_weight": -1}, Headed(), experts, base, domain, keep)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    names = ("task_arithmetic", "ties", "average", "adamerging", "safety_task", "safety_layer")
    print("seed  method           keep   tasks1-2  tasks1-3")
    for seed in range(5):
        toy_ = build(seed)
        rows = {"base": toy_["base"], **merges(toy_, names)}
        for name, sd in rows.items():
            k, good, all3 = figures(accuracies(sd, toy_["tests"]))
            print(f"{seed:<5} {name:<16} {k:.3f}  {good:.3f}     {all3:.3f}")
