"""Trainer sessions: fit() called again with new data and its own budget; hooks, steps, schedules, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.config import validate
from edgetune.core.hooks import Callback, TrainState
from edgetune.train.checkpoint import CheckpointManager
from edgetune.train.config import ScheduleConfig, TrainConfig
from edgetune.train.loop import Trainer
from edgetune.train.metrics import read_metrics
from edgetune.train.optim import lr_factor

SCHED = {"name": "linear", "min_lr_ratio": 0.1}


def blobs(n: int, seed: int, shift: float = 0.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]]) + shift
    return TensorDataset(centers[y] + 0.5 * torch.randn(n, 2, generator=g), y)


A, B = blobs(64, 0), blobs(96, 1, shift=0.5)  # session data: 4 and 6 batches of 16


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 16, "progress": False, "log_every_steps": 2,
            "optimizer": {"name": "adam", "lr": 0.01}, "schedule": SCHED,
            "checkpoint": {"every_steps": 5, "keep_last": 100}}
    base.update(kw)
    return validate(TrainConfig, base)


class Recorder(Callback):
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int, int]] = []  # (hook, step, session, session_start, total)
        self.lrs: list[tuple[int, float]] = []  # (session, lr) of every optimizer step
        self.progress: list[float] = []
        self.opt_at_session_start: list[tuple[torch.optim.Optimizer, dict]] = []

    def _ev(self, hook: str, s: TrainState) -> None:
        self.events.append((hook, s.step, s.session, s.session_start, s.total_steps))

    def on_fit_start(self, s: TrainState) -> None: self._ev("fit_start", s)
    def on_session_start(self, s: TrainState) -> None:
        self._ev("session_start", s)
        state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in s.optimizer.state.items()}
        self.opt_at_session_start.append((s.optimizer, state))
    def on_session_end(self, s: TrainState) -> None: self._ev("session_end", s)
    def on_fit_end(self, s: TrainState) -> None: self._ev("fit_end", s)
    def before_optimizer_step(self, s: TrainState) -> None:
        self.lrs.append((s.session, s.optimizer.param_groups[0]["lr"]))
    def after_optimizer_step(self, s: TrainState) -> None:
        self.progress.append(s.progress)

    def hooks(self) -> list[str]:
        return [e[0] for e in self.events]


def test_two_sessions_hooks_steps_and_schedules(tmp_path):
    rec = Recorder()
    tr = Trainer(make_model(), A, cfg(), test=blobs(32, 9), callbacks=[rec], run_dir=tmp_path)
    s1 = tr.fit()
    s2 = tr.fit(B, max_steps=5)
    assert rec.hooks() == ["fit_start", "session_start", "session_end", "session_start", "session_end"]
    tr.close()
    assert rec.hooks()[-1] == "fit_end"
    # (hook, step, session, session_start, total_steps)
    assert rec.events[:5] == [("fit_start", 0, 0, 0, 8), ("session_start", 0, 0, 0, 8), ("session_end", 8, 0, 0, 8),
                              ("session_start", 8, 1, 8, 13), ("session_end", 13, 1, 8, 13)]
    assert (s1["steps"], s1["session"], s1["session_steps"]) == (8, 0, 8)
    assert (s2["steps"], s2["session"], s2["session_steps"]) == (13, 1, 5)
    assert tr.state.step == 13 and tr.state.session == 1 and tr.state.session_start == 8
    # each session's LR schedule runs over its own steps, from the base LR
    sched = ScheduleConfig(**SCHED)
    lr1 = [lr for s, lr in rec.lrs if s == 0]
    lr2 = [lr for s, lr in rec.lrs if s == 1]
    assert lr1 == pytest.approx([0.01 * lr_factor(i, 8, sched) for i in range(8)])
    assert lr2 == pytest.approx([0.01 * lr_factor(i, 5, sched) for i in range(5)])
    # step hooks see the step before it is counted: progress runs 0 .. (n-1)/n within each session
    assert rec.progress == pytest.approx([i / 8 for i in range(8)] + [i / 5 for i in range(5)])
    # a fresh optimizer for the new session
    (opt0, _), (opt1, state1) = rec.opt_at_session_start
    assert opt1 is not opt0 and state1 == {}
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("session", 0) == (1 if r["step"] > 8 else 0) for r in recs if r["kind"] == "train")
    assert any(r["kind"] == "eval" and r.get("session") == 1 and r["step"] == 13 for r in recs)


def test_second_session_defaults_to_the_same_data_and_the_config_epochs():
    tr = Trainer(make_model(), A, cfg(max_steps=3))
    assert tr.fit()["steps"] == 3  # the config's max_steps caps the first session only
    out = tr.fit()
    assert out["session_steps"] == 2 * 4 and out["steps"] == 11


def test_keep_optimizer_keeps_adam_moments():
    rec = Recorder()
    tr = Trainer(make_model(), A, cfg(), callbacks=[rec])
    tr.fit()
    opt = tr.optimizer
    end_state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    assert end_state and all(float(st["step"]) == 8 for st in end_state.values())
    tr.fit(B, max_steps=3, keep_optimizer=True)
    opt1, state1 = rec.opt_at_session_start[1]
    assert opt1 is opt and tr.optimizer is opt
    assert state1.keys() == end_state.keys()
    for pid, st in end_state.items():
        for k, v in st.items():
            assert torch.equal(state1[pid][k], v), k
    assert all(float(st["step"]) == 11 for st in opt.state.values())
    # the new schedule restarts from the base LR, not from where the old one ended
    lr2 = [lr for s, lr in rec.lrs if s == 1]
    assert lr2 == pytest.approx([0.01 * lr_factor(i, 3, ScheduleConfig(**SCHED)) for i in range(3)])


class Crash(Callback):
    name = "recorder"  # the callback the resumed process runs has this name

    def __init__(self, at: int) -> None:
        self.at = at

    def after_optimizer_step(self, s: TrainState) -> None:
        if s.step == self.at:
            raise RuntimeError("simulated crash")


def uninterrupted(tmp_path, **kw) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tr = Trainer(make_model(), A, cfg(**kw), test=blobs(32, 9), run_dir=tmp_path / "ref", seed=3)
    outs = [tr.fit(), tr.fit(B, max_steps=5)]
    tr.close()
    return {k: v.clone() for k, v in tr.model.state_dict().items()}, outs


# crash mid-session 0; right after session 0 (its final checkpoint, written before the session is recorded done);
# mid-session 1
@pytest.mark.parametrize(("crash_at", "ckpt_step", "ckpt_session"), [(7, 5, 0), (9, 8, 0), (12, 10, 1)])
def test_resume_replays_sessions_and_matches_uninterrupted_run(tmp_path, crash_at, ckpt_step, ckpt_session):
    log3 = {"log_every_steps": 3}  # records at steps 3, 6, 8 (session end), 9, 12, 13: the checkpoints at steps 5
    ref, ref_outs = uninterrupted(tmp_path, **log3)  # and 10 sit inside a record's window
    run = tmp_path / "part"
    part = Trainer(make_model(), A, cfg(**log3), test=blobs(32, 9), run_dir=run, seed=3, callbacks=[Crash(crash_at)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        part.fit()
        part.fit(B, max_steps=5)
    ck = CheckpointManager(run / "checkpoints")
    assert ck.latest().name == f"step-{ckpt_step:09d}.json"
    torch.manual_seed(123)  # disturb the global RNG: resume restores it
    rec = Recorder()
    again = Trainer(make_model(7), A, cfg(**log3), test=blobs(32, 9), run_dir=run, seed=3, callbacks=[rec])
    assert again.resume()
    outs = [again.fit(), again.fit(B, max_steps=5)]
    again.close()
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert outs[1]["steps"] == 13 and outs[1]["session_steps"] == 5
    assert outs[1]["test_acc"] == ref_outs[1]["test_acc"]
    assert outs[0]["steps"] == ref_outs[0]["steps"] == 8
    assert outs[0]["test_acc"] == ref_outs[0]["test_acc"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)

    def records(folder: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(folder / "metrics.jsonl")]

    assert [r["step"] for r in records(run) if r["kind"] == "train"] == [3, 6, 8, 9, 12, 13]
    assert records(run) == records(tmp_path / "ref")  # a window straddling the checkpoint included
    # the sessions this process trained in got their session hooks
    assert rec.hooks().count("session_start") == 2 - ckpt_session
    assert rec.hooks()[-1] == "fit_end"


@pytest.mark.parametrize("ckpt_session", [0, 1])
def test_resumed_process_fires_on_fit_start_once(tmp_path, ckpt_session):
    """Every process that trains gets on_fit_start once (methods set themselves up there), whichever session its
    checkpoint was taken in."""
    run = tmp_path / "part"
    part = Trainer(make_model(), A, cfg(), run_dir=run, seed=3, callbacks=[Crash(7 if ckpt_session == 0 else 12)])
    with pytest.raises(RuntimeError):
        part.fit()
        part.fit(B, max_steps=5)
    rec = Recorder()
    again = Trainer(make_model(), A, cfg(), run_dir=run, seed=3, callbacks=[rec])
    assert again.resume()
    again.fit()
    again.fit(B, max_steps=5)
    assert rec.hooks().count("fit_start") == 1, rec.hooks()
    assert rec.hooks().index("fit_start") < rec.hooks().index("session_start")
