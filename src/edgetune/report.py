"""Turn a run folder (config.yaml, metrics.jsonl, summary.json) into report.md with PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgetune.core.errors import ConfigError
from edgetune.core.state import atomic_write_bytes
from edgetune.train.metrics import read_metrics

__all__ = ["plot_curves", "read_summary", "write_report"]

log = logging.getLogger(__name__)


def plot_curves(records: list[dict[str, Any]], key: str, path: Path, title: str) -> bool:
    """Plot ``key`` over steps for train and eval records; return False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if key not in r or r.get("kind") not in ("train", "eval"):
            continue
        label = "train" if r["kind"] == "train" else r.get("split", "eval")
        xs, ys = series.setdefault(label, ([], []))
        xs.append(r["step"])
        ys.append(r[key])
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if label != "train" else None, ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_method_metrics(records: list[dict[str, Any]], path: Path, title: str) -> bool:
    """One panel per method metric that changes over training (e.g. density, active neurons)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r.get("kind") == "method"]
    keys = sorted({k for r in recs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("step", "epoch")})
    keys = [k for k in keys if len({r.get(k) for r in recs if k in r}) > 1][:6]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in recs if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


#: (label, summary key) rows of a stage's results table, in order
_ROWS = (("test accuracy", "test_acc"), ("test loss", "test_loss"), ("test perplexity", "test_ppl"),
         ("test exact match", "test_exact_match"),
         ("val accuracy", "val_acc"), ("optimizer steps", "steps"), ("epochs", "epochs"),
         ("parameters", "parameters"), ("trainable parameters", "trainable_parameters"), ("non-zeros", "nonzeros"),
         ("model file bytes", "model_bytes"), ("latency, batch 1 (ms, median)", "latency_ms_batch1"),
         ("peak RSS (MiB)", "peak_rss_mb"), ("peak CUDA (MiB)", "peak_cuda_mb"), ("wall time (s)", "wall_time_s"))
#: columns of the stage comparison table
_COMPARE = (("step", "step"), ("test acc", "test_acc"), ("test ppl", "test_ppl"), ("exact match", "test_exact_match"),
            ("trainable", "trainable_parameters"),
            ("non-zeros", "nonzeros"), ("model bytes", "model_bytes"), ("latency b1 (ms)", "latency_ms_batch1"),
            ("wall (s)", "wall_time_s"))


def _plots(folder: Path, records: list[dict[str, Any]], summary: dict[str, Any], title: str) -> list[tuple[str, str]]:
    from edgetune.core.plugins import REPORT_PLOTS, load_families

    plots = [(f, t) for f, k, t in (("loss.png", "loss", "Loss"), ("accuracy.png", "acc", "Accuracy"),
                                     ("perplexity.png", "ppl", "Perplexity"))
             if plot_curves(records, k, folder / f, f"{t} — {title}")]
    if plot_method_metrics(records, folder / "method.png", f"Method metrics — {title}"):
        plots.append(("method.png", "Method metrics over training"))
    load_families()
    for entry in REPORT_PLOTS.entries():  # family plots
        plots += entry.obj(folder, records, summary)
    return plots


def _stage_lines(folder: Path, summary: dict[str, Any], level: str, prefix: str = "") -> list[str]:
    records = read_metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
    plots = _plots(folder, records, summary, folder.name)
    lines = [f"- model: {summary.get('model_source', '?')}" + (f" ({summary.get('task')})" if summary.get("task") else ""),
             f"- dataset: {summary.get('dataset')} ({summary.get('data_source')})", f"- seed: {summary.get('seed')}"]
    lines += [f"- note: {n}" for n in [*summary.get("data_notes", []), *summary.get("model_notes", [])]]
    rows = [(label, summary.get(key)) for label, key in _ROWS]
    rows += [(k, v) for k, v in summary.get("method_metrics", {}).items()]
    rows += [(k, summary.get(k)) for k in summary.get("step_metrics", [])]  # the figures a family's step names
    lines += ["", f"{level} Results", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    groups = summary.get("trainable_by_module") or {}
    if groups and summary.get("trainable_parameters") != summary.get("parameters"):
        lines += ["", f"{level} Trainable parameters", "", "| module | trainable | total |", "|---|---|---|"]
        lines += [f"| {m} | {g['trainable']} | {g['total']} |" for m, g in groups.items()]
    expect = summary.get("expect", {})
    if expect:
        lines += ["", f"{level} Expected figures", "", "| figure | minimum | got | ok |", "|---|---|---|---|"]
        lines += [f"| {k} | {e['min']} | {_fmt(e['got'])} | {'yes' if e['ok'] else 'NO'} |" for k, e in expect.items()]
    if plots:
        lines += ["", f"{level} Curves", ""] + [f"![{t}]({prefix}{f})" for f, t in plots]
    return lines


def _header(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    env = summary.get("environment", {})
    lines = [f"# Run report: {run_dir.name}", ""]
    cmds = (run_dir / "command.txt").read_text().split("\n") if (run_dir / "command.txt").exists() else []
    lines += [f"- command: `{c}`" for c in cmds if c.strip()] or ["- command: (unknown)"]
    lines += [(f"- hardware: {env.get('hardware', env.get('cpu', '?'))}; torch {env.get('torch', '?')}; "
               f"git {env.get('git_sha', '?')}")]
    return lines


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``run_dir/summary.json`` as a dict, or a :class:`ConfigError` naming the file and what to do."""
    summary_file = run_dir / "summary.json"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder; give the run folder `edgetune run` wrote (its path is "
                          "printed after `report:`)")
    if not summary_file.is_file():
        raise ConfigError(f"{run_dir} holds no summary.json: it is not a finished edgetune run folder (an "
                          f"interrupted run finishes with `edgetune run --resume {run_dir}`)")
    fix = (f"it is written when a run finishes: restore it from a copy, or rewrite it with "
           f"`edgetune run --resume {run_dir}`")
    try:
        summary = json.loads(summary_file.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {summary_file}: {err.strerror or err}; check its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" (line {err.lineno}, column {err.colno}: {err.msg})" if isinstance(err, json.JSONDecodeError) else ""
        raise ConfigError(f"{summary_file} is corrupt: not valid JSON{where}; {fix}") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{summary_file} holds a JSON {type(summary).__name__}, not the object of figures a run "
                          f"writes; {fix}")
    for key in ("stages", "environment", "expect"):
        if key in summary and not isinstance(summary[key], dict):
            raise ConfigError(f"{summary_file}: {key!r} must be a JSON object, got {type(summary[key]).__name__}; "
                              f"{fix}")
    return summary


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots into ``run_dir`` (one section per stage for a staged run)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    lines = _header(run_dir, summary)
    if "stages" in summary:
        order = summary.get("order") or list(summary["stages"])
        rows = [summary["stages"].get(n, {}) for n in order]
        cols = [(c, k) for c, k in _COMPARE if any(r.get(k) is not None for r in rows)]  # no empty column
        lines += ["", "## Stages compared", "", "| stage | " + " | ".join(c for c, _ in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for name, s in zip(order, rows):
            lines.append(f"| {name} | " + " | ".join(_fmt(s.get(k)) if s.get(k) is not None else "" for _, k in cols)
                         + " |")
        for name in order:
            s = summary["stages"].get(name)
            if s is not None:
                lines += ["", f"## Stage {name}", ""]
                lines += _stage_lines(run_dir / "stages" / name, s, "###", prefix=f"stages/{name}/")
    else:
        lines += _stage_lines(run_dir, summary, "##")
    lines += ["", "Files: `config.yaml` (resolved recipe), `metrics.jsonl`, `summary.json`, `model.safetensors`,",
              "`checkpoints/` (resume with `edgetune run --resume " + str(run_dir) + "`).", ""]
    path = run_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
