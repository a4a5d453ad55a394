"""Benchmark harness: a suite yields result rows; the harness stamps them with the environment and appends
them to a CSV (append-only results data) plus a JSON copy of the run.

A suite is a function ``fn(ctx: BenchContext) -> Iterable[dict]`` registered with :func:`register_suite`.
Each row is a flat dict of scalars (str, int, float, bool, None); other values are written as JSON text
in the CSV. Families add their suites in their own files (e.g. ``edgetune/sparse/bench/``), imported by their
``family.py``; :func:`run_suite` loads every family first (``edgetune.core.plugins.load_families``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgetune.core.errors import ConfigError, did_you_mean
from edgetune.core.registry import Registry
from edgetune.core.seed import seed_everything
from edgetune.core.state import atomic_write_bytes, atomic_write_json
from edgetune.measure.env import environment

__all__ = [
    "DEFAULT_RESULTS_DIR",
    "ENV_COLUMNS",
    "SUITES",
    "BenchContext",
    "SuiteFn",
    "append_rows_csv",
    "last_run_rows",
    "register_suite",
    "run_suite",
]

log = logging.getLogger(__name__)

DEFAULT_RESULTS_DIR = Path("bench") / "results"
# Columns the harness adds to every row, first in the CSV, in this order (a row's own value wins).
ENV_COLUMNS = ("suite", "timestamp_utc", "git_sha", "hardware", "device", "torch", "torch_threads", "quick",
               "seed")


@dataclass
class BenchContext:
    """What a suite gets: where to run, how big (``quick`` = reduced sizes for CI), and its options.

    ``out_dir`` is a scratch folder for files the suite writes (checkpoints to weigh, ...); it is
    removed after the run unless the caller of :func:`run_suite` passed one.
    """

    device: torch.device
    quick: bool
    seed: int
    out_dir: Path
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        """The value of option ``name``, or ``default`` when the run did not set it."""
        return self.options.get(name, default)


SuiteFn = Callable[[BenchContext], Iterable[dict[str, Any]]]

SUITES: Registry[SuiteFn] = Registry("bench suite")


def register_suite(
    name: str, summary: str = "", *, options: Mapping[str, str] | None = None,
    table: Callable[[Path], str] | None = None,
) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator registering a suite. ``options`` maps the option names it reads to a description;
    when given, :func:`run_suite` rejects other option names. ``table(csv_path)`` renders every row of the
    results CSV as Markdown; when given, :func:`run_suite` rewrites ``<stem>.md`` next to the CSV after each run."""
    return SUITES.register(name, summary=summary, options=dict(options) if options is not None else None,
                           table=table)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r} ({e}); use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} was asked for but CUDA is not available; use device='cpu'")
    return dev


def _check_options(name: str, options: Mapping[str, Any], known: Mapping[str, str] | None) -> None:
    if known is None:
        return
    for key in options:
        if key not in known:
            listed = ", ".join(f"{k} ({v})" for k, v in sorted(known.items())) or "(none)"
            raise ConfigError(
                f"bench suite {name!r} has no option {key!r}.{did_you_mean(key, known)} "
                f"Its options: {listed}."
            )


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return json.dumps(value, default=str, sort_keys=True)


