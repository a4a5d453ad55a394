"""The ``incremental`` stage step: few-shot class-incremental sessions on a frozen backbone, without training.

A stage with ``step: incremental`` takes its model (an earlier stage trained on the base classes, a run folder,
or a pretrained network) as a frozen feature extractor, builds the FSCIL split of its data (base classes, then
sessions of ``ways`` new classes with ``shots`` examples each, or the standard index lists of a user's local
copy), and replays it on an :class:`~edgetune.incremental.learner.IncrementalLearner`::

    - name: sessions
      step: incremental
      model: {from: "stage:base", head: keep}
      incremental: {base_classes: 60, ways: 5, sessions: 8, shots: 5, calibration: teen, draws: 2}

Each shot draw (``draws``, seeds ``seed, seed+1, ...``) replays the sessions; the summary averages them
(``acc_first``, ``acc_last``, ``acc_avg``, ``last_base_acc``, ``last_novel_acc``, ``last_hm``; ``test_acc`` is the
last session's accuracy). ``ncd:`` adds the one-shot controllable-forgetting protocol on the same features (one
novel class at a time, a-priori thresholds for forgetting budgets, the FOR-NCR curve). The stage writes
``sessions.json``, ``ncd.json`` and ``learner.safetensors`` (the first draw's learner after its last session).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError
from edgetune.core.state import atomic_write_json
from edgetune.data.base import parse_classes
from edgetune.data.splits import IncrementalSplit, class_incremental_split
from edgetune.incremental.features import Backbone
from edgetune.incremental.learner import IncrementalLearner, LearnerConfig
from edgetune.incremental.sessions import run_sessions, summarize_sessions
from edgetune.pipeline.steps import StepContext, register_step

__all__ = ["IncrementalStepConfig", "NcdOptions"]

log = logging.getLogger(__name__)


class NcdOptions(Config):
    """The one-shot novel-class protocol: ``budgets`` (fractions), ``rules``, shot ``draws`` per novel class,
    ``shots`` per novel prototype, ``count``: which calibration samples the budget counts (``correct``: those the
    base prototypes get right, an estimate of FOR itself; ``all``: every flagged one, a conservative bound)."""

    count: Literal["correct", "all"] = "correct"
    budgets: list[float] = Field(default_factory=lambda: [0.02, 0.05], min_length=1)
    rules: list[str] = Field(default_factory=lambda: ["base-gate", "novel-ball", "margin", "base-gate-or-vanilla"])
    draws: int = Field(default=5, ge=1)
    shots: int = Field(default=1, ge=1)


class IncrementalStepConfig(Config):
    """The ``incremental:`` options of a ``step: incremental`` stage.

    base_classes: the base session's classes (a count n for 0..n-1, a list, or ``"0-59"``).
    ways / sessions: then ``sessions`` sessions of ``ways`` new classes each, in ascending class order; or
    session_classes: explicit class lists per session; or index_lists: a folder of the standard FSCIL index
        files (``session_1.txt`` ...; CIFAR-100 from TOPIC/CEC), which fix the sessions and shots (checked
        against base_classes, ways, sessions and shots when those are given).
    shots: training examples per new class; draws: shot draws replayed and averaged (seed, seed+1, ...).
    calibration / teen_shift / teen_temperature / normalize_first / gate / budget: the learner's options.
    layer / orders / skip_first / block_norm: take features as moments of this module's output instead of the
        head's input (skip_first drops the first token, [CLS]; block_norm L2-normalizes each order's block).
    ncd: run the one-shot controllable-forgetting protocol too (None: skip).
    """

    base_classes: int | list[int] | str
    ways: int | None = Field(default=None, ge=1)
    sessions: int | None = Field(default=None, ge=0)
    session_classes: list[list[int]] | None = None
    index_lists: str | None = None
    shots: int = Field(default=5, ge=1)
    draws: int = Field(default=1, ge=1)
    calibration: str = "none"
    teen_shift: float = Field(default=0.1, ge=0.0, le=1.0)
    teen_temperature: float = Field(default=16.0, gt=0.0)
    normalize_first: bool = True
    gate: str | None = None
    budget: float | None = None
    layer: str | None = None
    orders: list[int] | None = None
    skip_first: bool = False
    block_norm: bool = False
    batch_size: int = Field(default=256, ge=1)
    ncd: NcdOptions | None = None

    @model_validator(mode="after")
    def _protocol(self) -> IncrementalStepConfig:
        given = [k for k in ("ways", "session_classes") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one way to define the sessions, not {' and '.join(given)}")
        if self.ways is not None and self.sessions is None:
            raise ValueError("ways needs sessions: how many sessions of `ways` new classes (e.g. ways: 5, sessions: 8)")
        if self.calibration not in ("none", "teen"):
            raise ValueError(f"calibration={self.calibration!r}: choose none or teen")
        return self

    def base_list(self) -> list[int]:
        b = self.base_classes
        return list(range(b)) if isinstance(b, int) else parse_classes(b)

    def learner_config(self) -> LearnerConfig:
        return LearnerConfig(calibration=self.calibration, teen_shift=self.teen_shift,
                             teen_temperature=self.teen_temperature, normalize_first=self.normalize_first,
                             gate=self.gate, budget=self.budget)


def _split(opts: IncrementalStepConfig, y_train: torch.Tensor, y_test: torch.Tensor, seed: int) -> IncrementalSplit:
    if opts.index_lists is not None:
        from edgetune.data.fscil_index import split_from_index_lists

        split = split_from_index_lists(opts.index_lists, y_train, y_test)
        found = (len(split.classes[0]), [len(c) for c in split.classes[1:]],
                 {len(t) // max(1, len(c)) for t, c in zip(split.train[1:], split.classes[1:], strict=True)})
        want = (len(opts.base_list()), None if opts.ways is None else [opts.ways] * (opts.sessions or 0), {opts.shots})
        if found[0] != want[0] or (want[1] is not None and found[1] != want[1]) or (found[2] and found[2] != want[2]):
            raise ConfigError(f"the index lists in {opts.index_lists} give {found[0]} base classes, sessions of "
                              f"{found[1]} classes and {sorted(found[2])} shots, but the recipe says {want[0]} base "
                              f"classes, {opts.sessions} sessions of {opts.ways} ways and {opts.shots} shots: make "
                              "them agree (or drop ways/sessions)")
        return split
    base = opts.base_list()
    if opts.session_classes is not None:
        sessions: Any = opts.session_classes
    elif opts.ways is not None:
        sessions = (opts.ways, opts.sessions or 0)
    else:
        rest = sorted(set(y_train.tolist()) - set(base))
        sessions = [[c] for c in rest]  # default: one new class per session
    return class_incremental_split(y_train, y_test, base, sessions, opts.shots, seed=seed)


def _mean_records(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for per_draw in zip(*runs, strict=True):
        rec = dict(per_draw[0])
        for k, v in per_draw[0].items():
            if isinstance(v, float):
                vals = [r[k] for r in per_draw if r.get(k) is not None]
                rec[k] = statistics.fmean(vals) if vals else None
                if len(vals) > 1 and k in ("acc", "base_acc", "novel_acc", "hm"):
                    rec[f"{k}_std"] = statistics.stdev(vals)
        out.append(rec)
    return out


@register_step("incremental", config=IncrementalStepConfig,
               summary="few-shot class-incremental sessions on the frozen model: prototypes, no training")
def incremental_step(ctx: StepContext) -> dict[str, Any]:
    opts: IncrementalStepConfig = ctx.options
    data = ctx.data
    if data.task != "classification":
        raise ConfigError(f"step: incremental needs a classification dataset; {data.name} is {data.task}")
    if opts.index_lists is not None and (data.val is not None or ctx.cfg.data.limit_train or ctx.cfg.data.classes):
        raise ConfigError("incremental.index_lists index the whole training set in its original order, but this "
                          "stage holds part of it out (data.val_fraction, limit_train or classes): set them off in "
                          "this stage, e.g. stages.<name>.data.val_fraction=0")
    backbone = Backbone(ctx.loaded.model, head=ctx.loaded.head if opts.layer is None else None, layer=opts.layer,
                        orders=opts.orders, skip_first=opts.skip_first, block_norm=opts.block_norm, transform=ctx.transform, device=ctx.device,
                        batch_size=opts.batch_size)
    t0 = time.perf_counter()
    train, test = backbone.extract(data.train), backbone.extract(data.test)
    base = opts.base_list()
    val = None
    if data.val is not None:
        vz, vy = backbone.extract(data.val)
        keep = torch.isin(vy, torch.tensor(base))
        val = (vz[keep], vy[keep])
    extract_s = time.perf_counter() - t0
    log.info("features (%s): %d train, %d test, dimension %d in %.1f s", backbone.describe(), len(train[0]),
             len(test[0]), train[0].shape[1], extract_s)
    if opts.gate not in (None, "vanilla") and val is None:
        raise ConfigError(f"incremental.gate={opts.gate} calibrates on held-out base training data: set "
                          "data.val_fraction (e.g. 0.07)")
    runs, learner0 = [], None
    for d in range(opts.draws):
        split = _split(opts, train[1], test[1], ctx.cfg.seed + d)
        learner = IncrementalLearner(None, opts.learner_config())
        runs.append(run_sessions(learner, train, test, split, val=val))
        log.info("draw %d: session accuracy %s", d, " ".join(f"{r['acc']:.3f}" for r in runs[-1]))
        learner0 = learner0 or learner
    records = _mean_records(runs)
    summary = summarize_sessions(records)
    out: dict[str, Any] = {"steps": 0, **summary, "test_acc": summary["acc_last"], "sessions": len(records),
                           "classes": records[-1]["classes"], "feature_dim": int(train[0].shape[1]),
                           "features": backbone.describe(), "extract_seconds": extract_s, "draws": opts.draws,
                           "add_ms": statistics.fmean(r["add_ms"] for r in records[1:]) if len(records) > 1 else 0.0}
    out["step_metrics"] = [k for k in (*summary, "classes", "feature_dim", "features", "draws", "add_ms",
                                       "extract_seconds")]
    if ctx.run_dir is not None:
        atomic_write_json(ctx.run_dir / "sessions.json", {"mean": records, "draws": runs, "options": opts.to_dict()})
        if learner0 is not None:
            learner0.save(ctx.run_dir / "learner.safetensors")
    if opts.ncd is not None:
        figures = _run_ncd(opts, base, train, test, val, ctx)
        out.update(figures)
        out["step_metrics"] += list(figures)
    return out


def _run_ncd(opts: IncrementalStepConfig, base: list[int], train: tuple[torch.Tensor, torch.Tensor],
             test: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
             ctx: StepContext) -> dict[str, Any]:
    from edgetune.incremental.ncd import ncd_protocol
    from edgetune.incremental.prototypes import class_sums, prototypes_from_sums

    assert opts.ncd is not None
    if val is None:
        raise ConfigError("incremental.ncd calibrates its thresholds on held-out base training data: set "
                          "data.val_fraction (e.g. 0.07)")
    # the protocol wants base classes as rows 0..Cb-1 and novel classes under other ids
    top = int(max(train[1].max(), test[1].max())) + 1
    lut = torch.full((top,), -1, dtype=torch.int64)
    lut[torch.tensor(base)] = torch.arange(len(base))
    novel = [c for c in range(top) if c not in set(base)]
    lut[torch.tensor(novel, dtype=torch.int64)] = torch.arange(len(base), len(base) + len(novel))
    (ztr, ytr), (zte, yte), (zv, yv) = [(z, lut[y]) for z, y in (train, test, val)]
    in_base_tr, in_base_te = ytr < len(base), yte < len(base)
    protos = prototypes_from_sums(*class_sums(ztr[in_base_tr], ytr[in_base_tr], list(range(len(base))),
                                              normalize_first=opts.normalize_first)).float()
    n = opts.ncd
    result = ncd_protocol(protos, zv, yv, zte[in_base_te], yte[in_base_te], ztr[~in_base_tr], ytr[~in_base_tr],
                          zte[~in_base_te], yte[~in_base_te], budgets=n.budgets, rules=n.rules, draws=n.draws,
                          shots=n.shots, seed=ctx.cfg.seed, gate_options={"count": n.count})
    if ctx.run_dir is not None:
        atomic_write_json(ctx.run_dir / "ncd.json", result)
    log.info("NCD (one novel class, %d-shot, %d classes x %d draws): vanilla FOR %.4f NCR %.4f", n.shots,
             len(novel), n.draws, result["summary"]["vanilla_for"], result["summary"]["vanilla_ncr"])
    return {f"ncd_{k}": v for k, v in result["summary"].items()}
