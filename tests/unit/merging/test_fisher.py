"""Fisher merging (Matena & Raffel 2022): the merge against hand-computed cases, the Fisher against a loop of
per-example backward passes, the sampled Fisher against its exact expectation, and the errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.errors import ConfigError
from edgetune.data.batches import DictDataset
from edgetune.merging import merge
from edgetune.merging.config import MERGERS
from edgetune.merging.data_aware import merge_with_data
from edgetune.merging.fisher import (
    FisherConfig,
    fisher_diagonal,
    fisher_merge,
    fisher_merge_tensor,
    normalize_fisher,
)

SD = dict[str, torch.Tensor]


def _sds(n: int = 2) -> list[SD]:
    g = torch.Generator().manual_seed(3)
    return [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g), "ids": torch.arange(4)}
            for _ in range(n)]


def test_hand_computed() -> None:
    out = fisher_merge_tensor([torch.tensor([1.0]), torch.tensor([3.0])], [torch.tensor([1.0]), torch.tensor([3.0])],
                              [1.0, 1.0], eps=0.0)
    assert out.item() == pytest.approx((1 * 1 + 3 * 3) / 4)
    out = fisher_merge_tensor([torch.tensor([1.0]), torch.tensor([3.0])], [torch.tensor([1.0]), torch.tensor([1.0])],
                              [3.0, 1.0], eps=0.0)
    assert out.item() == pytest.approx((3 * 1 + 1 * 3) / 4)


def test_equal_fishers_give_the_average_and_buffers_follow_linear() -> None:
    sds = _sds(3)
    fishers = [{"w": torch.full((3, 4), 0.7), "b": torch.full((3,), 0.2)} for _ in sds]
    out = fisher_merge(sds, fishers)
    ref = merge(sds, {"method": "linear"})
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    assert torch.equal(out["ids"], sds[0]["ids"])
    # zero Fishers everywhere: eps makes it the (weighted) average too
    zero = [{"w": torch.zeros(3, 4), "b": torch.zeros(3)} for _ in sds]
    out = fisher_merge(sds, zero, weights=[1.0, 2.0, 1.0])
    ref = merge(sds, {"method": "linear", "weights": [1.0, 2.0, 1.0]})
    torch.testing.assert_close(out["w"], ref["w"])


def test_a_dominating_fisher_gives_that_model_entry_by_entry() -> None:
    a, b = _sds(2)
    mask = torch.rand(3, 4) > 0.5
    fa = {"w": torch.where(mask, 1e6, 1e-6), "b": torch.full((3,), 1e6)}
    fb = {"w": torch.where(mask, 1e-6, 1e6), "b": torch.full((3,), 1e-6)}
    out = fisher_merge([a, b], [fa, fb])
    torch.testing.assert_close(out["w"], torch.where(mask, a["w"], b["w"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["b"], a["b"], rtol=0, atol=1e-5)


def test_dtype_kept_and_normalize() -> None:
    sds = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()} for sd in _sds(2)]
    fishers = [{"w": torch.rand(3, 4), "b": torch.rand(3)} for _ in sds]
    assert fisher_merge(sds, fishers)["w"].dtype == torch.bfloat16
    n = normalize_fisher({"w": torch.full((2, 2), 4.0), "b": torch.zeros(4)})
    assert float(sum(v.sum() for v in n.values())) == pytest.approx(8.0)


def _hand_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> SD:
    """Mean over examples of the squared gradient of log p(y_i | x_i), one backward pass per example."""
    out = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        logp = torch.log_softmax(model(x[i:i + 1]), -1)[0, y[i]]
        logp.backward()
        for k, p in model.named_parameters():
            out[k] += p.grad ** 2
    return {k: v / len(x) for k, v in out.items()}


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_fisher_diagonal_against_a_hand_loop(per_example: str) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(11, 4), torch.randint(0, 3, (11,))
    got = fisher_diagonal(model, TensorDataset(x, y), label="true", batch_size=4, per_example=per_example)
    ref = _hand_fisher(model, x, y)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)
    got = fisher_diagonal(model, x, label="argmax", batch_size=5, per_example=per_example)
    with torch.no_grad():
        pred = model(x).argmax(1)
    for k, v in _hand_fisher(model, x, pred).items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7)
    assert model.training  # mode restored


def test_sampled_fisher_matches_its_expectation() -> None:
    """label='sample' (the paper's Fisher): over many draws, the mean of g_y^2 with y ~ p(y|x) -> sum_c p_c g_c^2."""
    model = nn.Linear(3, 4)
    x0 = torch.randn(2, 3)
    with torch.no_grad():
        p = torch.softmax(model(x0), -1)
    exact = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for i in range(2):
        for c in range(4):
            for k, v in _hand_fisher(model, x0[i:i + 1], torch.tensor([c])).items():
                exact[k] += p[i, c] * v / 2
    x = x0.repeat(3000, 1)
    got = fisher_diagonal(model, x, label="sample", batch_size=1000, seed=1)
    for k, v in exact.items():
        torch.testing.assert_close(got[k], v, rtol=0.1, atol=1e-4)
    one = fisher_diagonal(model, x[:200], label="sample", batch_size=100, seed=1)
    two = fisher_diagonal(model, x[:200], label="sample", batch_size=100, seed=1)
    other = fisher_diagonal(model, x[:200], label="sample", batch_size=100, seed=2)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)


