"""Logging set-up for the CLI: messages go through tqdm.write so they never break a progress bar."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(verbosity: int) -> None:
    """verbosity: -1 quiet (warnings), 0 info, 1+ debug."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s" if verbosity > 0
                                           else "%(message)s"))
    root = logging.getLogger("edgetune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