def _encode(header: list[str], rows: Iterable[Mapping[str, Any]], with_header: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    if with_header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue().encode("utf-8")


def append_rows_csv(path: str | os.PathLike[str], rows: list[Mapping[str, Any]]) -> None:
    """Append ``rows`` to the CSV at ``path`` without ever losing or changing the rows already there.

    A new file gets the columns of ``rows`` in first-seen order. When every column of ``rows`` is
    already in the file's header the rows are appended in place. Otherwise the file is rewritten
    atomically with the union of columns (old columns first, new ones after; old rows get empty
    cells in the new columns).
    """
    path = Path(path)
    new_cols: list[str] = []
    for row in rows:
        new_cols += [k for k in row if k not in new_cols]
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if not text.strip():
        atomic_write_bytes(path, _encode(new_cols, rows, with_header=True))
        return
    old_header = next(csv.reader(io.StringIO(text)))
    extra = [c for c in new_cols if c not in old_header]
    if not extra:
        with open(path, "ab") as f:
            if not text.endswith("\n"):
                f.write(b"\n")
            f.write(_encode(old_header, rows, with_header=False))
            f.flush()
            os.fsync(f.fileno())
        return
    old_rows = list(csv.DictReader(io.StringIO(text)))
    header = old_header + extra
    log.info("%s: adding columns %s; rewriting %d old rows with the union of columns", path, extra,
             len(old_rows))
    atomic_write_bytes(path, _encode(header, [*old_rows, *rows], with_header=True))


def last_run_rows(csv_path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of the newest run in a results CSV (same ``timestamp_utc`` and ``quick`` as its last row), as
    strings; [] for an empty file. For the suites' Markdown tables."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    last = (rows[-1]["timestamp_utc"], rows[-1]["quick"])
    return [r for r in rows if (r["timestamp_utc"], r["quick"]) == last]


def run_header(row: Mapping[str, str], stamp: str | None = None) -> str:
    """``Run <timestamp> (<hardware>, <device>, torch <version>, <n> threads, git <sha>, quick=<q>)``: where and how
    a results row was measured, for the first line of a suite's Markdown table (``stamp`` replaces the timestamp,
    e.g. with the several timestamps of a run assembled in slices)."""
    when = stamp if stamp is not None else row.get("timestamp_utc", "?")
    return (f"Run {when} ({row.get('hardware', '?')}, {row.get('device', '?')}, torch {row.get('torch', '?')}, "
            f"{row.get('torch_threads', '?')} threads, git {(row.get('git_sha') or '')[:10]}, "
            f"quick={row.get('quick', '?')})")


def _collect(name: str, fn: SuiteFn, stamp: dict[str, Any], dev: torch.device, quick: bool, seed: int,
             opts: dict[str, Any], out_dir: str | os.PathLike[str] | None) -> list[dict[str, Any]]:
    """Run one suite (in a scratch folder unless ``out_dir`` is given); rows merged with ``stamp``."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=f"edgetune-bench-{name}-") as tmp:
        ctx = BenchContext(device=dev, quick=quick, seed=seed,
                           out_dir=Path(out_dir) if out_dir is not None else Path(tmp), options=opts)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(seed)
        for i, row in enumerate(fn(ctx)):
            if not isinstance(row, Mapping):
                raise TypeError(f"bench suite {name!r} yielded {type(row).__name__}, expected a dict")
            merged = {**stamp, **{str(k): _cell(v) for k, v in row.items()}}
            rows.append(merged)
            log.info("row %d: %s", i, {k: v for k, v in merged.items() if k not in stamp})
    return rows


def run_suite(
    name: str,
    *,
    out_csv: str | os.PathLike[str] | None = None,
    quick: bool = False,
    device: str | torch.device | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run suite ``name`` and return its rows, each stamped with the :data:`ENV_COLUMNS`.

    The rows are appended to ``out_csv`` (default ``bench/results/<name>.csv`` under the current
    folder; see :func:`append_rows_csv`) and this run alone is written next to it as
    ``<stem>.last.json`` (rows plus the full environment). ``device=None`` picks CUDA when available.
    ``threads`` sets ``torch.set_num_threads`` for the run (restored after); CPU timings on a loaded
    machine are far steadier with fewer threads than busy cores. ``env`` overrides the environment
    description (tests; normally :func:`environment`).
    Nothing is written when the suite raises.
    """
    from edgetune.core.plugins import load_families

    load_families()  # families register their suites
    entry = SUITES.entry(name)
    opts = dict(options or {})
    _check_options(entry.name, opts, entry.meta.get("options"))
    dev = _resolve_device(device)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}; omit it to keep torch's default")
    csv_path = Path(out_csv) if out_csv is not None else DEFAULT_RESULTS_DIR / f"{entry.name}.csv"
    env_info = dict(env) if env is not None else environment()
    stamp = {"suite": entry.name, "timestamp_utc": env_info.get("timestamp_utc"),
             "git_sha": env_info.get("git_sha"), "hardware": env_info.get("hardware"), "device": str(dev),
             "torch": env_info.get("torch"), "torch_threads": threads or torch.get_num_threads(),
             "quick": quick, "seed": seed}
    log.info("bench suite %r on %s (quick=%s, seed=%d) -> %s", entry.name, dev, quick, seed, csv_path)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = _collect(entry.name, entry.obj, stamp, dev, quick, seed, opts, out_dir)
    finally:
        torch.set_num_threads(old_threads)
    if not rows:
        log.warning("bench suite %r produced no rows; nothing written", entry.name)
        return rows
    append_rows_csv(csv_path, rows)
    record = {"suite": entry.name, "environment": env_info, "options": {k: _cell(v) for k, v in opts.items()},
              "rows": rows}
    atomic_write_json(csv_path.with_name(f"{csv_path.stem}.last.json"), record)
    if entry.meta.get("table") is not None:
        atomic_write_bytes(csv_path.with_suffix(".md"), entry.meta["table"](csv_path).encode())
    log.info("bench suite %r: %d rows appended to %s", entry.name, len(rows), csv_path)
    return rows


def _tiny_mlp(d_in: int, hidden: int, d_out: int) -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


def _zero_smallest_(model: torch.nn.Module, density: float) -> None:
    """Keep the largest-magnitude ``density`` fraction of each Linear weight, zero the rest."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                k = max(1, round(density * m.weight.numel()))
                keep = m.weight.abs().flatten().topk(k).indices
                mask = torch.zeros(m.weight.numel(), dtype=torch.bool, device=m.weight.device)
                mask[keep] = True
                m.weight.mul_(mask.view_as(m.weight))


@register_suite("measure-selftest", "parameters, non-zeros, bytes, latency and peak memory of a tiny MLP",
                options={"batch": "batch size of the timed forward/backward (default 64)"})
def _measure_selftest(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    """Exercise edgetune.measure on a tiny MLP, dense and with 90% of its Linear weights zeroed."""
    from edgetune.core.state import save_tensors
    from edgetune.measure import (
        bytes_on_disk,
        count_nonzeros,
        count_parameters,
        measure_latency,
        state_dict_bytes,
        track_peak_memory,
    )

    batch = int(ctx.option("batch", 64))
    d_in, d_out = 64, 10
    for hidden in (128,) if ctx.quick else (128, 512, 2048):
        dense = _tiny_mlp(d_in, hidden, d_out).to(ctx.device)
        x = torch.randn(batch, d_in, device=ctx.device)
        with torch.no_grad():
            ref = dense(x)
        for variant, density in (("dense", 1.0), ("magnitude-10%", 0.1)):
            model = _tiny_mlp(d_in, hidden, d_out).to(ctx.device)
            model.load_state_dict(dense.state_dict())
            if density < 1.0:
                _zero_smallest_(model, density)
            sd = model.state_dict()
            coo = {k: v.cpu().to_sparse() if v.dim() == 2 else v for k, v in sd.items()}
            path = ctx.out_dir / f"mlp{hidden}-{variant}.safetensors"
            save_tensors(sd, path)
            with torch.no_grad():
                out = model(x)
                lat = measure_latency(lambda m=model, x=x: m(x), warmup=3, repeats=10 if ctx.quick else 30,
                                      device=ctx.device, min_time_s=None if ctx.quick else 0.2)
            with track_peak_memory(ctx.device) as mem:
                model(x).square().mean().backward()
            yield {
                "model": f"mlp-{d_in}-{hidden}-{hidden}-{d_out}",
                "variant": variant,
                "batch": batch,
                "parameters": count_parameters(model),
                "nonzeros": count_nonzeros(model),
                "nonzeros_coo": count_nonzeros(coo),
                "state_bytes": state_dict_bytes(sd),
                "state_bytes_coo": state_dict_bytes(coo),
                "disk_bytes": bytes_on_disk(path),
                "output_rel_err": float((out - ref).norm() / ref.norm().clamp_min(1e-12)),
                **lat.as_row("fwd"),
                "fwdbwd_peak_rss_delta_mb": mem.rss_delta_bytes / 2**20,
                "fwdbwd_peak_cuda_mb": mem.cuda_bytes / 2**20 if mem.cuda_bytes is not None else None,
            }
