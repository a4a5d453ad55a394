"""Find a dataset's folder on disk, and say exactly where we looked when it is missing.

A location the user gave is used or refused, never swapped for another one:

1. ``data.path`` (and ``data.path/<sub>``) when set: the dataset must be there. When it is not, a
   :class:`~edgetune.core.errors.DataError` names the path and what it lacks; nothing else is searched.
2. ``$EDGETUNE_DATA/<sub>`` and ``$EDGETUNE_DATA``: when that folder holds a copy of this dataset (a
   ``<sub>`` folder, or some of the dataset's files at its top), that copy must be complete; otherwise the
   error names it. An ``$EDGETUNE_DATA`` without anything of this dataset is skipped.
3. the installed copies: the per-user folder ``${XDG_DATA_HOME:-~/.local/share}/edgetune/datasets/<sub>``
   (where ``make data`` installs when not run as root), then ``/usr/share/datasets/<sub>`` (Debian's
   ``dataset-*`` packages and ``make data`` as root). A copy that is there but incomplete is an error.

Only when none of the three holds anything of the dataset is :class:`DatasetNotInstalled` raised: the one
case where :func:`edgetune.data.base.load_dataset` may use ``data.fallback``. ``<sub>`` runs over the
dataset name and its usual folder names (``cifar-10-batches-py``...). :func:`find_dataset` matches a folder
that holds every file the loader needs (files may be gzip-compressed, ``.gz``); :func:`find_folder` one
that holds given paths (files or folders), for datasets stored as a tree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetune.core.errors import DataError

__all__ = [
    "ENV_VAR",
    "SYSTEM_ROOTS",
    "DatasetNotInstalled",
    "candidate_dirs",
    "find_dataset",
    "find_file",
    "find_folder",
    "user_data_root",
]

log = logging.getLogger(__name__)

ENV_VAR = "EDGETUNE_DATA"


class DatasetNotInstalled(DataError):
    """No copy of the dataset anywhere, and the user named no location for it (no ``data.path``, nothing of it
    under ``$EDGETUNE_DATA``): the only failure ``data.fallback`` stands in for."""


def user_data_root() -> Path:
    """``${XDG_DATA_HOME:-~/.local/share}/edgetune/datasets``: where ``make data`` installs without root."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(base) / "edgetune" / "datasets"


SYSTEM_ROOTS: tuple[Path, ...] = (user_data_root(), Path("/usr/share/datasets"))

# One required file: its accepted names (without .gz; the .gz form is accepted too).
FileSpec = Sequence[str]


def find_file(folder: Path, names: FileSpec) -> Path | None:
    """The first of ``names`` (or ``name.gz``) that exists as a file in ``folder``."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


@dataclass(frozen=True)
class Candidate:
    path: Path
    origin: str  # "data.path", "$EDGETUNE_DATA", "system"
    is_root: bool = False  # the top of data.path / $EDGETUNE_DATA itself, not a <sub> folder of it


def candidate_dirs(name: str, path: str | Path | None, subdirs: Sequence[str] = ()) -> list[Candidate]:
    """Folders to search, in order, for dataset ``name``: only ``data.path``'s when it is given (see the
    module docstring), else ``$EDGETUNE_DATA``'s then the installed locations."""
    subs = list(dict.fromkeys([name, *subdirs]))
    if path:
        root = Path(path).expanduser()
        return [Candidate(root, "data.path", True)] + [Candidate(root / s, "data.path") for s in subs]
    out: list[Candidate] = []
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        out += [Candidate(root / s, f"${ENV_VAR}") for s in subs] + [Candidate(root, f"${ENV_VAR}", True)]
    for root in SYSTEM_ROOTS:
        out += [Candidate(root / s, "system") for s in subs]
    return out


def _describe(spec: FileSpec) -> str:
    alt = f" (or {', '.join(spec[1:])})" if len(spec) > 1 else ""
    return f"{spec[0]}[.gz]{alt}"


# A folder -> what it lacks of the dataset (empty: complete), and whether it holds any of it at all.
_Check = Callable[[Path], tuple[list[str], bool]]


