"""``edgetune`` entry point: parse arguments, dispatch to a command, turn user errors into exit codes.

Exit status: 0 success, 2 usage or config error (message, no traceback), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edgetune.cli import commands
from edgetune.cli.logs import setup_logging
from edgetune.core.errors import EdgetuneError

__all__ = ["build_parser", "main"]

log = logging.getLogger("edgetune.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgetune", description="Adapt pretrained networks cheaply for on-device use.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: tracebacks)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands.ALL:
        register(sub)
    from edgetune.core.plugins import COMMANDS, load_families

    load_families()
    for entry in COMMANDS.entries():  # family verbs (edgetune.<family>.family registers them)
        entry.obj(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`run R --run-dir D a.b=1`): argparse leaves them over
    leftover = [e for e in extra if "=" not in e or e.startswith("-")]
    if leftover or (extra and not hasattr(args, "args")):
        parser.error(f"unrecognized arguments: {' '.join(leftover or extra)}")
    if extra:
        args.args = list(args.args) + extra
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
    except Exception as err:
        if args.verbose > 1:
            raise
        log.debug("traceback", exc_info=True)
        print(f"edgetune: runtime failure: {type(err).__name__}: {err} (run with -vv for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
