"""Find a dataset's folder on disk, and say exactly where we looked when it is missing.

Search order: the recipe's ``data.path`` (and ``data.path/<sub>``), ``$EDGETUNE_DATA/<sub>`` and
``$EDGETUNE_DATA``, then the per-user folder ``${XDG_DATA_HOME:-~/.local/share}/edgetune/datasets/<sub>``
(where ``make data`` installs when not run as root), then the system folders ``/usr/share/datasets/<sub>``
(Debian's ``dataset-*`` packages and ``make data`` as root install there). ``<sub>`` runs over the dataset
name and its usual folder names (``cifar-10-batches-py``...). :func:`find_dataset` matches a folder that
holds every file the loader needs (files may be gzip-compressed, ``.gz``); :func:`find_folder` one that
holds given paths (files or folders), for datasets stored as a tree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetune.core.errors import DataError

__all__ = [
    "ENV_VAR",
    "SYSTEM_ROOTS",
    "candidate_dirs",
    "find_dataset",
    "find_file",
    "find_folder",
    "user_data_root",
]

log = logging.getLogger(__name__)

ENV_VAR = "EDGETUNE_DATA"


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


def candidate_dirs(name: str, path: str | Path | None, subdirs: Sequence[str] = ()) -> list[Candidate]:
    """Folders to search, in order, for dataset ``name`` (see the module docstring)."""
    subs = list(dict.fromkeys([name, *subdirs]))
    out: list[Candidate] = []
    if path:
        root = Path(path).expanduser()
        out += [Candidate(root, "data.path")] + [Candidate(root / s, "data.path") for s in subs]
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        out += [Candidate(root / s, f"${ENV_VAR}") for s in subs] + [Candidate(root, f"${ENV_VAR}")]
    for root in SYSTEM_ROOTS:
        out += [Candidate(root / s, "system") for s in subs]
    return out


def _describe(spec: FileSpec) -> str:
    alt = f" (or {', '.join(spec[1:])})" if len(spec) > 1 else ""
    return f"{spec[0]}[.gz]{alt}"


def find_dataset(
    name: str,
    path: str | Path | None,
    files: dict[str, FileSpec],
    *,
    subdirs: Sequence[str] = (),
    how_to_get: str = "",
) -> dict[str, Path]:
    """Find the first folder holding every file in ``files`` and return ``{key: path of that file}``.

    files: key -> accepted names of that file, e.g. ``{"train_images": ["train-images-idx3-ubyte"]}``.
    how_to_get: sentence(s) telling the user how to obtain the data, appended to the error.
    Raises :class:`DataError` listing every folder searched (and what an incomplete one lacks).
    """
    searched: list[str] = []
    for cand in candidate_dirs(name, path, subdirs):
        if not cand.path.is_dir():
            searched.append(f"{cand.path} ({cand.origin}, no such folder)")
            continue
        found = {key: find_file(cand.path, spec) for key, spec in files.items()}
        missing = [files[k][0] for k, p in found.items() if p is None]
        if not missing:
            _note_fallback(path, name, cand)
            return {k: p for k, p in found.items() if p is not None}
        lacks = "none of the files" if len(missing) == len(files) else f"lacks {', '.join(missing)}"
        searched.append(f"{cand.path} ({cand.origin}, {lacks})")
    needed = ", ".join(_describe(spec) for spec in files.values())
    raise _not_found(name, f"the files {needed} in one folder", searched, how_to_get)


def find_folder(
    name: str,
    path: str | Path | None,
    required: Sequence[str],
    *,
    subdirs: Sequence[str] = (),
    how_to_get: str = "",
) -> Path:
    """The first candidate folder (same search order as :func:`find_dataset`) holding every relative
    path in ``required`` (files or folders, e.g. ``["data/spam-1", "data/easy-ham-1"]``).

    Raises :class:`DataError` listing every folder searched and what each one lacks.
    """
    searched: list[str] = []
    for cand in candidate_dirs(name, path, subdirs):
        if not cand.path.is_dir():
            searched.append(f"{cand.path} ({cand.origin}, no such folder)")
            continue
        missing = [r for r in required if not (cand.path / r).exists()]
        if not missing:
            _note_fallback(path, name, cand)
            return cand.path
        lacks = "none of them" if len(missing) == len(required) else f"lacks {', '.join(missing)}"
        searched.append(f"{cand.path} ({cand.origin}, {lacks})")
    raise _not_found(name, f"{', '.join(required)} in one folder", searched, how_to_get)


def _note_fallback(path: str | Path | None, name: str, cand: Candidate) -> None:
    if path and cand.origin != "data.path":
        log.warning("data.path=%s does not hold dataset %r; using %s instead", path, name, cand.path)


def _not_found(name: str, needs: str, searched: list[str], how_to_get: str) -> DataError:
    if not os.environ.get(ENV_VAR):
        searched = [*searched, f"${ENV_VAR} (not set)"]
    return DataError(
        f"dataset {name!r} not found. It needs {needs}. Searched, in order: "
        f"{'; '.join(searched)}. {how_to_get}".rstrip()
    )