def _search(
    name: str, path: str | Path | None, subdirs: Sequence[str], check: _Check, needs: str, how_to_get: str
) -> Path:
    """The first complete candidate folder; otherwise the error that fits (see the module docstring)."""
    cands = candidate_dirs(name, path, subdirs)
    searched: list[str] = []
    holding: dict[str, list[str]] = {}  # origin -> descriptions of folders that hold part of the dataset
    for i, cand in enumerate(cands):
        if i and cands[i - 1].origin != cand.origin and cands[i - 1].origin in holding:
            break  # a copy the user put there (data.path, $EDGETUNE_DATA) is used or refused, never passed over
        if not cand.path.is_dir():
            what = "a file, not a folder" if cand.path.is_file() else "no such folder"
            searched.append(f"{cand.path} ({cand.origin}, {what})")
            continue
        missing, holds_some = check(cand.path)
        if not missing:
            return cand.path
        lacks = "holds none of the files" if not holds_some else f"lacks {', '.join(missing)}"
        searched.append(f"{cand.path} ({cand.origin}, {lacks})")
        if holds_some or not cand.is_root:  # a <sub> folder named after the dataset, or some of its files
            holding.setdefault(cand.origin, []).append(f"{cand.path} ({lacks})")
    if path:
        root = Path(path).expanduser()
        if not root.exists():
            problem = "does not exist"
        else:
            problem = f"does not hold dataset {name!r}, which needs {needs}. Looked in: {'; '.join(searched)}"
        raise DataError(
            f"data.path {str(root)!r} {problem}. Point data.path at the folder holding the dataset, or remove "
            f"data.path to use $EDGETUNE_DATA or the installed copy (a data.path is never replaced by another "
            f"location or by data.fallback). {how_to_get}".rstrip()
        )
    env_var = f"${ENV_VAR}"
    if env_var in holding:
        raise DataError(
            f"{env_var}={os.environ.get(ENV_VAR, '')!r} holds an incomplete copy of dataset {name!r}, which needs "
            f"{needs}: {'; '.join(holding[env_var])}. Complete that copy, or move it out of {env_var} to use the "
            f"installed one. {how_to_get}".rstrip()
        )
    if "system" in holding:
        raise DataError(
            f"the installed copy of dataset {name!r} is incomplete or damaged: {'; '.join(holding['system'])}; "
            f"it needs {needs}. Reinstall it. "
            f"{how_to_get}".rstrip()
        )
    if not os.environ.get(ENV_VAR):
        searched = [*searched, f"{env_var} (not set)"]
    raise DatasetNotInstalled(
        f"dataset {name!r} not found. It needs {needs}. Searched, in order: {'; '.join(searched)}. "
        f"{how_to_get}".rstrip()
    )


def find_dataset(
    name: str,
    path: str | Path | None,
    files: dict[str, FileSpec],
    *,
    subdirs: Sequence[str] = (),
    how_to_get: str = "",
) -> dict[str, Path]:
    """Find the folder holding every file in ``files`` and return ``{key: path of that file}``.

    files: key -> accepted names of that file, e.g. ``{"train_images": ["train-images-idx3-ubyte"]}``.
    how_to_get: sentence(s) telling the user how to obtain the data, appended to the error.
    Raises :class:`DataError` naming the ``data.path`` or ``$EDGETUNE_DATA`` folder that lacks files, or an
    incomplete installed copy; :class:`DatasetNotInstalled` listing every folder searched when there is none.
    """

    def check(folder: Path) -> tuple[list[str], bool]:
        found = {key: find_file(folder, spec) for key, spec in files.items()}
        missing = [files[k][0] for k, p in found.items() if p is None]
        return missing, len(missing) < len(files)

    needed = ", ".join(_describe(spec) for spec in files.values())
    folder = _search(name, path, subdirs, check, f"the files {needed} in one folder", how_to_get)
    return {key: p for key, spec in files.items() if (p := find_file(folder, spec)) is not None}


def find_folder(
    name: str,
    path: str | Path | None,
    required: Sequence[str],
    *,
    subdirs: Sequence[str] = (),
    how_to_get: str = "",
) -> Path:
    """The candidate folder (same search and errors as :func:`find_dataset`) holding every relative path in
    ``required`` (files or folders, e.g. ``["data/spam-1", "data/easy-ham-1"]``)."""

    def check(folder: Path) -> tuple[list[str], bool]:
        missing = [r for r in required if not (folder / r).exists()]
        return missing, len(missing) < len(required)

    return _search(name, path, subdirs, check, f"{', '.join(required)} in one folder", how_to_get)
