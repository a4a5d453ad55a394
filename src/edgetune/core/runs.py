"""The layout of a staged run folder: which stage a ``RUN`` folder means (its last finished stage)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgetune.core.errors import ConfigError

__all__ = ["final_stage_folder"]

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def final_stage_folder(run: Path, what: str = "load") -> Path:
    """The last finished stage of the staged run folder ``run`` (``RUN/stages/NAME``), in the stage order its
    ``summary.json`` records (written when every stage has finished). Else :class:`ConfigError` listing the stages
    with and without weights; ``what`` says what the caller does with the model (``load``, ``merge``)."""
    stages = run / "stages"
    names = sorted(p.name for p in stages.iterdir() if p.is_dir())
    done = [n for n in names if (stages / n / WEIGHTS).is_file()]
    order: list[str] = []
    summary = run / "summary.json"
    if summary.is_file():
        try:
            order = list(json.loads(summary.read_text()).get("order", []))
        except (OSError, ValueError, AttributeError):
            order = []
    for name in reversed(order):
        if (stages / name / WEIGHTS).is_file():
            log.info("%s is a staged run: using its last stage, %s", run, name)
            return stages / name
    state = "did not finish (no summary.json with the stage order)" if not order else "has no finished stage"
    raise ConfigError(
        f"{run} is a staged run folder that {state}, so which stage to {what} is ambiguous. Stages with weights: "
        f"{', '.join(done) or '(none)'}; without: {', '.join(n for n in names if n not in done) or '(none)'}. "
        f"Give one stage folder ({run}/stages/NAME), or finish the run with `edgetune run --resume {run}`"
    )
