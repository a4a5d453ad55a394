"""LoRA-FA: equals plain LoRA with A frozen (outputs, B's and the input's gradients), a hand-computed case, A never
moves in training, and the backward keeps the rank-r projection instead of the layer's input (saved bytes)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import edgetune.adapters as ad
import edgetune.adapters.lora_fa  # noqa: F401  (registers lora_fa)
from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import layer_info
from edgetune.adapters.lora import LoraAdapter, LoraConfig
from edgetune.adapters.lora_fa import (
    LoraFaAdapter,
    LoraFaConfig,
    dropout_keep,
    frozen_projection,
    lora_fa_update,
)
from edgetune.core.config import validate


def _pair(base: nn.Module, rank: int = 3, dropout: float = 0.0, freeze_a: bool = True
          ) -> tuple[LoraFaAdapter, LoraAdapter]:
    """A LoRA-FA adapter with a non-zero B and a plain LoRA with the same A (frozen unless not ``freeze_a``) and B."""
    info = layer_info(base)
    fa = LoraFaAdapter(info, LoraFaConfig(rank=rank, alpha=2.0 * rank, dropout=dropout), torch.Generator().manual_seed(1))
    with torch.no_grad():
        fa.lora_B.copy_(torch.randn(fa.lora_B.shape, generator=torch.Generator().manual_seed(2)))
    ref = LoraAdapter(info, LoraConfig(rank=rank, alpha=2.0 * rank, dropout=dropout), torch.Generator())
    ref.load_state_dict(fa.state_dict())
    ref.lora_A.requires_grad_(not freeze_a)
    return fa, ref


def _naive_linear_update(x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``s * B A x`` one row and one output at a time."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.zeros(rows.shape[0], b.shape[0], dtype=torch.float64)
    for n in range(rows.shape[0]):
        h = [sum(float(a[k, i]) * float(rows[n, i]) for i in range(a.shape[1])) for k in range(a.shape[0])]
        for o in range(b.shape[0]):
            out[n, o] = scale * sum(float(b[o, k]) * h[k] for k in range(a.shape[0]))
    return out.reshape(*x.shape[:-1], b.shape[0])


def test_hand_computed_case() -> None:
    info = layer_info(nn.Linear(2, 1))
    a = torch.tensor([[1.0, 2.0]])
    b = torch.tensor([[3.0]], requires_grad=True)
    x = torch.tensor([[1.0, 1.0]], requires_grad=True)
    y = lora_fa_update(info, x, a, b, scale=0.5)  # 0.5 * 3 * (1 + 2)
    assert y.item() == pytest.approx(4.5)
    y.sum().backward()
    assert b.grad.item() == pytest.approx(1.5)  # 0.5 * (A x) = 0.5 * 3
    torch.testing.assert_close(x.grad, torch.tensor([[1.5, 3.0]]))  # 0.5 * B * A


def test_linear_equals_naive_reference_and_lora_with_a_frozen() -> None:
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    fa, ref = _pair(base)
    x = torch.randn(2, 4, 7)
    torch.testing.assert_close(fa.update(x).double(), _naive_linear_update(x, fa.lora_A.detach(), fa.lora_B.detach(), fa.scale),
                               rtol=1e-5, atol=1e-5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 4, 5)
    (fa(base, x1, base(x1)) * g).sum().backward()
    (ref(base, x2, base(x2)) * g).sum().backward()
    torch.testing.assert_close(fa.lora_B.grad, ref.lora_B.grad)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert fa.lora_A.grad is None and not fa.lora_A.requires_grad


@pytest.mark.parametrize("geometry", [{"stride": 1, "padding": 1}, {"stride": 2, "padding": 0, "dilation": 2},
                                      {"stride": 1, "padding": "same"}])
def test_conv2d_equals_lora_with_a_frozen(geometry: dict) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 6, 3, **geometry)
    fa, ref = _pair(base, rank=2)
    x1 = torch.randn(2, 3, 9, 9, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = fa(base, x1, base(x1)), ref(base, x2, base(x2))
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(fa.lora_B.grad, ref.lora_B.grad)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_dropout_mask_is_replayed_in_the_backward() -> None:
    torch.manual_seed(0)
    info = layer_info(nn.Linear(6, 4))
    a, b = torch.randn(2, 6), torch.randn(4, 2, requires_grad=True)
    x1 = torch.randn(5, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    p, seed = 0.3, 1234
    keep = dropout_keep(x1.shape, p, seed, x1.device)
    assert torch.equal(keep, dropout_keep(x1.shape, p, seed, x1.device))  # the same mask for one seed
    assert 0 < keep.sum() < keep.numel()
    y1 = lora_fa_update(info, x1, a, b, 0.5, p, seed)
    b2 = b.detach().clone().requires_grad_()
    y2 = F.linear(F.linear(x2 * keep / (1 - p), a), b2) * 0.5  # reference: the mask kept explicitly
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_dropout_only_in_training_and_seeded_by_torch() -> None:
    base = nn.Linear(8, 8)
    fa, _ = _pair(base, dropout=0.5)
    x = torch.randn(4, 8)
    fa.train()
    torch.manual_seed(5)
    y1 = fa.update(x)
    torch.manual_seed(5)
    torch.testing.assert_close(fa.update(x), y1)  # the mask seed comes from torch's global generator
    fa.eval()
    torch.testing.assert_close(fa.update(x), F.linear(F.linear(x, fa.lora_A), fa.lora_B) * fa.scale)
    assert not torch.allclose(y1, fa.update(x))


def test_a_never_changes_in_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    ad.add_adapter_(model, LoraFaConfig(rank=2, dropout=0.1), seed=4)
    layers = [lay for _, lay in ad.adapter_layers(model)]
    a0 = [lay.adapters["default"].lora_A.detach().clone() for lay in layers]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_B") for n in trainable)
    # even with every adapter tensor handed to the optimizer (weight decay on), A gets no gradient and stays put
    for lay in layers:
        lay.adapters["default"].lora_A.requires_grad_(True)
    opt = torch.optim.AdamW([p for lay in layers for p in lay.adapters.parameters()], lr=0.05, weight_decay=0.1)
    x, target = torch.randn(32, 10), torch.randn(32, 3)
    losses = []
    for _ in range(15):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for lay, a in zip(layers, a0):
        assert torch.equal(lay.adapters["default"].lora_A, a)
        assert lay.adapters["default"].lora_B.abs().sum() > 0


def _saved_bytes(fn: Callable[[], Tensor], exclude: list[Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()`` (``exclude``: parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()  # the saved tensors are usable
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_backward_keeps_the_projection_not_the_input(dropout: float) -> None:
    torch.manual_seed(0)
    n_in, rank = 256, 4
    base = nn.Linear(n_in, n_in).requires_grad_(False)
    fa, ref = _pair(base, rank=rank, dropout=dropout, freeze_a=False)  # ref: plain LoRA, A trains
    fa.train(), ref.train()
    x = torch.randn(8, 32, n_in, requires_grad=True)  # an input that needs a gradient (earlier layers train)
    y = base(x).detach()  # the base layer's own saved tensors are not the adapter's
    params = [*base.parameters(), *fa.parameters(), *ref.parameters()]
    fa_bytes = _saved_bytes(lambda: fa(base, x, y), params)
    lora_bytes = _saved_bytes(lambda: ref(base, x, y), params)
    tokens = 8 * 32
    assert fa_bytes == tokens * rank * 4  # A x alone: nothing of the input's size (no mask, no dropped copy)
    assert lora_bytes >= tokens * (n_in + rank) * 4  # the (dropped) input for A's gradient, plus A x
    assert lora_bytes / fa_bytes >= n_in / rank


def test_conv_backward_keeps_the_projection_not_the_input() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False)
    fa, ref = _pair(base, rank=2)  # ref: LoRA with A frozen, whose conv still keeps its input
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    y = base(x).detach()  # the base conv keeps x for its own backward; that is not the adapter's
    params = [*base.parameters(), *fa.parameters(), *ref.parameters()]
    assert _saved_bytes(lambda: fa(base, x, y), params) == 2 * 2 * 8 * 8 * 4
    assert _saved_bytes(lambda: ref(base, x, y), params) >= x.numel() * 4


def test_embedding_and_grouped_conv_train_b_with_a_fixed() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(20, 6), "conv": nn.Conv2d(4, 4, 3, padding=1, groups=2)})
    ad.add_adapter_(model, LoraFaConfig(rank=2, kinds=["embedding", "conv2d"]), seed=1)
    emb, conv = model["emb"].adapters["default"], model["conv"].adapters["default"]
    assert emb.lora_A.abs().sum() > 0 and emb.lora_B.abs().sum() == 0  # a usable frozen A on an embedding
    a0 = (emb.lora_A.clone(), conv.lora_A.clone())
    out = model["emb"](torch.tensor([[1, 2, 3]])).sum() + model["conv"](torch.randn(1, 4, 5, 5)).pow(2).sum()
    out.backward()
    assert emb.lora_B.grad.abs().sum() > 0 and conv.lora_B.grad is not None
    assert emb.lora_A.grad is None and conv.lora_A.grad is None
    assert torch.equal(emb.lora_A, a0[0]) and torch.equal(conv.lora_A, a0[1])


def test_frozen_projection_gives_a_no_gradient() -> None:
    info = layer_info(nn.Linear(4, 4))
    a = torch.randn(2, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    frozen_projection(info, x, a).sum().backward()
    assert a.grad is None and x.grad is not None


def test_config_registered_and_validated() -> None:
    cfg = validate(AdapterConfig, {"method": "lora_fa", "rank": 4, "init_a": "gaussian"})
    assert isinstance(cfg, LoraFaConfig) and cfg.rank == 4
    assert ADAPTERS.get("lora_fa") is LoraFaAdapter and ADAPTERS.entry("lora_fa").config is LoraFaConfig
    model = ad.add_adapter_(copy.deepcopy(nn.Sequential(nn.Linear(5, 5))), cfg)
    assert ad.adapter_report(model)["adapters"]["default"]["trainable"] == 5 * 4