class _Tokens(nn.Module):
    """A tiny LM-shaped model on keyword inputs: ids (B, T) -> logits (B, T, V)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7)

    def forward(self, input_ids: torch.Tensor) -> Any:
        return {"logits": self.out(self.emb(input_ids))}


def test_dict_batches_and_ignored_positions() -> None:
    model = _Tokens()
    ids = torch.randint(0, 7, (5, 6))
    labels = torch.randint(0, 7, (5, 6))
    labels[:, -2:] = -100
    got = fisher_diagonal(model, DictDataset({"input_ids": ids, "labels": labels}), label="true", batch_size=2)
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        logp = torch.log_softmax(model(ids[i:i + 1])["logits"][0, :4], -1)  # (4, V): the positions kept
        logp.gather(1, labels[i, :4, None]).sum().backward()
        for k, p in model.named_parameters():
            ref[k] += p.grad ** 2 / 5
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_merge_with_data_is_fisher_of_each_model_then_merge() -> None:
    module = _net()
    models = [_net().state_dict() for _ in range(2)]
    sets = [TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    cfg = FisherConfig(label="true", batch_size=4)
    got = merge_with_data(cfg, module, models, None, sets, per_model=True)
    work = copy.deepcopy(module)
    fishers = []
    for sd, d in zip(models, sets, strict=True):
        work.load_state_dict(sd)
        fishers.append(fisher_diagonal(work, d, label="true", batch_size=4))
    ref = fisher_merge(models, fishers)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    merged = merge_with_data({"method": "fisher", "n_batches": 1}, module, models, None, sets[0])
    assert set(merged) == set(models[0])


def test_registered_but_data_aware() -> None:
    assert MERGERS.get("fisher").data_aware
    with pytest.raises(ConfigError, match="data-aware.*fisher_merge"):
        merge(_sds(2), {"method": "fisher"})


def test_errors() -> None:
    model = _net()
    with pytest.raises(ConfigError, match="no Fisher data"):
        fisher_diagonal(model, None)
    with pytest.raises(ConfigError, match="holds no example"):
        fisher_diagonal(model, TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ConfigError, match="holds no example"):
        fisher_diagonal(model, [])
    with pytest.raises(ConfigError, match="needs labelled data"):
        fisher_diagonal(model, torch.randn(3, 4), label="true")
    with pytest.raises(ConfigError, match="label"):
        fisher_diagonal(model, torch.randn(3, 4), label="expected")  # type: ignore[arg-type]
    sds = _sds(2)
    good = [{"w": torch.ones(3, 4)} for _ in sds]
    with pytest.raises(ConfigError, match="one Fisher .* per model"):
        fisher_merge(sds, good[:1])
    with pytest.raises(ConfigError, match="other keys"):
        fisher_merge(sds, [good[0], {"b": torch.ones(3)}])
    with pytest.raises(ConfigError, match="is \\(2, 2\\) but the tensor is \\(3, 4\\)"):
        fisher_merge(sds, [good[0], {"w": torch.ones(2, 2)}])
    with pytest.raises(ConfigError, match="negative"):
        fisher_merge(sds, [good[0], {"w": -torch.ones(3, 4)}])
    with pytest.raises(ConfigError, match="which the models do not"):
        fisher_merge(sds, [{"zz": torch.ones(1)}, {"zz": torch.ones(1)}])
    with pytest.raises(ConfigError, match="non-negative"):
        fisher_merge(sds, good, weights=[1.0, -1.0])
    with pytest.raises(ConfigError, match="finite"):
        fisher_merge(sds, good, weights=[1.0, float("nan")])
    other = copy.deepcopy(sds[1])
    other["w"] = torch.zeros(2, 4)
    with pytest.raises(ConfigError, match="shapes differ"):
        fisher_merge([sds[0], other], good)
    with pytest.raises(ConfigError, match="one dataset per model"):
        merge_with_data({"method": "fisher"}, model, [model.state_dict()] * 2, None, [torch.randn(2, 4)],
                        per_model=True)
    with pytest.raises(ConfigError, match="do not fit the module"):
        merge_with_data({"method": "fisher"}, nn.Linear(4, 3), [model.state_dict()], None, torch.randn(2, 4))
