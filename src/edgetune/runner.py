"""Run a validated recipe end to end: data -> model -> method sections -> training -> measurements -> report."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.core.config import dump_yaml, load_yaml, validate
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback
from edgetune.core.sections import SECTIONS, SectionContext
from edgetune.core.seed import seed_everything
from edgetune.core.state import atomic_write_bytes, atomic_write_json, save_tensors
from edgetune.data.base import DataBundle, load_dataset
from edgetune.models.base import ModelSpec, build_model
from edgetune.recipe import RunConfig, recipe_schema
from edgetune.train.loop import Trainer, resolve_device

__all__ = ["RunResult", "load_run_model", "new_run_dir", "resume", "run"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    report: Path | None


def new_run_dir(cfg: RunConfig) -> Path:
    """A fresh folder ``<output_dir>/<name>-<UTC time>[-N]``."""
    base = Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _apply_sections(model: torch.nn.Module, cfg: RunConfig, ctx: SectionContext) -> list[Callback]:
    callbacks: list[Callback] = []
    for name in SECTIONS.names():
        section = getattr(cfg, name, None)
        if section is not None:
            log.info("applying recipe section %r", name)
            callbacks.extend(SECTIONS.get(name)(model, section, ctx))
    return callbacks


def _measure(model: torch.nn.Module, bundle: DataBundle, device: torch.device, run_dir: Path) -> dict[str, Any]:
    from edgetune.measure import (
        bytes_on_disk,
        count_nonzeros,
        count_parameters,
        measure_latency,
        peak_rss_bytes,
    )

    x = [t[:1].to(device) for t in bundle.test.tensors[:-1]]
    model.eval()
    with torch.no_grad():
        lat = measure_latency(lambda: model(*x), warmup=3, repeats=20, device=device)
    out: dict[str, Any] = {
        "parameters": count_parameters(model),
        "nonzeros": count_nonzeros(model),
        "model_bytes": bytes_on_disk(run_dir / "model.safetensors"),
        "latency_ms_batch1": lat.median_s * 1e3,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run(cfg: RunConfig, run_dir: str | Path | None = None, *, resume: bool = False,
        write_report: bool = True, command: str | None = None) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (a new folder when None); with ``resume`` continue from its checkpoint.

    ``command`` is recorded in the run folder and the report (default: this process's argv).
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", dump_yaml(cfg.to_dict()).encode())
        cmd = command or shlex.join(sys.argv)
        if resume:
            prev = (run_dir / "command.txt").read_text() if (run_dir / "command.txt").exists() else ""
            cmd = prev.rstrip("\n") + ("\n" if prev else "") + cmd
        atomic_write_bytes(run_dir / "command.txt", (cmd + "\n").encode())
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    bundle = load_dataset(cfg.data)
    log.info("data: %s (%d train, %d test) from %s", bundle.name, len(bundle.train), len(bundle.test), bundle.source)
    spec = ModelSpec(input_shape=bundle.input_shape, num_classes=bundle.num_classes, task=bundle.task)
    model = build_model(cfg.model.name, cfg.model.options(), spec, device=device)
    n_train = len(bundle.train)
    steps_per_epoch = -(-n_train // cfg.train.batch_size)
    total = cfg.train.epochs * steps_per_epoch
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    ctx = SectionContext(total_steps=total, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs,
                         device=device, seed=cfg.seed, run_dir=run_dir, train_inputs=bundle.train.tensors[0])
    callbacks = _apply_sections(model, cfg, ctx)
    trainer = Trainer(model, bundle.train, cfg.train, val=bundle.val, test=bundle.test, callbacks=callbacks,
                      run_dir=run_dir, seed=cfg.seed)
    if resume and not trainer.resume():
        log.warning("no checkpoint in %s: starting from the beginning", run_dir)
    summary = trainer.fit()
    summary["rank"] = rank
    report = None
    if rank == 0:
        save_tensors(model.state_dict(), run_dir / "model.safetensors", metadata={"format": "edgetune-model"})
        summary.update(_measure(model, bundle, device, run_dir))
        from edgetune.measure import environment

        summary.update({
            "dataset": bundle.name, "train_examples": len(bundle.train), "data_source": bundle.source, "data_notes": bundle.notes,
            # a resumed run adds the time its earlier processes spent training (from the checkpoint)
            "seed": cfg.seed, "wall_time_s": time.perf_counter() - t0 + summary.get("earlier_time_s", 0.0),
            "environment": environment(),
            "method_metrics": {k: v for cb in callbacks for k, v in cb.metrics().items()},
        })
        checks = {k: summary.get(k.removeprefix("min_")) for k in cfg.expect}
        summary["expect"] = {k: {"min": v, "got": checks[k], "ok": checks[k] is not None and checks[k] >= v}
                             for k, v in cfg.expect.items()}
        atomic_write_json(run_dir / "summary.json", summary)
        if write_report:
            from edgetune.report import write_report as _write

            report = _write(run_dir)
    if trainer.ws > 1:
        from edgetune.train.distributed import shutdown

        shutdown()
    return RunResult(run_dir=run_dir, summary=summary, report=report)


def resume(run_dir: str | Path, overrides: tuple[str, ...] = (), command: str | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its newest checkpoint (its config.yaml is the recipe)."""
    from edgetune.core.config import apply_overrides

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml); pass the folder `edgetune run` created")
    data = apply_overrides(load_yaml(run_dir / "config.yaml"), overrides)
    cfg = validate(recipe_schema(), data)
    return run(cfg, run_dir, resume=True, command=command)


def load_run_model(run_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, RunConfig, DataBundle]:
    """Rebuild the trained model of a finished run folder (architecture + method sections + weights).

    Returns the model in eval mode, the run's recipe, and its dataset (for measurements).
    """
    from edgetune.core.errors import CheckpointError
    from edgetune.core.state import load_tensors

    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not weights.is_file():
        raise ConfigError(f"{run_dir} is not a finished run folder (needs config.yaml and model.safetensors)")
    cfg = validate(recipe_schema(), load_yaml(run_dir / "config.yaml"))
    seed_everything(cfg.seed)
    bundle = load_dataset(cfg.data)
    spec = ModelSpec(input_shape=bundle.input_shape, num_classes=bundle.num_classes, task=bundle.task)
    model = build_model(cfg.model.name, cfg.model.options(), spec, device=device)
    ctx = SectionContext(total_steps=1, steps_per_epoch=1, epochs=1, device=torch.device(device), seed=cfg.seed,
                         run_dir=None, train_inputs=bundle.train.tensors[0])
    _apply_sections(model, cfg, ctx)
    try:
        model.load_state_dict(load_tensors(weights, device=device))
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit the model its config.yaml describes: {err}") from None
    return model.eval(), cfg, bundle
