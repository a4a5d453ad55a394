"""SoRA: the gated forward and the proximal step against loop references, the learning rate of the gate's own
parameter group, the lambda schedule, pruning that keeps the outputs, and learning checks (sparsity rises with
lambda; a rank-2 target is found with 2 of 8 ranks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import edgetune.adapters as ad
import edgetune.adapters.sora  # noqa: F401  (registers sora)
from edgetune.adapters.sora import SoraAdapter, SoraConfig, prune_sora_, soft_threshold, sora_lambda
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import TrainState
from edgetune.integrations import MethodStepper


def _naive_soft_threshold(g: list[float], t: float) -> list[float]:
    out = []
    for v in g:
        if v > t:
            out.append(v - t)
        elif v < -t:
            out.append(v + t)
        else:
            out.append(0.0)
    return out


def test_soft_threshold_against_a_loop() -> None:
    g = torch.tensor([1.5, -0.2, 0.05, -3.0, 0.0, 0.29, -0.25])
    got = soft_threshold(g, 0.3)
    assert got.tolist() == pytest.approx(_naive_soft_threshold(g.tolist(), 0.3), abs=1e-6)
    assert (got[[1, 2, 4, 5, 6]] == 0).all()  # exactly zero, not just small
    assert soft_threshold(g, 0.0).tolist() == g.tolist()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))


def _with_gates(model: nn.Module, rank: int = 4, lam: float = 1e-3) -> nn.Module:
    ad.add_adapter_(model, SoraConfig(rank=rank, alpha=2.0 * rank, sparsity_lambda=lam), seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, lay in ad.adapter_layers(model):
            a = lay.adapters["default"]
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))
            a.lora_gate.copy_(torch.randn(a.lora_gate.shape, generator=g))
    return model


def test_gated_forward_against_a_loop() -> None:
    model = _with_gates(_mlp())
    lay = model[0]
    a = lay.adapters["default"]
    x = torch.randn(5, 6)
    with torch.no_grad():
        got = lay(x)
        want = lay.base_layer(x).double()
        for n in range(5):
            for o in range(8):  # layer 0: 6 -> 8
                want[n, o] += a.scale * sum(float(a.lora_gate[k]) * float(a.lora_B[o, k]) *
                                            float(a.lora_A[k] @ x[n]) for k in range(a.rank))
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)


def test_hand_computed_case() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    ad.add_adapter_(model, SoraConfig(rank=2, alpha=2.0))
    a = model[0].adapters["default"]
    with torch.no_grad():
        a.lora_A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        a.lora_B.copy_(torch.tensor([[2.0, 3.0], [1.0, 1.0]]))
        a.lora_gate.copy_(torch.tensor([0.5, 0.0]))
        # s = 1; the second rank is gated off: y = 0.5 * B[:, 0] * (A[0] . x)
        assert model(torch.tensor([[1.0, 1.0]])).tolist() == [[1.0, 0.5]]


def test_the_proximal_step_follows_each_gate_groups_learning_rate() -> None:
    """One SGD step then the callback: each gate equals the naive prox(g - lr * grad, lr * lambda) of its group."""
    lam = 2.0
    model = _with_gates(_mlp(), lam=lam)
    gates = [lay.adapters["default"].lora_gate for _, lay in ad.adapter_layers(model)]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not g for g in gates)]
    lrs = (0.5, 0.05)
    opt = torch.optim.SGD([{"params": rest, "lr": 0.1}, {"params": [gates[0]], "lr": lrs[0]},
                           {"params": [gates[1]], "lr": lrs[1]}])
    (cb,) = ad.adapter_callbacks(model, total_steps=10)
    model(torch.randn(7, 6)).pow(2).mean().backward()
    want = [_naive_soft_threshold((g - lr * g.grad).tolist(), lr * lam) for g, lr in zip(gates, lrs, strict=True)]
    opt.step()
    cb.after_optimizer_step(TrainState(model=model, optimizer=opt, device=torch.device("cpu"), total_steps=10,
                                       steps_per_epoch=10))
    for g, w in zip(gates, want, strict=True):
        assert g.tolist() == pytest.approx(w, abs=1e-6)
    assert any(v == 0 for w in want for v in w), "the case should zero some gates"


def test_lambda_schedule() -> None:
    assert sora_lambda(0.1, 0.5, "linear", 0.0) == pytest.approx(0.1)
    assert sora_lambda(0.1, 0.5, "linear", 0.5) == pytest.approx(0.3)
    assert sora_lambda(0.1, 0.5, "constant", 0.5) == pytest.approx(0.1)
    assert sora_lambda(0.1, None, "linear", 0.9) == pytest.approx(0.1)


def test_the_callback_sweeps_lambda_over_training() -> None:
    model = ad.add_adapter_(_mlp(), SoraConfig(rank=2, sparsity_lambda=0.0, lambda_schedule="linear", lambda_end=1.0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    seen = []
    with MethodStepper(model, opt, ad.adapter_callbacks(model, total_steps=10), total_steps=10) as stepper:
        for _ in range(10):
            model(torch.randn(3, 6)).sum().backward()
            opt.step()
            stepper.step()
            opt.zero_grad()
            seen.append(stepper.metrics()["sora_lambda"])
    assert seen == pytest.approx([i / 10 for i in range(10)])


def test_invariants_start_merge_disable() -> None:
    base = _mlp()
    model = ad.add_adapter_(copy.deepcopy(base), SoraConfig(rank=4), seed=1)
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    model = _with_gates(copy.deepcopy(base))
    with torch.no_grad():
        y = model(x)
        ad.merge_(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        with ad.disable_adapters(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)
        ad.unmerge_(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)


def test_pruning_keeps_the_outputs_and_shrinks_each_layer_to_its_own_rank() -> None:
    model = _with_gates(_mlp(), rank=5)
    with torch.no_grad():
        model[0].adapters["default"].lora_gate[[1, 3]] = 0
        model[2].adapters["default"].lora_gate[[0, 1, 2, 4]] = 0
    x = torch.randn(6, 6)
    with torch.no_grad():
        y = model(x)
        lora = {p: lay.adapters["default"].as_lora() for p, lay in ad.adapter_layers(model)}
    assert prune_sora_(model) is model
    ranks = {p: lay.adapters["default"].rank for p, lay in ad.adapter_layers(model)}
    assert ranks == {"0": 3, "2": 1}
    for p, lay in ad.adapter_layers(model):
        a = lay.adapters["default"]
        assert a.lora_A.shape[0] == a.lora_B.shape[1] == a.lora_gate.numel() == ranks[p]
        assert (a.lora_gate != 0).all()
        assert lora[p][0].shape[0] == ranks[p]  # as_lora already held only the non-zero ranks
        torch.testing.assert_close(a.as_lora()[1], lora[p][1])
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)
        ad.merge_(model)  # a pruned adapter merges like any other
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)


def test_a_layer_pruned_to_rank_zero_is_its_base() -> None:
    base = _mlp()
    model = _with_gates(copy.deepcopy(base))
    with torch.no_grad():
        model[2].adapters["default"].lora_gate.zero_()
    prune_sora_(model)
    assert model[2].adapters["default"].rank == 0
    x = torch.randn(4, 6)
    with torch.no_grad():
        h = torch.randn(4, 8)  # layer 2's input
        torch.testing.assert_close(model[2](h), base[2](h), rtol=0, atol=0)
        y = model(x)
        ad.merge_(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)


def test_pruning_needs_a_sora_adapter() -> None:
    model = ad.add_adapter_(_mlp(), rank=2)
    with pytest.raises(ConfigError, match="not SoRA"):
        prune_sora_(model)
    with pytest.raises(ConfigError, match="no adapter named"):
        prune_sora_(model, "other")


# ------------------------------------------------------------------------------------------ learning
def _rank2_problem() -> tuple[nn.Module, Tensor, Tensor, float]:
    """A frozen 16 x 16 linear layer and targets of that layer plus a rank-2 update (singular values 2 and 1)."""
    g = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(torch.randn(16, 16, generator=g) / 4)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = torch.randn(256, 16, generator=g)
    with torch.no_grad():
        y = x @ (base[0].weight + (u[:, :2] * torch.tensor([2.0, 1.0])) @ v[:, :2].T).T
        start = float((base(x) - y).pow(2).mean())
    return base, x, y, start


def _train_sora(base: nn.Module, x: Tensor, y: Tensor, lam: float, steps: int) -> tuple[nn.Module, dict[str, float]]:
    model = ad.add_adapter_(copy.deepcopy(base), SoraConfig(rank=8, alpha=8.0, sparsity_lambda=lam), seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.02)
    callbacks = ad.adapter_callbacks(model, total_steps=steps)
    with MethodStepper(model, opt, callbacks, total_steps=steps) as stepper:
        for _ in range(steps):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            stepper.step()
            opt.zero_grad()
    return model, stepper.metrics()


def test_sparsity_rises_with_lambda() -> None:
    base, x, y, _ = _rank2_problem()
    zeros = [_train_sora(base, x, y, lam, 150)[1]["sora_zero_fraction"] for lam in (0.0, 0.3, 1.0, 3.0)]
    # measured: 0.0, 0.0, 0.375, 1.0 (loss 2e-6, 2e-5, 1e-4, 1.0 of the start)
    assert zeros == sorted(zeros) and zeros[0] == 0.0 and zeros[-1] == 1.0, zeros


def test_sora_finds_the_rank_of_the_update_and_prunes_to_it() -> None:
    base, x, y, start = _rank2_problem()
    model, metrics = _train_sora(base, x, y, 1.5, 600)
    with torch.no_grad():
        loss = float((model(x) - y).pow(2).mean()) / start
        prune_sora_(model)
        pruned = float((model(x) - y).pow(2).mean()) / start
    # measured: 2 of 8 ranks kept, loss 0.003 of the starting loss; plain LoRA of rank 8 has no such choice
    assert metrics["sora_mean_rank"] == 2.0 and metrics["sora_zero_fraction"] == 0.75, metrics
    assert loss < 0.02, loss
    assert pruned == pytest.approx(loss, rel=1e-4)
    assert isinstance(model[0].adapters["default"], SoraAdapter) and model[0].adapters["default"].rank == 2


def test_training_moves_only_the_adapter() -> None:
    base, x, y, _ = _rank2_problem()
    model, _ = _train_sora(base, x, y, 0.5, 5)
    assert torch.equal(model[0].base_layer.weight, base[0].weight)
    assert not torch.equal(model[0].adapters["default"].lora_gate, torch.ones(8))
