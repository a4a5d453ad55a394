"""Figures of the bench suites (the helpers live in :mod:`edgetune.core.figures`, shared with report plots)."""

from edgetune.core.figures import pyplot, save_figure

__all__ = ["pyplot", "save_figure"]
