"""Run a validated recipe end to end: for each stage, data -> model source -> method sections -> the stage's
step (training, evaluation, or a family's own step) -> measurements -> run folder and report.

A recipe without ``stages:`` is one stage written straight into the run folder. With stages, each stage gets
``<run_dir>/stages/<name>/`` (itself a complete run folder: config, metrics, checkpoints, model, summary) and
the run folder holds the whole recipe, a summary of every stage and one report comparing them. ``--resume``
keeps finished stages untouched and continues at the stage that was interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from edgetune.core.config import dump_yaml, load_yaml, validate
from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.freeze import set_trainable_, trainable_report
from edgetune.core.hooks import Callback
from edgetune.core.runs import final_stage_folder
from edgetune.core.sections import SECTIONS, SectionContext
from edgetune.core.seed import seed_everything
from edgetune.core.state import atomic_write_bytes, atomic_write_json, load_tensors, save_tensors
from edgetune.data.augment import build_augment
from edgetune.data.base import DataBundle, load_dataset
from edgetune.data.batches import batch_inputs, compose, take, to_device
from edgetune.models.base import ModelSpec
from edgetune.models.source import LoadedModel
from edgetune.pipeline.runfolder import claim_run_folder
from edgetune.pipeline.sources import load_model_source, loop_task
from edgetune.pipeline.stages import resolve_stages
from edgetune.pipeline.steps import STEPS, StepContext
from edgetune.recipe import RunConfig, recipe_schema
from edgetune.train.loop import resolve_device

__all__ = ["RESUME_KEYS", "LoadedRun", "RunResult", "load_run_model", "new_run_dir", "resume", "run"]

#: settings ``--resume`` may change; they are applied for real (the rest would contradict the checkpoint)
RESUME_KEYS = ("train.epochs", "train.max_steps", "train.device", "train.num_threads", "train.progress",
               "train.eval_batch_size", "train.log_every_steps", "train.eval_every_epochs",
               "train.checkpoint.every_epochs", "train.checkpoint.every_steps", "train.checkpoint.keep_last")

log = logging.getLogger(__name__)
MODEL_INFO = "model.json"


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    report: Path | None


class LoadedRun(NamedTuple):
    """A finished run's model rebuilt from its folder, its recipe, its data, the loaded model's extras, and the
    folder it came from (a staged run's last finished stage)."""

    model: torch.nn.Module
    cfg: RunConfig
    bundle: DataBundle | None
    loaded: LoadedModel
    run_dir: Path


def new_run_dir(cfg: RunConfig) -> Path:
    """A fresh folder ``<output_dir>/<name>-<UTC time>[-N]``."""
    base = Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ------------------------------------------------------------------------------------------ pieces
def _apply_sections(model: torch.nn.Module, cfg: RunConfig, ctx: SectionContext) -> list[Callback]:
    """Apply the recipe's family sections in the order the recipe writes them."""
    callbacks: list[Callback] = []
    for name in cfg.section_names():
        log.info("applying recipe section %r", name)
        callbacks.extend(SECTIONS.get(name)(model, cfg.section(name), ctx))
    return callbacks


def _prepare_text(bundle: DataBundle, loaded: LoadedModel, cfg: RunConfig) -> DataBundle:
    """Tokenize text splits with the model's own tokenizer (checked against the model's embeddings)."""
    from edgetune.data.text_classification import TextDataset

    if not isinstance(bundle.train, TextDataset):
        return bundle
    from edgetune.data.tokenize import check_tokenizer, tokenize_bundle

    if loaded.tokenizer is None:
        raise ConfigError(
            f"dataset {bundle.name!r} is raw text but the model ({loaded.source}) has no tokenizer; use a text model "
            "(model.name=minilm, or model.hf=FOLDER with its tokenizer)"
        )
    check_tokenizer(loaded.tokenizer, loaded.model)
    return tokenize_bundle(bundle, loaded.tokenizer, cfg.model.max_length)


def _inputs_sampler(bundle: DataBundle, transform: Any, device: torch.device):
    """``fn(n) -> first positional input of the first n training examples``, transformed (for data-driven inits)."""

    def sample(n: int | None = None) -> torch.Tensor:
        k = len(bundle.train) if n is None else min(n, len(bundle.train))
        batch = to_device(take(bundle.train, torch.arange(k)), device)
        batch = transform(batch) if transform is not None else batch
        args, kwargs = batch_inputs(batch)
        return args[0] if args else next(iter(kwargs.values()))

    return sample


def _measure(loaded: LoadedModel, bundle: DataBundle, transform: Any, task: str, device: torch.device,
             weights: Path) -> dict[str, Any]:
    from edgetune.measure import (
        bytes_on_disk,
        count_nonzeros,
        count_parameters,
        measure_latency,
        peak_rss_bytes,
    )
    from edgetune.train.tasks import get_task

    model = loaded.model
    batch = to_device(take(bundle.test, torch.arange(1)), device)
    batch = transform(batch) if transform is not None else batch
    fwd = get_task(task).forward
    model.eval()
    with torch.no_grad():
        lat = measure_latency(lambda: fwd(model, batch), warmup=3, repeats=20, device=device)
    out: dict[str, Any] = {
        "parameters": count_parameters(model),
        "nonzeros": count_nonzeros(model),
        "model_bytes": bytes_on_disk(weights),
        "latency_ms_batch1": lat.median_s * 1e3,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _family_files(model: torch.nn.Module, cfg: RunConfig, folder: Path) -> list[str]:
    """Files a family writes in its own format beside model.safetensors (e.g. an adapter's own tensors)."""
    from edgetune.core.plugins import SAVERS

    files: list[str] = []
    for name in cfg.section_names():
        if name in SAVERS:
            files += [str(Path(f).relative_to(folder)) for f in SAVERS.get(name)(model, cfg.section(name), folder)]
    return files


def _write_start(run_dir: Path, cfg: RunConfig, command: str | None, resume: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", dump_yaml(cfg.to_dict()).encode())
    cmd = command or shlex.join(sys.argv)
    if resume:
        prev = (run_dir / "command.txt").read_text() if (run_dir / "command.txt").exists() else ""
        cmd = prev.rstrip("\n") + ("\n" if prev else "") + cmd
    atomic_write_bytes(run_dir / "command.txt", (cmd + "\n").encode())


# ------------------------------------------------------------------------------------------ a stage
def _prepare(cfg: RunConfig, device: torch.device, stages: dict[str, Any] | None, stage: str):
    """Data, model source, tokenization and freezing of a stage: ``(bundle, loaded, spec, transform,
    train_transform)``; the last is None unless ``data.augment`` adds train-only augmentation (checked here,
    before any model is built)."""
    bundle = load_dataset(cfg.data)
    black = bundle.normalization.black if bundle.normalization is not None else None  # pad as black
    augment = build_augment(cfg.data.augment, bundle.input_shape, black)  # refuses a non-image dataset early
    log.info("[%s] data: %s (%d train, %d test) from %s", stage, bundle.name, len(bundle.train), len(bundle.test),
             bundle.source)
    spec = ModelSpec(input_shape=bundle.input_shape, num_classes=bundle.num_classes, task=bundle.task)
    loaded = load_model_source(cfg.model, spec, device, stages=stages,
                               generator=torch.Generator().manual_seed(cfg.seed))
    loaded.task = loop_task(cfg.model.task, bundle.task)
    bundle = _prepare_text(bundle, loaded, cfg)
    patterns = cfg.train.trainable or (["head"] if cfg.model.task == "features" else None)
    if patterns:
        set_trainable_(loaded.model, patterns, head=loaded.head)
    transform = compose(bundle.transform, loaded.transform)
    train_transform = compose(bundle.transform, augment, loaded.transform) if augment is not None else None
    return bundle, loaded, spec, transform, train_transform


def _record(cfg: RunConfig, stage: str, stage_dir: Path, summary: dict[str, Any], loaded: LoadedModel,
            bundle: DataBundle, spec: ModelSpec, transform: Any, callbacks: list[Callback], device: torch.device,
            t0: float) -> None:
    """Save the stage's model (and its families' files), measure it, and write its summary.json."""
    from edgetune.measure import environment

    model = loaded.model
    weights = stage_dir / "model.safetensors"
    save_tensors(model.state_dict(), weights, metadata={"format": "edgetune-model"})
    summary["family_files"] = _family_files(model, cfg, stage_dir)
    atomic_write_json(stage_dir / MODEL_INFO, {
        "spec": {"input_shape": list(spec.input_shape), "num_classes": spec.num_classes, "task": spec.task},
        "task": loaded.task, "head": loaded.head, "source": loaded.source})
    summary.update(trainable_report(model))  # after the step: methods may change sizes during training
    summary.update(_measure(loaded, bundle, transform, loaded.task, device, weights))
    summary.update({
        "stage": stage, "step": cfg.step, "task": loaded.task, "model_source": loaded.source,
        "model_notes": loaded.notes, "dataset": bundle.name, "train_examples": len(bundle.train),
        "data_source": bundle.source, "data_notes": bundle.notes, "seed": cfg.seed,
        # a resumed run adds the time its earlier processes spent training (from the checkpoint)
        "wall_time_s": time.perf_counter() - t0 + summary.get("earlier_time_s", 0.0),
        "environment": environment(),
        "method_metrics": {k: v for cb in callbacks for k, v in cb.metrics().items()},
    })
    checks = {k: summary.get(k.removeprefix("min_")) for k in cfg.expect}
    summary["expect"] = {k: {"min": v, "got": checks[k], "ok": checks[k] is not None and checks[k] >= v}
                         for k, v in cfg.expect.items()}
    atomic_write_json(stage_dir / "summary.json", summary)


def run_stage(cfg: RunConfig, stage_dir: Path, *, resume: bool = False, stages: dict[str, Any] | None = None,
              stage: str = "main") -> tuple[dict[str, Any], LoadedModel]:
    """Run one stage into ``stage_dir``; return its summary and its model (for later stages)."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    bundle, loaded, spec, transform, train_transform = _prepare(cfg, device, stages, stage)
    steps_per_epoch = -(-len(bundle.train) // cfg.train.batch_size)
    total = cfg.train.epochs * steps_per_epoch
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    ctx = SectionContext(total_steps=total, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs, device=device,
                         seed=cfg.seed, run_dir=stage_dir, sample_inputs=_inputs_sampler(bundle, transform, device),
                         head=loaded.head if loaded.task == "classification" else None)
    callbacks = _apply_sections(loaded.model, cfg, ctx)
    entry = STEPS.entry(cfg.step)
    step_ctx = StepContext(loaded=loaded, data=bundle, cfg=cfg, device=device, run_dir=stage_dir, task=loaded.task,
                           transform=transform, callbacks=callbacks, resume=resume, train_transform=train_transform,
                           options=cfg.section(cfg.step) if entry.config is not None else None,
                           stages=dict(stages or {}))
    summary = dict(entry.obj(step_ctx))
    summary["rank"] = _rank()
    if summary["rank"] == 0:
        _record(cfg, stage, stage_dir, summary, loaded, bundle, spec, transform, callbacks, device, t0)
    return summary, loaded


# ------------------------------------------------------------------------------------------ a run
def run(cfg: RunConfig, run_dir: str | Path | None = None, *, resume: bool = False,
        write_report: bool = True, command: str | None = None) -> RunResult:
    """Run ``cfg`` into ``run_dir`` (a new folder when None); with ``resume`` continue from its checkpoints.

    ``command`` is recorded in the run folder and the report (default: this process's argv).
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    rank = _rank()
    stages = resolve_stages(cfg)
    with claim_run_folder(run_dir, resume=resume, main=rank == 0):
        if rank == 0:
            _write_start(run_dir, cfg, command, resume)
        if not cfg.stages:
            summary, _ = run_stage(cfg, run_dir, resume=resume)
        else:
            summary = _run_stages(cfg, stages, run_dir, resume=resume, t0=t0, command=command)
        report = None
        if rank == 0 and write_report:
            from edgetune.report import write_report as _write

            report = _write(run_dir)
    from edgetune.train.distributed import shutdown

    shutdown()  # waits for every rank in a distributed run; nothing otherwise
    return RunResult(run_dir=run_dir, summary=summary, report=report)


def _run_stages(cfg: RunConfig, stages: list[tuple[str, RunConfig]], run_dir: Path, *, resume: bool,
                t0: float, command: str | None = None) -> dict[str, Any]:
    rank = _rank()
    models: dict[str, Any] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for name, scfg in stages:
        sdir = run_dir / "stages" / name
        done = sdir / "summary.json"
        if resume and done.is_file():
            log.info("stage %s finished earlier: kept as it is", name)
            summaries[name] = json.loads(done.read_text())
            models[name] = _lazy_stage_model(sdir)
            continue
        log.info("stage %s: %s", name, scfg.step)
        if rank == 0:
            _write_start(sdir, scfg, command, resume and sdir.exists())
        summary, loaded = run_stage(scfg, sdir, resume=resume and sdir.exists(), stages=models, stage=name)
        summaries[name] = summary
        models[name] = lambda loaded=loaded: loaded
    from edgetune.measure import environment

    top = {"stages": summaries, "order": [n for n, _ in stages], "seed": cfg.seed,
           "wall_time_s": time.perf_counter() - t0, "environment": environment(),
           "expect": {f"{n}.{k}": e for n, s in summaries.items() for k, e in s.get("expect", {}).items()}}
    if rank == 0:
        atomic_write_json(run_dir / "summary.json", top)
    return top


def _lazy_stage_model(folder: Path):
    cache: list[LoadedModel] = []

    def get() -> LoadedModel:
        if not cache:
            cache.append(load_run_model(folder).loaded)
        return cache[0]

    return get


def resume(run_dir: str | Path, overrides: tuple[str, ...] = (), command: str | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its newest checkpoint (its config.yaml is the recipe)."""
    from edgetune.core.config import apply_overrides, parse_override

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml); pass the folder `edgetune run` created")
    refused = [".".join(parse_override(o)[0]) for o in overrides]
    refused = [k for k in refused if k not in RESUME_KEYS]
    if refused:
        raise ConfigError(
            f"--resume cannot change {', '.join(refused)}: the checkpoint was taken under the old value, so the run "
            f"would mix two settings. A resumed run may change only {', '.join(RESUME_KEYS)}; to change anything "
            "else, start a new run"
        )
    data = apply_overrides(load_yaml(run_dir / "config.yaml"), overrides)
    cfg = validate(recipe_schema(), data)
    return run(cfg, run_dir, resume=True, command=command)


# ------------------------------------------------------------------------------------------ reloading
def load_run_model(run_dir: str | Path, device: str = "cpu", *, with_data: bool | None = None) -> LoadedRun:
    """Rebuild the trained model of a finished run folder (model source + method sections + trained weights).

    A staged run folder gives its last finished stage. Returns the model in eval mode, the recipe, the dataset
    (loaded when the folder predates ``model.json`` or ``with_data`` is True) and the :class:`LoadedModel`.
    The caller's random state is left as it was (rebuilding draws initial weights that the file then replaces).
    """
    from edgetune.core.seed import rng_state, set_rng_state

    saved = rng_state()
    try:
        return _load_run_model(Path(run_dir), device, with_data)
    finally:
        set_rng_state(saved)


def _load_run_model(run_dir: Path, device: str, with_data: bool | None) -> LoadedRun:
    if (run_dir / "stages").is_dir() and not (run_dir / "model.safetensors").is_file():
        run_dir = final_stage_folder(run_dir)
    weights = run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not weights.is_file():
        raise ConfigError(f"{run_dir} is not a finished run folder (it needs config.yaml and model.safetensors); "
                          "give the folder `edgetune run` wrote, after the run finished")
    cfg = validate(recipe_schema(), load_yaml(run_dir / "config.yaml"), where=str(run_dir / "config.yaml"))
    seed_everything(cfg.seed)
    info_file = run_dir / MODEL_INFO
    bundle = None
    if info_file.is_file() and not with_data:
        info = json.loads(info_file.read_text())
        s = info["spec"]
        spec = ModelSpec(tuple(s["input_shape"]), int(s["num_classes"]), s["task"])
    else:
        bundle = load_dataset(cfg.data)
        spec = ModelSpec(input_shape=bundle.input_shape, num_classes=bundle.num_classes, task=bundle.task)
    stages = None
    if cfg.model.source_kind == "stage":  # a stage folder: its source stage is a sibling folder
        ref = cfg.model.from_.removeprefix("stage:")
        stages = {ref: _lazy_stage_model(run_dir.parent / ref)}
    dev = torch.device(device)
    loaded = load_model_source(cfg.model, spec, dev, stages=stages, generator=torch.Generator().manual_seed(cfg.seed))
    loaded.task = loop_task(cfg.model.task, spec.task)
    ctx = SectionContext(total_steps=1, steps_per_epoch=1, epochs=1, device=dev, seed=cfg.seed, run_dir=None,
                         head=loaded.head if loaded.task == "classification" else None)
    _apply_sections(loaded.model, cfg, ctx)
    try:
        state = load_tensors(weights, device=device)
    except Exception as err:  # noqa: BLE001  (safetensors raises its own types for a cut or garbled file)
        raise ConfigError(f"{weights} cannot be read ({type(err).__name__}: {err}); the file is damaged or is not a "
                          f"safetensors file. Restore it from a copy, or rewrite it with `edgetune run --resume "
                          f"{run_dir}` (the newest checkpoint holds the same weights)") from None
    try:
        loaded.model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit the model its config.yaml describes: {err}") from None
    loaded.source = f"run {run_dir}"
    loaded.model.eval()
    return LoadedRun(loaded.model, cfg, bundle, loaded, run_dir)
