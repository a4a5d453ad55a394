"""Build and call the official CHT link predictor (C++/OpenMP ``CH_scores`` extension) for side-by-side timing.

The official repository (``biomedical-cybernetics/Cannistraci-Hebb-training``, spec ``research/cht-spec.md`` §3)
builds ``CH_scores`` from ``bindings.cpp`` and ``CH_scores_new_v2.cpp`` with ``python setup.py build_ext`` (pybind11,
``-std=c++11 -fopenmp``). Its sources are not part of edgetune: :func:`load_official` takes the folder of a checkout,
compiles the two files with the same flags (Python's own optimisation flags, as setuptools would, and pybind11's
headers from the ``pybind11`` package or the copy that ships with torch) into a cache folder keyed by the sources'
hash, and imports the module. :func:`official_scores` runs what the official scheduler runs for one layer
(``mlp_and_cnn/dst_scheduler.py``, L3p branch): dense ``(O+I)²`` monopartite adjacency, scipy CSR, the C++ call,
the ``(O, I)`` block, existing links zeroed. The extension prints two timing lines per call; they go to
``/dev/null`` here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import scipy.sparse as sp
import torch

from edgetune.core.errors import ConfigError

__all__ = ["OFFICIAL_MODEL_INDEX", "OFFICIAL_SOURCES", "load_official", "official_scores", "official_threads"]

log = logging.getLogger(__name__)

OFFICIAL_SOURCES = ("bindings.cpp", "CH_scores_new_v2.cpp")
OFFICIAL_MODEL_INDEX = {"ch2_l3": 2, "ch3_l3": 3}  # model numbering of CH_scores_new_v2 (spec §1.2)
_MODULE = "CH_scores"


def _pybind11_include() -> str:
    try:
        import pybind11  # type: ignore[import-not-found]

        return str(pybind11.get_include())
    except ImportError:
        bundled = Path(torch.__file__).parent / "include"
        if not (bundled / "pybind11" / "pybind11.h").exists():
            raise ConfigError(
                "building the official CH_scores extension needs pybind11's headers; "
                "install them with `pip install pybind11`."
            ) from None
        return str(bundled)


def _cache_dir(digest: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "edgetune" / "official-cht" / digest


def load_official(src: str | os.PathLike[str], *, cxx: str | None = None) -> ModuleType:
    """Compile (once per source version) and import the official ``CH_scores`` extension.

    Args:
        src: folder of a checkout of the official CHT repository (holds ``bindings.cpp``,
            ``CH_scores_new_v2.cpp`` and ``CH_scores_new_v2.h``).
        cxx: C++ compiler (default ``$CXX`` or ``g++``).

    Returns:
        The imported module; ``module.CH_scores_new_v2`` is the official scorer.
    """
    folder = Path(src).expanduser()
    missing = [name for name in (*OFFICIAL_SOURCES, "CH_scores_new_v2.h") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"official_src={str(folder)!r} lacks {', '.join(missing)}; point it at a checkout of "
            "github.com/biomedical-cybernetics/Cannistraci-Hebb-training (the folder with setup.py)."
        )
    digest = hashlib.sha256(
        b"".join((folder / n).read_bytes() for n in (*OFFICIAL_SOURCES, "CH_scores_new_v2.h"))
    ).hexdigest()[:16]
    build = _cache_dir(digest)
    target = build / f"{_MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not target.exists():
        build.mkdir(parents=True, exist_ok=True)
        flags = shlex.split(sysconfig.get_config_var("CFLAGS") or "-O3 -DNDEBUG")
        cmd = [
            cxx or os.environ.get("CXX", "g++"), *flags, "-fPIC", "-shared", "-std=c++11", "-fopenmp",
            f"-I{_pybind11_include()}", f"-I{sysconfig.get_paths()['include']}",
            *(str(folder / n) for n in OFFICIAL_SOURCES), "-o", str(target.with_suffix(".tmp")),
        ]  # fmt: skip
        log.info("building the official CH_scores extension: %s", shlex.join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(
                f"building the official CH_scores extension failed (exit {done.returncode}):\n"
                f"{done.stderr[-2000:]}\nCheck that a C++ compiler with OpenMP is installed."
            )
        target.with_suffix(".tmp").rename(target)
    loader = importlib.machinery.ExtensionFileLoader(_MODULE, str(target))
    spec = importlib.util.spec_from_file_location(_MODULE, target, loader=loader)
    if spec is None:
        raise ConfigError(f"could not import the official extension built at {target}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 (the C++ ``std::cout`` timing lines) to /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def official_threads() -> int:
    """OpenMP threads for the extension (its default): ``$OMP_NUM_THREADS`` if set, else every core.

    In a process that imported torch the extension shares torch's OpenMP runtime, so callers set this
    with ``torch.set_num_threads`` around its calls (``torch.set_num_threads`` would otherwise apply).
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else os.cpu_count() or 1


def official_scores(module: ModuleType, mask: torch.Tensor, method: str) -> np.ndarray:
    """Official scores ``(O, I)`` (float64, 0 on existing links) of a bool mask, as its scheduler does."""
    if method not in OFFICIAL_MODEL_INDEX:
        raise ConfigError(
            f"the official code has no {method!r}; choose one of {', '.join(OFFICIAL_MODEL_INDEX)}."
        )
    xb = mask.detach().cpu().numpy().astype(np.float64)
    n_out, n_in = xb.shape
    n = n_out + n_in
    x = np.zeros((n, n))  # monopartite adjacency: mask top-right, its transpose bottom-left
    x[:n_out, n_out:] = xb
    x[n_out:, :n_out] = xb.T
    a = sp.csr_matrix(x)
    with _quiet_stdout():
        flat = module.CH_scores_new_v2(a.indices, a.indptr, n, [3], 1, 3, [OFFICIAL_MODEL_INDEX[method]], 1)
    scores = np.asarray(flat).reshape(n, n)
    return scores[:n_out, n_out:] * (xb == 0)
