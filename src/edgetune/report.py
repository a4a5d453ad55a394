"""Turn a run folder (config.yaml, metrics.jsonl, summary.json) into report.md with PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgetune.core.errors import ConfigError
from edgetune.core.state import atomic_write_bytes
from edgetune.train.metrics import read_metrics

__all__ = ["plot_curves", "write_report"]

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


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``loss.png`` and ``accuracy.png`` into ``run_dir``; return the report path."""
    run_dir = Path(run_dir)
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise ConfigError(f"{run_dir} holds no summary.json: it is not a finished edgetune run folder")
    summary = json.loads(summary_file.read_text())
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    name = run_dir.name
    plots = [(f, t) for f, k, t in (("loss.png", "loss", "Loss"), ("accuracy.png", "acc", "Accuracy"))
             if plot_curves(records, k, run_dir / f, f"{t} — {name}")]
    if plot_method_metrics(records, run_dir / "method.png", f"Method metrics — {name}"):
        plots.append(("method.png", "Method metrics over training"))
    env = summary.get("environment", {})
    rows = [
        ("test accuracy", summary.get("test_acc")), ("test loss", summary.get("test_loss")),
        ("val accuracy", summary.get("val_acc")), ("optimizer steps", summary.get("steps")),
        ("epochs", summary.get("epochs")), ("parameters", summary.get("parameters")),
        ("non-zeros", summary.get("nonzeros")), ("model file bytes", summary.get("model_bytes")),
        ("latency, batch 1 (ms, median)", summary.get("latency_ms_batch1")),
        ("peak RSS (MiB)", summary.get("peak_rss_mb")), ("peak CUDA (MiB)", summary.get("peak_cuda_mb")),
        ("wall time (s)", summary.get("wall_time_s")),
    ]
    rows += [(k, v) for k, v in summary.get("method_metrics", {}).items()]
    lines = [f"# Run report: {name}", ""]
    cmds = (run_dir / "command.txt").read_text().split("\n") if (run_dir / "command.txt").exists() else []
    lines += [f"- command: `{c}`" for c in cmds if c.strip()] or ["- command: (unknown)"]
    lines += [ f"- dataset: {summary.get('dataset')} ({summary.get('data_source')})",
              f"- seed: {summary.get('seed')}",
              (f"- hardware: {env.get('hardware', env.get('cpu', '?'))}; torch {env.get('torch', '?')}; "
               f"git {env.get('git_sha', '?')}")]
    lines += [f"- note: {n}" for n in summary.get("data_notes", [])]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    expect = summary.get("expect", {})
    if expect:
        lines += ["", "## Expected figures", "", "| figure | minimum | got | ok |", "|---|---|---|---|"]
        lines += [f"| {k} | {e['min']} | {_fmt(e['got'])} | {'yes' if e['ok'] else 'NO'} |" for k, e in expect.items()]
    if plots:
        lines += ["", "## Curves", ""] + [f"![{t}]({f})" for f, t in plots]
    lines += ["", "Files: `config.yaml` (resolved recipe), `metrics.jsonl`, `summary.json`, `model.safetensors`,",
              "`checkpoints/` (resume with `edgetune run --resume " + str(run_dir) + "`).", ""]
    path = run_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
