"""The incremental family's plug-in: the ``incremental_base:`` recipe section, the ``incremental`` stage step
and the report plots (accuracy per session, FOR-NCR curves)."""

from __future__ import annotations

from edgetune.incremental import base_training, bench, plots, stage  # noqa: F401  (each registers its part)
