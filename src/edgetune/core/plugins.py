"""Family plug-ins: how a method family adds its parts without any change to the foundation.

A family is a subpackage ``edgetune.<family>`` with a module ``edgetune.<family>.family`` (or a third-party
package named in the ``edgetune.families`` entry-point group). Importing that module registers the family's
parts in the registries the foundation reads:

- recipe sections (:func:`edgetune.core.sections.register_section`) and stage steps
  (:func:`edgetune.pipeline.steps.register_step`);
- CLI verbs (:data:`COMMANDS`: ``fn(subparsers)`` adding one ``argparse`` sub-command);
- bench suites (:func:`edgetune.bench.harness.register_suite`);
- export formats (:data:`EXPORTS`: ``edgetune export RUN_DIR --format NAME``);
- save formats (:data:`SAVERS`, keyed by section name: extra files a stage writes for that section, such as an
  adapter's own tensors);
- report plots (:data:`REPORT_PLOTS`: ``fn(run_dir, records, summary) -> [(png name, title)]``).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from edgetune.core.registry import Registry

__all__ = ["COMMANDS", "EXPORTS", "REPORT_PLOTS", "SAVERS", "ExportFormat", "load_families"]

log = logging.getLogger(__name__)

COMMANDS: Registry[Callable[[Any], None]] = Registry("cli command")
REPORT_PLOTS: Registry[Callable[[Path, list[dict[str, Any]], dict[str, Any]], list[tuple[str, str]]]] = Registry(
    "report plot")
SAVERS: Registry[Callable[[Any, Any, Path], list[Path]]] = Registry("save format")


@dataclass(frozen=True)
class ExportFormat:
    """``export(loaded_run, run_dir, out_dir | None) -> report dict`` (``message``: one line for the CLI);
    ``applies(cfg)`` says whether the format suits a run's recipe (picked when ``--format`` is not given)."""

    export: Callable[[Any, Path, Path | None], dict[str, Any]]
    applies: Callable[[Any], bool]


EXPORTS: Registry[ExportFormat] = Registry("export format")


@cache
def load_families() -> tuple[str, ...]:
    """Import every family module (``edgetune.<x>.family`` and the ``edgetune.families`` entry points) once."""
    import edgetune

    loaded = []
    for mod in pkgutil.iter_modules(edgetune.__path__):
        if mod.ispkg and importlib.util.find_spec(f"edgetune.{mod.name}.family") is not None:
            importlib.import_module(f"edgetune.{mod.name}.family")
            loaded.append(mod.name)
    for ep in entry_points(group="edgetune.families"):
        try:
            ep.load()
            loaded.append(ep.name)
        except Exception as err:  # noqa: BLE001  (a broken third-party plug-in must not break edgetune)
            log.warning("family plug-in %s could not be loaded: %s", ep.name, err)
    return tuple(loaded)
