"""Plots of the incremental family: accuracy per session (all / base / novel / harmonic mean) and the FOR-NCR
operating curve. Registered as a report plot: a stage folder holding ``sessions.json`` / ``ncd.json`` (written by
the ``incremental`` step) gets its figures in the run report; the bench suites draw the same figures."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgetune.core.figures import pyplot, save_figure
from edgetune.core.plugins import REPORT_PLOTS

__all__ = ["plot_operating_curves", "plot_sessions"]

_SERIES = (("acc", "all seen classes"), ("base_acc", "base classes"), ("novel_acc", "novel classes"),
           ("hm", "harmonic mean"))


def plot_sessions(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str) -> Path:
    """Accuracy per session. ``curves``: label -> session records (``session``, ``acc``, ``base_acc``, ...); one
    panel per quantity when several learners are compared, else one panel with all four quantities."""
    plt = pyplot()
    if len(curves) == 1:
        (label, recs), = curves.items()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for key, name in _SERIES:
            pts = [(r["session"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
        ax.set_title(f"{title} ({label})")
        axes = [ax]
    else:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
        colour = {label: f"C{i}" for i, label in enumerate(curves)}  # one colour per learner in every panel
        for ax, (key, name) in zip(axes, _SERIES[:3], strict=False):
            for label, recs in curves.items():
                pts = [(r["session"], r[key]) for r in recs if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label, color=colour[label])
            ax.set_title(f"{name}")
        fig.suptitle(title)
    for ax in axes:
        ax.set_xlabel("session")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_operating_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str,
                          points: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """FOR (x, forgetting of base accuracy) against NCR (y, novel-class recall): one line per rule, and the
    a-priori operating points (realised FOR, NCR) as markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, pts in curves.items():
        if pts:
            xs, ys = zip(*sorted(pts), strict=True)
            ax.plot([100 * x for x in xs], [100 * y for y in ys], label=label, color=f"C{list(curves).index(label)}")
    colour = {label: f"C{i}" for i, label in enumerate(curves)}
    for label, (f, n) in (points or {}).items():
        rule = next((r for r in sorted(colour, key=len, reverse=True) if label.startswith(r)), None)
        ax.scatter([100 * f], [100 * n], s=25, zorder=3, color=colour.get(rule, "black"))
        ax.annotate(label, (100 * f, 100 * n), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for k in (2, 5):
        ax.axvline(k, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("FOR: forgetting of base accuracy (points)")
    ax.set_ylabel("NCR: novel-class recall (%)")
    ax.set_xlim(0, min(30.0, ax.get_xlim()[1]))  # the budgets of interest are a few points
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


@REPORT_PLOTS.register("incremental", summary="accuracy per session and FOR-NCR curves of incremental stages")
def report_plots(folder: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    sessions = folder / "sessions.json"
    if sessions.is_file():
        data = json.loads(sessions.read_text())
        plot_sessions({"mean over draws": data["mean"]}, folder / "sessions.png", "Accuracy per session")
        out.append(("sessions.png", "Accuracy per session (all, base, novel classes, harmonic mean)"))
    ncd = folder / "ncd.json"
    if ncd.is_file():
        data = json.loads(ncd.read_text())
        curves = {k: [tuple(p) for p in v] for k, v in data.get("curves", {}).items()}
        points = {k: tuple(v) for k, v in data.get("points", {}).items()}
        if curves or points:
            plot_operating_curves(curves, folder / "ncd.png", "One-shot novel classes: FOR vs NCR", points)
            out.append(("ncd.png", "Forgetting (FOR) against novel-class recall (NCR), a-priori points marked"))
    return out
