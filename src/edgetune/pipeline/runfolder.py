"""Run folders you can trust: one run per folder, one process writing it at a time, no half folders.

- A new run refuses a folder that already holds a run (resume it with ``--resume`` or pick another folder).
- A lock file (``.edgetune.lock``: pid, host, start time) keeps two processes from writing one folder; a lock left
  by a process that no longer runs on this host is stale and taken over with a warning.
- A run that fails before it wrote any result leaves no folder behind; one that fails later is marked by
  ``failed.json`` (the error and the time), which the next ``--resume`` removes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from edgetune.core.errors import ConfigError, EdgetuneError

__all__ = ["LOCK", "RunLockedError", "claim_run_folder"]

log = logging.getLogger(__name__)
LOCK = ".edgetune.lock"
FAILED = "failed.json"
#: files written at start-up only; a folder holding nothing else has no result in it
_START_FILES = {"config.yaml", "command.txt", LOCK}


class RunLockedError(EdgetuneError):
    """Another live process is writing the run folder (a runtime conflict: exit status 1)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take_lock(folder: Path) -> Path:
    lock = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
            except (OSError, ValueError):
                held = {}
            pid, host = held.get("pid"), held.get("host")
            if isinstance(pid, int) and host == me["host"] and _alive(pid) and pid != me["pid"]:
                raise RunLockedError(
                    f"{folder} is being written by another edgetune process (pid {pid}, started {held.get('started')}); "
                    f"wait for it to finish or stop it, or write this run to another folder (--run-dir)"
                ) from None
            if host not in (None, me["host"]):
                raise RunLockedError(
                    f"{folder} is locked by a process on host {host!r} (pid {pid}); if that run is over, delete {lock}"
                ) from None
            log.warning("removing a stale lock in %s (pid %s no longer runs)", folder, pid)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunLockedError(f"could not lock {folder}; delete {lock} if no edgetune process is using the folder")


def _holds_results(folder: Path) -> bool:
    return any(p.name not in _START_FILES for p in folder.iterdir())


@contextlib.contextmanager
def claim_run_folder(folder: Path, *, resume: bool, main: bool = True) -> Iterator[Path]:
    """Hold ``folder`` for one run (new or resumed) while the block runs; see the module docstring."""
    if not main:  # DDP ranks other than 0 write nothing here
        yield folder
        return
    existed = folder.exists()
    if existed and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a run folder; pick another --run-dir")
    if resume and not existed:
        raise ConfigError(f"{folder} does not exist; --resume takes the folder of an earlier run")
    if not resume and existed and any(folder.iterdir()):
        raise ConfigError(
            f"{folder} already holds files (an earlier run?); continue that run with `edgetune run --resume {folder}`, "
            "or give a new or empty folder with --run-dir"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run folder {folder}: {err.strerror}; choose a writable location "
                          "(--run-dir or output_dir=...)") from None
    lock = _take_lock(folder)
    from edgetune.core.state import remove_temp_files

    for sub in (folder, *sorted((folder / "stages").glob("*"))):  # left by a kill mid-write; nobody else writes now
        for p in remove_temp_files(sub):
            log.info("removed %s, left by an interrupted write", p)
    (folder / FAILED).unlink(missing_ok=True)
    try:
        yield folder
    except BaseException as err:
        if not existed and not _holds_results(folder):
            shutil.rmtree(folder, ignore_errors=True)  # failed at start-up: leave nothing behind
        elif folder.exists():
            with contextlib.suppress(OSError):
                (folder / FAILED).write_text(json.dumps({
                    "error": f"{type(err).__name__}: {err}", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "resume": f"edgetune run --resume {folder}"}, indent=1))
        raise
    finally:
        lock.unlink(missing_ok=True)
