"""The loop: learning, hooks order, exact resume, checkpoint refusal, schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.config import validate
from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.hooks import Callback, TrainState
from edgetune.train.checkpoint import CheckpointManager
from edgetune.train.config import ScheduleConfig, TrainConfig
from edgetune.train.loop import Trainer
from edgetune.train.metrics import read_metrics
from edgetune.train.optim import lr_factor


def blobs(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    x = centers[y] + 0.5 * torch.randn(n, 2, generator=g)
    return TensorDataset(x, y)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 32, "progress": False, "log_every_steps": 4,
            "optimizer": {"name": "sgd", "lr": 0.1}, "checkpoint": {"every_steps": 5, "keep_last": 100}}
    base.update(kw)
    return validate(TrainConfig, base)


def test_trainer_learns_and_logs(tmp_path):
    tr = Trainer(make_model(), blobs(), cfg(), test=blobs(128, seed=1), run_dir=tmp_path)
    out = tr.fit()
    assert out["test_acc"] > 0.9
    assert out["steps"] == 3 * 8
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"train", "eval"}
    assert sum(r["kind"] == "eval" for r in recs) == 3


class Recorder(Callback):
    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.seen = 0

    def on_fit_start(self, s: TrainState) -> None: self.calls.append("fit_start")
    def on_epoch_start(self, s: TrainState) -> None: self.calls.append("epoch_start")
    def after_backward(self, s: TrainState) -> None:
        assert all(p.grad is not None for p in s.model.parameters())
        self.calls.append("after_backward")
    def before_optimizer_step(self, s: TrainState) -> None:
        self.calls.append("before_step")
        s.skip_step = s.step == 0  # skip the very first update
    def after_optimizer_step(self, s: TrainState) -> None: self.calls.append("after_step")
    def on_epoch_end(self, s: TrainState) -> None:
        assert "test_acc" in s.last_eval
        self.calls.append("epoch_end")
    def on_fit_end(self, s: TrainState) -> None: self.calls.append("fit_end")
    def state_dict(self): return {"seen": self.seen, "t": torch.ones(2)}


def test_hooks_run_in_order_and_skip_step_skips():
    model = make_model()
    first = [p.detach().clone() for p in model.parameters()]
    rec = Recorder()
    tr = Trainer(model, blobs(64), cfg(epochs=1, max_steps=1), test=blobs(16), callbacks=[rec])
    tr.fit()
    assert rec.calls == ["fit_start", "epoch_start", "after_backward", "before_step", "after_step", "epoch_end"]
    tr.close()
    assert rec.calls[-1] == "fit_end"
    assert all(torch.equal(a, b) for a, b in zip(first, model.parameters()))  # the step was skipped


class SkipEvery(Callback):
    """Skips the optimizer step every ``k``-th iteration and records the LR each step used."""

    name = "skip"

    def __init__(self, k: int) -> None:
        self.k, self.lrs, self.skipped = k, [], 0

    def before_optimizer_step(self, s: TrainState) -> None:
        s.skip_step = s.step % self.k == self.k - 1
        self.skipped += s.skip_step
        if not s.skip_step:
            self.lrs.append(s.optimizer.param_groups[0]["lr"])


def test_a_skipped_step_does_not_advance_the_lr_schedule():
    # the official CHT code skips optimizer.step on update batches but still steps the scheduler (spec §3, 14)
    sched = {"name": "linear", "min_lr_ratio": 0.01}
    rec = SkipEvery(4)
    tr = Trainer(make_model(), blobs(), cfg(epochs=2, schedule=sched), callbacks=[rec])
    tr.fit()
    total = 2 * 8
    assert rec.skipped == 4
    expect = [0.1 * lr_factor(i, total, ScheduleConfig(**sched)) for i in range(total - rec.skipped)]
    assert rec.lrs == pytest.approx(expect)


def test_the_loop_steps_a_per_epoch_schedule_by_epoch():
    sched = {"name": "linear", "min_lr_ratio": 0.01, "per_epoch": True, "end_fraction": 0.5}
    rec = SkipEvery(10**6)  # records every step's learning rate, skips none
    Trainer(make_model(), blobs(), cfg(epochs=4, schedule=sched), callbacks=[rec]).fit()
    assert rec.lrs == pytest.approx([0.1] * 8 + [0.1 * 0.505] * 8 + [0.1 * 0.01] * 16)


def test_resume_from_middle_checkpoint_reproduces_uninterrupted_run(tmp_path, caplog):
    full = Trainer(make_model(), blobs(), cfg(), test=blobs(64, 1), run_dir=tmp_path / "a", seed=3)
    full.fit()
    ref = {k: v.clone() for k, v in full.model.state_dict().items()}

    class Crash(Callback):
        def after_optimizer_step(self, s: TrainState) -> None:
            if s.step == 11:
                raise RuntimeError("simulated crash")

    part = Trainer(make_model(), blobs(), cfg(), test=blobs(64, 1), run_dir=tmp_path / "b", seed=3,
                   callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        part.fit()  # dies mid-epoch 2, after checkpoints at steps 5 and 10
    ck = CheckpointManager(tmp_path / "b" / "checkpoints")
    for p in ck.list():
        if p.name != "step-000000010.json":
            p.unlink()
    assert ck.latest().name == "step-000000010.json"
    torch.manual_seed(123)  # disturb the global RNG: resume must restore it
    again = Trainer(make_model(), blobs(), cfg(), test=blobs(64, 1), run_dir=tmp_path / "b", seed=3,
                    callbacks=[Callback()])
    with caplog.at_level("INFO", logger="edgetune.train.loop"):
        assert again.resume()
    assert "at step 10 (session 0, " in caplog.text  # the session the checkpoint was taken in
    assert again.state.step == 10
    assert again.earlier_time_s > 0  # the time the crashed process trained, carried by the checkpoint
    out = again.fit()
    assert out["earlier_time_s"] == again.earlier_time_s
    assert again.elapsed_s() > again.earlier_time_s
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicate records from the interrupted part

    def records(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    # the record at step 12 averages steps 9-12, its window straddling the checkpoint at step 10
    assert [r["step"] for r in records("b") if r["kind"] == "train"] == [4, 8, 12, 16, 20, 24]
    assert records("b") == records("a")


def test_corrupt_and_foreign_checkpoints_are_refused_before_loading(tmp_path):
    tr = Trainer(make_model(), blobs(64), cfg(epochs=1), run_dir=tmp_path)
    tr.fit()
    latest = CheckpointManager(tmp_path / "checkpoints").latest()
    assert latest is not None
    other = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    foreign = Trainer(other, blobs(64), cfg(epochs=1), run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="another model or topology"):
        foreign.resume(latest)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())

    blob = latest.with_suffix(".safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointManager.load(latest)
    latest.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointManager.load(latest)
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not an edgetune checkpoint"):
        CheckpointManager.load(tmp_path / "x.json")


def test_keep_last_prunes_old_checkpoints(tmp_path):
    tr = Trainer(make_model(), blobs(), validate(TrainConfig, {**cfg().to_dict(),
                 "checkpoint": {"every_steps": 2, "keep_last": 2}}), run_dir=tmp_path)
    tr.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000022.json", "step-000000022.safetensors",
                     "step-000000024.json", "step-000000024.safetensors"]


def test_lr_schedules_are_pure_and_hit_endpoints():
    cos = validate(ScheduleConfig, {"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1})
    assert lr_factor(0, 110, cos) == pytest.approx(0.1)
    assert lr_factor(9, 110, cos) == pytest.approx(1.0)
    assert lr_factor(10, 110, cos) == pytest.approx(1.0)
    assert lr_factor(60, 110, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 110, cos) == pytest.approx(0.1)
    step = validate(ScheduleConfig, {"name": "step", "milestones": [0.5], "gamma": 0.1})
    assert lr_factor(49, 100, step) == 1.0 and lr_factor(50, 100, step) == pytest.approx(0.1)
    lin = validate(ScheduleConfig, {"name": "linear"})
    assert lr_factor(25, 100, lin) == pytest.approx(0.75)
    assert math.isclose(lr_factor(5, 100, validate(ScheduleConfig, {"name": "constant"})), 1.0)


def test_per_epoch_linear_schedule_equals_torch_linearlr_stepped_each_epoch():
    # the official CHT/CHTs MLP code: LinearLR(1 -> 0.01, total_iters=int(0.9 * epochs)), stepped per epoch
    epochs, spe = 20, 7
    sched = validate(ScheduleConfig, {"name": "linear", "min_lr_ratio": 0.01, "end_fraction": 0.9,
                                      "per_epoch": True})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.01, total_iters=int(epochs * 0.9))
    for e in range(epochs):
        for b in range(spe):
            assert lr_factor(e * spe + b, epochs * spe, sched, spe) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    # per step, ending early: the end value from 90% of the steps on
    lin = validate(ScheduleConfig, {"name": "linear", "min_lr_ratio": 0.01, "end_fraction": 0.9})
    assert lr_factor(45, 100, lin) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(90, 100, lin) == pytest.approx(0.01) and lr_factor(99, 100, lin) == pytest.approx(0.01)
    # without steps_per_epoch the per-epoch flag cannot apply: per step
    assert lr_factor(45, 100, sched) == pytest.approx(0.01 + 0.99 * 0.5)
    with pytest.raises(ConfigError, match="end_fraction=0.9 applies to the cosine and linear"):
        validate(ScheduleConfig, {"name": "step", "end_fraction": 0.9})


def test_bad_train_configs_are_config_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        validate(TrainConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match="device"):
        validate(TrainConfig, {"device": "tpu"})
    with pytest.raises(ConfigError, match="milestones"):
        validate(ScheduleConfig, {"name": "step", "milestones": [0.8, 0.2]})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            Trainer(make_model(), blobs(), cfg(device="cuda"))
