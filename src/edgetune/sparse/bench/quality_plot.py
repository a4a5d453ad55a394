"""One figure for a folder of ``sparse-quality`` runs: test accuracy and active neurons over training.

Each run folder's ``metrics.jsonl`` gives a curve (per-epoch test accuracy; the sparse engine's
``sparse_active_neurons``); runs of one method share a colour, so seeds overlay.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgetune.bench.plots import pyplot, save_figure

__all__ = ["plot_quality_runs", "read_curves"]

log = logging.getLogger(__name__)


def read_curves(metrics: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(epoch, test accuracy)`` and ``(epoch, active-neuron fraction)`` pairs of a run's ``metrics.jsonl``."""
    acc: list[tuple[int, float]] = []
    active: list[tuple[int, float]] = []
    for line in metrics.read_text().splitlines():
        r: dict[str, Any] = json.loads(line)
        if r.get("kind") == "eval" and r.get("split") == "test" and "acc" in r:
            acc.append((int(r["epoch"]), float(r["acc"])))
        elif r.get("kind") == "method" and "sparse_active_neurons" in r:
            active.append((int(r["epoch"]), float(r["sparse_active_neurons"])))
    return acc, active


def _label(run_dir: Path) -> str:
    """``method`` or ``method [settings]`` from the suite's ``bench-row.json``, else from the folder name."""
    row = run_dir / "bench-row.json"
    if row.is_file():
        info = json.loads(row.read_text())
        return str(info["method"]) + (f" [{info['settings']}]" if info.get("settings") else "")
    parts = run_dir.name.split("-")
    seed_at = max((i for i, p in enumerate(parts) if p.startswith("s") and p[1:].isdigit()), default=len(parts))
    return parts[seed_at - 1] if seed_at > 0 else run_dir.name


def plot_quality_runs(work_dir: str | Path, path: str | Path, title: str = "") -> Path | None:
    """Plot every run under ``work_dir`` (folders ``<recipe>-e<epochs>-<method>-s<seed>[-<tag>]``) to ``path``.

    Returns the PNG path, or None when no folder holds per-epoch test evaluations.
    """
    plt = pyplot()

    runs = []
    for metrics in sorted(Path(work_dir).glob("*/metrics.jsonl")):
        acc, active = read_curves(metrics)
        if acc:
            runs.append((_label(metrics.parent), acc, active))
    if not runs:
        log.warning("no run with per-epoch test accuracy under %s; no plot", work_dir)
        return None
    colours: dict[str, Any] = {}
    fig, (ax_acc, ax_act) = plt.subplots(1, 2, figsize=(11, 4))
    for label, acc, active in runs:
        c = colours.setdefault(label, f"C{len(colours) % 10}")
        first = label not in {ln.get_label() for ln in ax_acc.get_lines()}
        ax_acc.plot(*zip(*acc, strict=True), color=c, lw=1, label=label if first else "_")
        if active:
            ax_act.plot(*zip(*active, strict=True), color=c, lw=1, label=label if first else "_")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy per epoch")
    lo = min(a for _, acc, _ in runs for _, a in acc[len(acc) // 10:])
    ax_acc.set_ylim(lo - 0.005, None)
    ax_act.set(xlabel="epoch", ylabel="active hidden neurons (fraction)", title="active neurons (percolation)",
               ylim=(0, 1.02))
    for ax in (ax_acc, ax_act):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
