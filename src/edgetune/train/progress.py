"""Training progress: a tqdm bar on a terminal, a log line every ~10% anywhere else.

A bar redrawn several times a second is right on a terminal and wrong in a log file, a CI job or a pipe,
where every redraw becomes another line. :func:`progress` picks: a tqdm bar when stderr is a TTY, otherwise
an INFO line on the ``edgetune.train`` logger at each tenth of the run and at its end, so ``-q`` (warnings
only) silences it like any other log line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

__all__ = ["LogProgress", "Progress", "progress"]

log = logging.getLogger("edgetune.train")


class Progress(Protocol):
    """What the training loop needs from a progress display."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class LogProgress:
    """Progress as log lines: ``desc: 40/100 steps (40%), 1.9 s, 21.0 steps/s, loss 0.4121``.

    One line each time a further tenth of ``total`` is done (never more than ~10 per run) and one at
    :meth:`close` when the last line did not already report the final count.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "train", logger: logging.Logger = log,
                 parts: int = 10) -> None:
        self.total, self.n, self.desc, self.logger = max(0, int(total)), int(initial), desc, logger
        self.start_n = self.n
        self.every = max(1, -(-self.total // parts)) if self.total else 1  # ceil(total / parts)
        self.next_at = (self.n // self.every + 1) * self.every
        self.postfix: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.logged_n: int | None = None
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.next_at or (self.total and self.n >= self.total):
            self._emit()
            self.next_at = (self.n // self.every + 1) * self.every

    def set_postfix(self, values: dict[str, Any]) -> None:
        self.postfix = dict(values)

    def close(self) -> None:
        if not self.closed and self.logged_n != self.n and self.n > self.start_n:
            self._emit()
        self.closed = True

    def _emit(self) -> None:
        if self.logged_n == self.n:
            return
        self.logged_n = self.n
        dt = time.perf_counter() - self.t0
        done = self.n - self.start_n
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        of = f"/{self.total}" if self.total else ""
        rate = f", {done / dt:.1f} steps/s" if dt > 0 and done else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        self.logger.info("%s: %d%s steps%s, %.1f s%s%s", self.desc, self.n, of, pct, dt, rate, extra)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _quiet() -> bool:
    """True when logging was set up (``edgetune -q``, or by the caller) and hides INFO on edgetune.train."""
    configured = log.level != logging.NOTSET or logging.getLogger("edgetune").level != logging.NOTSET
    return configured and not log.isEnabledFor(logging.INFO)


def progress(total: int, initial: int = 0, desc: str = "train", enabled: bool = True) -> Progress:
    """A progress display for ``total`` steps starting at ``initial``.

    enabled=False, or INFO logging set up and off on ``edgetune.train`` (``-q``): nothing at all. stderr a
    terminal (or a notebook): a tqdm bar (transient, like before). Otherwise:
    :class:`LogProgress` on the ``edgetune.train`` logger (INFO, so ``edgetune -q`` hides it).
    """
    if not enabled or _quiet():
        return _Off()
    if _is_tty(sys.stderr) or "ipykernel" in sys.modules:  # a terminal or a notebook: a live bar
        from tqdm.auto import tqdm

        bar: Progress = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                             file=sys.stderr)
        return bar
    return LogProgress(total, initial, desc)
