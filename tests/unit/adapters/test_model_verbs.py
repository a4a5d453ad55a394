"""The model verbs: LoRA against a hand-written reference, named adapters and the active set, targets by name, regex
and type, a sparse backbone, and the recipe section."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgetune.adapters as ad
from edgetune.core.errors import ConfigError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _set(model: nn.Module, name: str, value: float) -> None:
    with torch.no_grad():
        for _, lay in ad.adapter_layers(model):
            if name in lay.adapters:
                for p in lay.adapters[name].parameters():
                    p.fill_(value)


def test_lora_equals_hand_computed_update() -> None:
    model = _mlp()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    ad.add_adapter_(model, ad.LoraConfig(rank=2, alpha=3.0, targets=["0"]), seed=5)
    lay = model[0]
    a = torch.empty(2, 6)
    nn.init.kaiming_uniform_(a, a=5**0.5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(lay.adapters["default"].lora_A.detach(), a)  # the seeded draw
    with torch.no_grad():
        lay.adapters["default"].lora_B.copy_(torch.arange(16.0).view(8, 2) / 10)
    x = torch.randn(4, 6)
    bb = torch.arange(16.0).view(8, 2) / 10
    want = x @ w.T + b + 1.5 * (x @ a.T) @ bb.T  # scale alpha / r = 1.5
    torch.testing.assert_close(lay(x), want)
    torch.testing.assert_close(lay.adapters["default"].delta_weight(), 1.5 * bb @ a)
    rs = ad.LoraConfig(rank=4, alpha=8.0, rslora=True)
    assert rs.scale == pytest.approx(4.0) and ad.LoraConfig(rank=4, alpha=8.0).scale == pytest.approx(2.0)


def test_conv_and_embedding_updates_against_delta_weight() -> None:
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 3, padding=1, groups=2)):
        m = nn.Sequential(conv)
        ad.add_adapter_(m, ad.LoraConfig(rank=3, kinds=["conv2d"]))
        _set(m, "default", 0.05)
        x = torch.randn(2, 4, 7, 7)
        lay = m[0]
        want = F.conv2d(x, conv.weight + lay.adapters["default"].delta_weight(), conv.bias, conv.stride, conv.padding,
                        conv.dilation, conv.groups)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    emb = nn.Sequential(nn.Embedding(9, 5, padding_idx=0))
    ad.add_adapter_(emb, ad.LoraConfig(rank=2, kinds=["embedding"]))
    _set(emb, "default", 0.3)
    ids = torch.tensor([[0, 3, 8]])
    want = F.embedding(ids, emb[0].weight + emb[0].adapters["default"].delta_weight())
    torch.testing.assert_close(emb(ids), want)
    emb(ids).sum().backward()  # as in nn.Embedding, the padding id gets no gradient, so its row never trains
    assert emb[0].adapters["default"].lora_A.grad[:, 0].abs().sum() == 0


def test_targets_by_name_regex_and_type() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1), nn.Linear(4, 4))
    ad.add_adapter_(copy.deepcopy(model), ad.LoraConfig(rank=1, targets=["re:^[02]$"]))
    m = ad.add_adapter_(copy.deepcopy(model), ad.LoraConfig(rank=1, targets=["*"], exclude=["2"]))
    assert [n for n, _ in ad.adapter_layers(m)] == ["0"]
    with pytest.raises(ConfigError, match="no layer of kinds"):
        ad.add_adapter_(copy.deepcopy(model), ad.LoraConfig(rank=1, kinds=["embedding"]))


def test_named_adapters_active_set_and_removal() -> None:
    model = _mlp()
    base = copy.deepcopy(model)
    x = torch.randn(5, 6)
    ad.add_adapter_(model, ad.LoraConfig(rank=2, name="a"))
    ad.add_adapter_(model, ad.LoraConfig(rank=2, name="b"))
    _set(model, "a", 0.1)
    _set(model, "b", -0.2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable), "the newest adapter trains, nothing else"
    both = model(x)
    ad.set_active_adapters_(model, ["a"])
    only_a = model(x)
    ad.set_active_adapters_(model, "b")
    only_b = model(x)
    assert not torch.allclose(only_a, only_b)
    ad.set_active_adapters_(model, ["a", "b"])
    torch.testing.assert_close(model(x), both)
    ad.merge_(model, ["a"])
    torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-5)
    ad.remove_adapters_(model, ["b"])
    torch.testing.assert_close(model(x), only_a, rtol=1e-5, atol=1e-5)
    assert ad.adapter_names(model) == ["a"]
    ad.remove_adapters_(model, merge=True)
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in model.modules())
    torch.testing.assert_close(model(x), only_a, rtol=1e-5, atol=1e-5)
    ad.add_adapter_(model, ad.LoraConfig(rank=2))  # and back to the base when unmerged adapters are removed
    ad.remove_adapters_(model)
    assert not torch.allclose(model(x), base(x))  # "a" stays merged in, as asked


def test_report_counts_parameters_and_bytes() -> None:
    model = _mlp()
    ad.add_adapter_(model, ad.LoraConfig(rank=2))
    rep = ad.adapter_report(model)
    row = rep["adapters"]["default"]
    assert row["parameters"] == 2 * (6 + 8) + 2 * (8 + 3) and row["bytes"] == 4 * row["parameters"]
    assert rep["trainable_parameters"] == row["trainable"] == row["parameters"]
    assert rep["base_parameters"] == 6 * 8 + 8 + 8 * 3 + 3


def test_lora_on_a_sparse_backbone() -> None:
    from edgetune.sparse import SparseConfig, sparsify_

    model = _mlp()
    sparsify_(model, SparseConfig(method="static", density=0.5, dense_head=False, seed=0))
    base = copy.deepcopy(model)
    ad.add_adapter_(model, ad.LoraConfig(rank=2))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    torch.testing.assert_close(model(x), base(x))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.8 * first
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=False):
        if ".adapters." not in n:
            assert torch.equal(p, q), f"{n} of the sparse base changed"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="sparse storage dense"):
        ad.merge_(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with ad.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x))


def test_recipe_section_trains_adapter_and_head_only(tmp_path) -> None:
    from edgetune.recipe import load_recipe
    from edgetune.runner import load_run_model, run

    cfg = load_recipe({"name": "t", "data": {"name": "synglyph", "limit_train": 256, "limit_test": 64},
                       "model": {"name": "mlp", "widths": [32]},
                       "train": {"epochs": 1, "batch_size": 64, "progress": False},
                       "adapter": {"method": "lora", "rank": 4, "targets": ["layers.*"]}, "output_dir": str(tmp_path)})
    res = run(cfg, tmp_path / "r")
    s = res.summary
    assert s["method_metrics"]["adapter_parameters"] > 0
    assert s["trainable_parameters"] == s["method_metrics"]["adapter_trainable"] + 33 * 100  # + the 32->100 head
    loaded = load_run_model(res.run_dir)
    assert ad.adapter_names(loaded.model) == ["default"]
