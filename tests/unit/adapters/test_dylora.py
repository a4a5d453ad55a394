"""DyLoRA: the forward at rank b against loops and against a LoRA of the truncated factors, which components a step
trains, the sampler (uniform, one rank per step for every layer, exact resume through edgetune's checkpoints), the
rank verbs, and the paper's claim: after DyLoRA training every rank works, whereas a LoRA trained at the largest
rank and truncated degrades."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import edgetune.adapters as ad
import edgetune.adapters.dylora  # noqa: F401  (registers dylora)
from edgetune.adapters.dylora import (
    DyLoraConfig,
    DyLoraSampler,
    nested_factors,
    set_adapter_rank_,
    truncate_adapter_,
)
from edgetune.adapters.layer import layer_info
from edgetune.adapters.lora import LoraConfig, lora_update
from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback
from edgetune.integrations import MethodStepper
from edgetune.train.config import TrainConfig
from edgetune.train.loop import Trainer


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))


def _adapted(rank: int = 4, **kw: object) -> tuple[nn.Module, nn.Module]:
    base = _mlp()
    model = ad.add_adapter_(copy.deepcopy(base), DyLoraConfig(rank=rank, alpha=2.0 * rank, **kw), seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, lay in ad.adapter_layers(model):
            lay.adapters["default"].lora_B.copy_(torch.randn(lay.adapters["default"].lora_B.shape, generator=g))
    return base, model


def test_forward_at_rank_b_against_a_loop() -> None:
    _, model = _adapted()
    lay = model[0]
    a = lay.adapters["default"]
    x = torch.randn(3, 6)
    for b in range(1, 5):
        a.sampled_rank = b  # training mode: the sampled rank
        with torch.no_grad():
            got = lay(x)
            want = lay.base_layer(x).double()
            for n in range(3):
                for o in range(8):
                    want[n, o] += (8.0 / b) * sum(float(a.lora_B[o, k]) * float(a.lora_A[k] @ x[n]) for k in range(b))
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5, msg=f"rank {b}")


def test_hand_computed_case() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    ad.add_adapter_(model, DyLoraConfig(rank=2, alpha=2.0))
    a = model[0].adapters["default"]
    with torch.no_grad():
        a.lora_A.copy_(torch.eye(2))
        a.lora_B.copy_(torch.tensor([[1.0, 2.0], [0.0, 4.0]]))
        x = torch.tensor([[1.0, 1.0]])
        set_adapter_rank_(model, 1)
        assert model(x).tolist() == [[2.0, 0.0]]  # (2 / 1) * B[:, 0]
        set_adapter_rank_(model, 2)
        assert model(x).tolist() == [[3.0, 4.0]]  # (2 / 2) * (B[:, 0] + B[:, 1])


@pytest.mark.parametrize("kind", ["conv2d", "embedding"])
def test_every_rank_equals_a_lora_of_the_truncated_factors(kind: str) -> None:
    layer = nn.Conv2d(4, 6, 3, padding=1, groups=2) if kind == "conv2d" else nn.Embedding(10, 6)
    model = ad.add_adapter_(nn.Sequential(layer), DyLoraConfig(rank=3, alpha=5.0, kinds=[kind]), seed=2)
    a = model[0].adapters["default"]
    with torch.no_grad():
        for p in (a.lora_A, a.lora_B):
            p.normal_(generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 4, 5, 5) if kind == "conv2d" else torch.randint(0, 10, (2, 7))
    info = layer_info(layer)
    for b in (1, 2, 3):
        set_adapter_rank_(model, b)
        with torch.no_grad():
            want = layer(x) + lora_update(info, x, a.lora_A[:b], a.lora_B[:, :b], 5.0 / b)
            torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
            ad.merge_(model)  # merged at rank b
            torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
            ad.unmerge_(model)


def test_gradients_reach_the_components_the_update_rule_names() -> None:
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    for only_last, trained in ((True, [2]), (False, [0, 1, 2])):
        a.grad = b.grad = None
        fa, fb = nested_factors(a, b, 3, only_last=only_last)
        (fb @ fa).sum().backward()
        assert [k for k in range(4) if a.grad[k].abs().sum() > 0] == trained
        assert [k for k in range(4) if b.grad[:, k].abs().sum() > 0] == trained


@pytest.mark.parametrize("update", ["last", "all"])
def test_a_step_changes_only_the_components_it_trains_even_with_momentum_and_decay(update: str) -> None:
    _, model = _adapted(rank=4, update=update)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    (sampler,) = ad.adapter_callbacks(model, total_steps=12)
    a = model[0].adapters["default"]
    x = torch.randn(8, 6)
    with MethodStepper(model, opt, [sampler], total_steps=12) as stepper:
        for _ in range(12):
            model(x).pow(2).mean().backward()
            b = sampler.current
            before = a.lora_A.detach().clone(), a.lora_B.detach().clone()
            opt.step()
            stepper.step()
            opt.zero_grad()
            moved = [k for k in range(4) if not torch.equal(a.lora_A[k], before[0][k])
                     or not torch.equal(a.lora_B[:, k], before[1][:, k])]
            assert moved == ([b - 1] if update == "last" else list(range(b))), (b, moved)


def test_the_sampler_draws_one_rank_per_step_for_every_layer_uniformly() -> None:
    _, model = _adapted(rank=5, min_rank=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    (sampler,) = ad.adapter_callbacks(model, total_steps=400)
    seen = []
    with MethodStepper(model, opt, [sampler], total_steps=400) as stepper:
        for _ in range(400):
            model(torch.randn(2, 6))
            ranks = {lay.adapters["default"].sampled_rank for _, lay in ad.adapter_layers(model)}
            assert len(ranks) == 1
            seen.append(ranks.pop())
            opt.step()
            stepper.step()
    counts = [seen.count(r) for r in range(1, 6)]
    assert counts[0] == 0 and all(60 <= c <= 140 for c in counts[1:]), counts
    assert stepper.metrics()["dylora_mean_rank"] == pytest.approx(sum(seen[-400:]) / 400)
    assert all(lay.adapters["default"].sampled_rank is None for _, lay in ad.adapter_layers(model))  # after fit


def test_the_sampler_resumes_exactly_from_its_state() -> None:
    _, model = _adapted(rank=6)
    cfg = ad.adapter_configs(model)["default"]
    first = DyLoraSampler(model, cfg, seed=5)
    first.on_session_start(None)  # type: ignore[arg-type]  (the sampler reads nothing of the state)
    ranks = []
    for i in range(30):
        if i == 10:
            saved = first.state_dict()
        ranks.append(first.current)
        first.after_optimizer_step(None)  # type: ignore[arg-type]
    second = DyLoraSampler(model, cfg, seed=999)
    second.load_state_dict(saved)
    second.on_session_start(None)  # type: ignore[arg-type]
    again = []
    for _ in range(20):
        again.append(second.current)
        second.after_optimizer_step(None)  # type: ignore[arg-type]
    assert again == ranks[10:]
    assert len(set(ranks)) > 3


def _blobs(n: int = 120, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 6, (n,), generator=g)
    return TensorDataset(torch.randn(6, 6, generator=g)[y] * 2 + torch.randn(n, 6, generator=g), y)


def test_a_resumed_run_reproduces_the_uninterrupted_one(tmp_path) -> None:
    cfg = validate(TrainConfig, {"epochs": 3, "batch_size": 20, "progress": False, "optimizer": {"name": "adam",
                                 "lr": 0.02}, "checkpoint": {"every_steps": 5, "keep_last": 50}})

    def trainer(run_dir, extra: Callback) -> Trainer:
        model = ad.add_adapter_(_mlp(), DyLoraConfig(rank=4, alpha=8.0, seed=3), seed=1)
        callbacks = ad.adapter_callbacks(model, total_steps=18, steps_per_epoch=6)
        return Trainer(model, _blobs(), cfg, callbacks=[*callbacks, extra], run_dir=run_dir, seed=0)

    class Crash(Callback):
        def after_optimizer_step(self, state) -> None:
            if state.step == 12:
                raise RuntimeError("crash")

    ref = trainer(tmp_path / "a", Callback())
    ref.fit()
    crashed = trainer(tmp_path / "b", Crash())
    with pytest.raises(RuntimeError):
        crashed.fit()
    again = trainer(tmp_path / "b", Callback())
    assert again.resume() and 0 < again.state.step < 13
    again.fit()
    want, got = ad.adapter_state_dict(ref.model), ad.adapter_state_dict(again.model)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert again.callbacks[0].current == ref.callbacks[0].current


def test_rank_verbs() -> None:
    base, model = _adapted(rank=4)
    x = torch.randn(5, 6)
    model.eval()
    with torch.no_grad():
        outs = {}
        for b in (4, 2, 1):
            set_adapter_rank_(model, b)
            outs[b] = model(x)
            assert ad.adapter_configs(model)["default"].eval_rank == b
            a_, b_, s = model[0].adapters["default"].as_lora()
            assert a_.shape[0] == b_.shape[1] == b and s == pytest.approx(8.0 / b)
        assert not torch.allclose(outs[4], outs[2])
        set_adapter_rank_(model, 4)
        ad.merge_(model)
        with pytest.raises(ConfigError, match="unmerge_ it first"):
            set_adapter_rank_(model, 2)
        ad.unmerge_(model)
        with pytest.raises(ConfigError, match=r"outside \[1, 4\]"):
            set_adapter_rank_(model, 5)
        truncate_adapter_(model, 2)
        assert model[0].adapters["default"].lora_A.shape == (2, 6)
        assert ad.adapter_configs(model)["default"].rank == 2
        # same maths, another summation order (rank-2 factors vs the first 2 of rank 4): float32 rounding only
        torch.testing.assert_close(model(x), outs[2], rtol=1e-5, atol=1e-5)
        with ad.disable_adapters(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)
    lora = ad.add_adapter_(_mlp(), rank=2)
    with pytest.raises(ConfigError, match="not DyLoRA"):
        set_adapter_rank_(lora, 1)


def test_config_checks_its_ranks() -> None:
    with pytest.raises(ConfigError, match="min_rank=5 is larger than rank=4"):
        validate(ad.AdapterConfig, {"method": "dylora", "rank": 4, "min_rank": 5})
    with pytest.raises(ConfigError, match="eval_rank=6"):
        validate(ad.AdapterConfig, {"method": "dylora", "rank": 4, "eval_rank": 6})
    assert validate(ad.AdapterConfig, {"method": "dylora", "update": "all"}).update == "all"


# ------------------------------------------------------------------------------------------ the paper's claim
def _low_rank_problem() -> tuple[nn.Module, Tensor, Tensor, float]:
    """A frozen 16 x 16 linear layer; targets of that layer plus a rank-1 update (as fine-tuning updates are
    nearly low rank) and a small second direction, so that every rank can do well."""
    g = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(torch.randn(16, 16, generator=g) / 4)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = torch.randn(256, 16, generator=g)
    with torch.no_grad():
        y = x @ (base[0].weight + (u[:, :2] * torch.tensor([2.0, 0.2])) @ v[:, :2].T).T
        start = float((base(x) - y).pow(2).mean())
    return base, x, y, start


def _fit(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    callbacks = ad.adapter_callbacks(model, total_steps=steps)
    with MethodStepper(model, opt, callbacks, total_steps=steps) as stepper:
        for _ in range(steps):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            stepper.step()
            opt.zero_grad()


def test_every_rank_works_after_dylora_while_a_truncated_lora_degrades() -> None:
    base, x, y, start = _low_rank_problem()
    dy = ad.add_adapter_(copy.deepcopy(base), DyLoraConfig(rank=8, alpha=8.0), seed=1)  # update="last"
    lo = ad.add_adapter_(copy.deepcopy(base), LoraConfig(rank=8, alpha=8.0), seed=1)
    _fit(dy, x, y, 300)
    _fit(lo, x, y, 300)
    dy_loss, lo_loss = [], []
    with torch.no_grad():
        for b in range(1, 9):
            set_adapter_rank_(dy, b)
            dy_loss.append(float((dy(x) - y).pow(2).mean()) / start)
            cut = copy.deepcopy(lo)  # LoRA's first b components at its own scale (kinder to it than alpha / b)
            cut[0].adapters["default"].lora_A[b:] = 0
            lo_loss.append(float((cut(x) - y).pow(2).mean()) / start)
    # measured (fractions of the starting loss, ranks 1..8): DyLoRA 0.011, 0.030, 0.021, 0.011, 0.011, 0.011, 0.015,
    # 0.013 (the best rank-1 update leaves 0.0099; update="all" gives 0.084 ... 0.005); LoRA truncated 0.73, 0.55,
    # 0.44, 0.26, 0.13, 0.06, 0.02, 0.00
    assert max(dy_loss) < 0.05, dy_loss
    assert lo_loss[-1] < 0.01 and min(lo_loss[:4]) > 0.2, lo_loss
