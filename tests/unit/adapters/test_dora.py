"""DoRA: outputs against W' = m (W + s B A) / ||W + s B A|| computed by loops (linear with bias, grouped conv,
embedding), a hand-computed case, the detached norm in the backward, merge round trips, PEFT parity, and a
learning check (a per-output rescaling, which DoRA learns at rank 1 and LoRA cannot)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import edgetune.adapters as ad
import edgetune.adapters.dora  # noqa: F401  (registers dora)
from edgetune.adapters.dora import DoraAdapter, DoraConfig, dora_norm, dora_weight
from edgetune.adapters.layer import layer_info
from edgetune.adapters.lora import LoraConfig
from edgetune.core.errors import ConfigError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 5)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)

    def forward(self, ids: Tensor, img: Tensor) -> tuple[Tensor, Tensor]:
        return self.fc(self.emb(ids)), self.conv(img)


def _inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 10, (3, 4), generator=g), torch.randn(2, 4, 5, 5, generator=g)


def _adapted(rank: int = 2, alpha: float = 3.0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = Net()
    model = ad.add_adapter_(copy.deepcopy(base), DoraConfig(rank=rank, alpha=alpha, kinds=["linear", "conv2d",
                                                                                          "embedding"]), seed=1)
    return base, model


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, lay in ad.adapter_layers(model):
            for p in lay.adapters.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _naive_dora_weight(w: Tensor, delta: Tensor, m: Tensor, kind: str) -> Tensor:
    """W' one output unit at a time (an embedding's output unit is a column of its (num, dim) weight)."""
    w, delta = w.double(), delta.double()
    out = torch.empty_like(w)
    units = w.shape[1] if kind == "embedding" else w.shape[0]
    for o in range(units):
        v = (w[:, o] + delta[:, o]) if kind == "embedding" else (w[o] + delta[o])
        norm = math.sqrt(sum(float(t) ** 2 for t in v.flatten()))
        if kind == "embedding":
            out[:, o] = float(m[o]) * v / norm
        else:
            out[o] = float(m[o]) * v / norm
    return out


def test_outputs_equal_the_hand_built_weight_on_every_layer_kind() -> None:
    _, model = _adapted()
    _perturb(model)
    ids, img = _inputs()
    emb_out, conv_out = model(ids, img)
    with torch.no_grad():
        refs = {}
        for path, lay in ad.adapter_layers(model):
            a = lay.adapters["default"]
            delta = a.lora_B.flatten(1) @ a.lora_A.flatten(1) * a.scale  # (out, fan_in), or (dim, num)
            delta = delta.T if lay.info.kind == "embedding" else delta.view(lay.weight.shape)
            refs[path] = _naive_dora_weight(lay.weight, delta, a.lora_magnitude_vector, lay.info.kind).float()
        e = F.embedding(ids, refs["emb"])
        fc = e @ refs["fc"].T + model.fc.bias
        conv = F.conv2d(img, refs["conv"], model.conv.bias, padding=1, groups=2)
    torch.testing.assert_close(emb_out, fc, rtol=0, atol=1e-5)
    torch.testing.assert_close(conv_out, conv, rtol=0, atol=1e-5)


def test_hand_computed_case() -> None:
    base = nn.Linear(2, 1)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[3.0, 4.0]]))
        base.bias.fill_(0.5)
    a = DoraAdapter(layer_info(base), DoraConfig(rank=1, alpha=1.0), torch.Generator())
    a.attach(base)
    assert a.magnitude.tolist() == [5.0]  # ||(3, 4)||
    lay = ad.AdapterLayer(base, layer_info(base))
    lay.adapters["default"], lay.active = a, ["default"]
    with torch.no_grad():
        a.lora_magnitude_vector.fill_(10.0)  # W' = 10 * (3, 4) / 5 = (6, 8)
        y = lay(torch.tensor([[1.0, 1.0]]))
        assert y.item() == pytest.approx(6 + 8 + 0.5)
        a.lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        a.lora_B.fill_(3.0)  # W + s B A = (6, 4), norm sqrt(52)
        y = lay(torch.tensor([[1.0, 1.0]]))
    assert y.item() == pytest.approx(10 * 10 / math.sqrt(52) + 0.5, rel=1e-6)


def test_starts_equal_to_the_base_with_magnitude_the_weight_norm() -> None:
    base, model = _adapted()
    ids, img = _inputs()
    for got, want in zip(model(ids, img), base(ids, img), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.fc.adapters["default"].magnitude, base.fc.weight.norm(dim=1))
    torch.testing.assert_close(model.conv.adapters["default"].magnitude, base.conv.weight.flatten(1).norm(dim=1))
    torch.testing.assert_close(model.emb.adapters["default"].magnitude, base.emb.weight.norm(dim=0))


def test_the_norm_is_a_constant_in_the_backward() -> None:
    """Gradients equal those of the naive formula with ||W + s B A|| detached (the paper's Sec. 4.3), not the full
    ones."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3))
    model = ad.add_adapter_(copy.deepcopy(base), DoraConfig(rank=2, alpha=2.0), seed=1)
    _perturb(model)
    a = model[0].adapters["default"]
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()

    def naive(detach: bool) -> list[Tensor]:
        pa, pb, pm = (t.detach().clone().requires_grad_() for t in (a.lora_A, a.lora_B, a.lora_magnitude_vector))
        v = base[0].weight + a.scale * pb @ pa
        n = v.norm(dim=1, keepdim=True)
        w = pm[:, None] * v / (n.detach() if detach else n)
        (x @ w.T + base[0].bias).pow(2).sum().backward()
        return [pa.grad, pb.grad, pm.grad]

    got = [a.lora_A.grad, a.lora_B.grad, a.lora_magnitude_vector.grad]
    for g, want in zip(got, naive(detach=True), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[1], naive(detach=False)[1], atol=1e-4)


def test_merge_equals_unmerged_and_restores_the_weight() -> None:
    base, model = _adapted()
    _perturb(model)
    ids, img = _inputs()
    with torch.no_grad():
        before = model(ids, img)
        w0 = {p: lay.weight.clone() for p, lay in ad.adapter_layers(model)}
        ad.merge_(model)
        for got, want in zip(model(ids, img), before, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        for path, lay in ad.adapter_layers(model):  # the merged weight is W'
            a = lay.adapters["default"]
            torch.testing.assert_close(lay.weight, w0[path] + a.delta_weight(w0[path]), rtol=0, atol=1e-6)
        with ad.disable_adapters(model):
            for got, want in zip(model(ids, img), base(ids, img), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        ad.unmerge_(model)
        for path, lay in ad.adapter_layers(model):
            torch.testing.assert_close(lay.weight, w0[path], rtol=0, atol=2e-6)
        for got, want in zip(model(ids, img), before, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_training_moves_only_the_adapter() -> None:
    base, model = _adapted()
    ids, img = _inputs()
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for _, lay in ad.adapter_layers(model) for p in lay.adapters.parameters()}
    opt = torch.optim.AdamW(params, lr=0.05)
    for _ in range(3):
        e, c = model(ids, img)
        (e.pow(2).mean() + c.pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
    for k, v in base.state_dict().items():  # base tensors sit under base_layer in the adapted model
        path, _, leaf = k.rpartition(".")
        assert torch.equal(model.state_dict()[f"{path}.base_layer.{leaf}"], v), k
    assert not torch.equal(model.fc.adapters["default"].magnitude, base.fc.weight.norm(dim=1))


def test_delta_weight_tensors_and_errors() -> None:
    _, model = _adapted()
    _perturb(model)
    a = model.fc.adapters["default"]
    w = model.fc.weight
    want = dora_weight(a.info, w, a.lora_B @ a.lora_A * a.scale, a.lora_magnitude_vector) - w
    torch.testing.assert_close(a.delta_weight(w), want)
    with pytest.raises(ConfigError, match="depends on that weight"):
        a.delta_weight()
    aa, bb, s = a.as_lora()
    assert torch.equal(aa, a.lora_A) and torch.equal(bb, a.lora_B) and s == pytest.approx(1.5)
    assert sorted(a.state_dict()) == ["lora_A", "lora_B", "lora_magnitude_vector"]  # no merge record in files
    assert dora_norm(layer_info(nn.Embedding(4, 3)), torch.ones(4, 3)).tolist() == [2.0, 2.0, 2.0]
    with torch.no_grad():
        a.merge_into(model.fc)
        a.merged_norm = None  # as after a copy that lost the record
        with pytest.raises(ConfigError, match="no record of its merge"):
            a.unmerge_from(model.fc)


def test_a_layer_without_a_dense_weight_is_refused() -> None:
    class Proto(nn.Module):  # the linear protocol without a dense (out, in) weight, like SparseLinear
        in_features, out_features = 4, 3

        def __init__(self) -> None:
            super().__init__()
            self.values = nn.Parameter(torch.randn(6))

        def forward(self, x: Tensor) -> Tensor:
            return x[..., :3] * self.values[:3]

    model = nn.Sequential(Proto())
    with pytest.raises(ConfigError, match="DoRA needs the dense weight"):
        ad.add_adapter_(model, DoraConfig(rank=1))
    assert isinstance(model[0], Proto)


def test_an_all_zero_output_unit_stays_finite() -> None:
    base = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        base[0].weight[1] = 0
    model = ad.add_adapter_(copy.deepcopy(base), DoraConfig(rank=1, alpha=1.0))
    a = model[0].adapters["default"]
    assert a.magnitude[1] == 0
    with torch.no_grad():
        a.lora_B.fill_(0.5)  # the direction of the zero row moves; its magnitude is 0
    y = model(torch.randn(4, 3))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1], base[0].bias[1].expand(4))


def test_forward_matches_peft_dora() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(3, 4, 3, padding=1), nn.Embedding(10, 5))
    ours = ad.add_adapter_(copy.deepcopy(base), DoraConfig(rank=2, alpha=3.0, kinds=["linear", "conv2d",
                                                                                       "embedding"]), seed=1)
    _perturb(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=["0", "1", "2"],
                                                                      use_dora=True))
    with torch.no_grad():
        for path, lay in ad.adapter_layers(ours):
            a, t = lay.adapters["default"], theirs.base_model.model.get_submodule(path)
            if lay.info.kind == "embedding":
                t.lora_embedding_A["default"].copy_(a.lora_A)
                t.lora_embedding_B["default"].copy_(a.lora_B)
            else:
                t.lora_A["default"].weight.copy_(a.lora_A)
                t.lora_B["default"].weight.copy_(a.lora_B)
            mag = t.lora_magnitude_vector["default"].weight
            mag.copy_(a.magnitude.reshape(mag.shape))
    ours.eval()
    theirs.eval()
    x, img, ids = torch.randn(3, 6), torch.randn(2, 3, 5, 5), torch.randint(0, 10, (2, 4))
    with torch.no_grad():
        for i, inp in enumerate((x, img, ids)):
            torch.testing.assert_close(ours[i](inp), theirs.base_model.model[i](inp), rtol=1e-5, atol=1e-5)


def test_dora_learns_a_rescaling_of_the_outputs_that_lora_cannot() -> None:
    """W* = diag(c) W is a full-rank change for LoRA but only a magnitude change for DoRA: rank 1 suffices."""
    g = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16))
    with torch.no_grad():
        base[0].weight.copy_(torch.randn(16, 16, generator=g) / 4)
    c = 0.5 + torch.rand(16, generator=g)
    x = torch.randn(256, 16, generator=g)
    with torch.no_grad():
        y = x @ (c[:, None] * base[0].weight).T + base[0].bias
        start = float((base(x) - y).pow(2).mean())
    final = {}
    for name, cfg in (("dora", DoraConfig(rank=1, alpha=1.0)), ("lora", LoraConfig(rank=1, alpha=1.0))):
        model = ad.add_adapter_(copy.deepcopy(base), cfg, seed=1)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
        for _ in range(200):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            final[name] = float((model(x) - y).pow(2).mean()) / start
    # measured: dora 0.000, lora 0.666 of the starting loss
    assert final["dora"] < 0.01, final
    assert final["lora"] > 0.5, final
