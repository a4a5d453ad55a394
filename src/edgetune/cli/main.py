"""``edgetune`` entry point: parse arguments, dispatch to a command, turn user errors into exit codes.

Exit status: 0 success, 2 usage or config error (message, no traceback), 1 runtime failure.
``-v``/``-q`` work before or after the sub-command (``edgetune run R -q``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence

from edgetune.cli import commands
from edgetune.cli.logs import setup_logging
from edgetune.core.errors import EdgetuneError

__all__ = ["build_parser", "main"]

log = logging.getLogger("edgetune.cli")


def _add_verbosity(p: argparse.ArgumentParser, suffix: str = "") -> None:
    p.add_argument("-v", "--verbose", dest="verbose" + suffix, action="count", default=0,
                   help="more log output (-vv: tracebacks)")
    p.add_argument("-q", "--quiet", dest="quiet" + suffix, action="store_true", help="warnings and errors only")


def build_parser() -> argparse.ArgumentParser:
    from edgetune import __version__

    p = argparse.ArgumentParser(prog="edgetune", description="Adapt pretrained networks cheaply for on-device use.")
    p.add_argument("--version", action="version", version=f"edgetune {__version__}")
    _add_verbosity(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands.ALL:
        register(sub)
    from edgetune.core.plugins import COMMANDS, load_families

    load_families()
    for entry in COMMANDS.entries():  # family verbs (edgetune.<family>.family registers them)
        entry.obj(sub)
    for command in dict.fromkeys(sub.choices.values()):  # -v/-q after the sub-command too (aliases listed once)
        _add_verbosity(command, suffix="_after")
    return p


def _os_error_message(err: OSError) -> tuple[str, int] | None:
    """A user-facing paragraph and exit code for a file-system error the user can fix, else None."""
    target = err.filename2 if err.filename2 is not None else err.filename  # rename(tmp, target): the target
    name = target if target is not None else "a file"
    reason = err.strerror or str(err)
    folder_fix = ("If it is where the run writes, set output_dir in the recipe (or pass --run-dir DIR) to a folder "
                  "you can write; otherwise give a path that exists and you can read.")
    if isinstance(err, PermissionError) or err.errno == errno.EROFS:
        return f"cannot access {name}: {reason}. {folder_fix}", 2
    if isinstance(err, NotADirectoryError):
        return (f"cannot use {name}: part of that path is a file, not a folder ({reason}). Move that file out of "
                f"the way, or choose another path. {folder_fix}"), 2
    if isinstance(err, FileExistsError):
        return (f"cannot create the folder {name}: a file of that name is in the way ({reason}). Move it, or "
                "choose another output_dir or --run-dir."), 2
    if isinstance(err, IsADirectoryError):
        return (f"{name} is a folder where a file was expected ({reason}); move or delete that folder, or give "
                "the path of a file."), 2
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {name}; free some space and run again.", 1
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`run R --run-dir D a.b=1`): argparse leaves them over
    leftover = [e for e in extra if "=" not in e or e.startswith("-")]
    if leftover or (extra and not hasattr(args, "args")):
        parser.error(f"unrecognized arguments: {' '.join(leftover or extra)}")
    if extra:
        args.args = list(args.args) + extra
    args.verbose += getattr(args, "verbose_after", 0)
    args.quiet = args.quiet or getattr(args, "quiet_after", False)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args) or 0)
    except EdgetuneError as err:
        log.debug("traceback", exc_info=True)
        print(f"edgetune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("edgetune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edgetune ls | head`: the reader stopped reading; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    except OSError as err:
        known = _os_error_message(err)
        if known is None or args.verbose > 1:
            if args.verbose > 1:
                raise
            return _runtime_failure(err)
        log.debug("traceback", exc_info=True)
        print(f"edgetune: error: {known[0]}", file=sys.stderr)
        return known[1]
    except Exception as err:
        if args.verbose > 1:
            raise
        return _runtime_failure(err)


def _runtime_failure(err: Exception) -> int:
    """Exit 1 with one line; the traceback goes to the debug log (-v) and is raised with -vv."""
    log.debug("traceback", exc_info=err)
    print(f"edgetune: runtime failure: {type(err).__name__}: {err} (run with -vv for the traceback)",
          file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    from edgetune.train.distributed import exit_process

    exit_process(code)


def entry() -> None:
    """The ``edgetune`` console script."""
    _exit(main())


if __name__ == "__main__":  # pragma: no cover
    _exit(main())
