"""Native kernel of the exact path-based CH scores (:mod:`edgetune.sparse.predictors_paths`): ``out += L @ R``
for two scipy CSR matrices, accumulated straight into a dense row-major torch tensor (``paths.cpp``).

:func:`load` builds it on first use (about a second, cached like the layer kernels) and returns None, with one
log line per process, when it cannot (no compiler, ``EDGETUNE_NATIVE=0``); the predictors then use scipy's
sparse products, same results.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from edgetune.sparse.native.compile import NativeBuildError, build_library

__all__ = ["SOURCE", "PathKernels", "load", "reset"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paths.cpp")
_VERSION = 2
_INT32_MAX = 2**31 - 1

_loaded: PathKernels | None = None
_tried = False


class PathKernels:
    """The loaded library."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        if lib.et_paths_version() != _VERSION:
            raise NativeBuildError(f"{path} has kernel version {lib.et_paths_version()}, expected {_VERSION}")
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        for fn in (lib.et_paths_add_f32, lib.et_paths_add_f64):
            fn.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, c_int]
            fn.restype = None
        for fn in (lib.et_paths_double_f32, lib.et_paths_double_f64):
            fn.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, c_int]
            fn.restype = None
        self._lib = lib
        self.path = path

    @staticmethod
    def fits(left: sp.csr_matrix, right: sp.csr_matrix) -> bool:
        """Whether the column indices of both fit the kernel's int32."""
        return max(left.shape[1], right.shape[1]) <= _INT32_MAX

    def add_product(self, out: torch.Tensor, left: sp.csr_matrix, right: sp.csr_matrix, threads: int) -> None:
        """``out += left @ right``: ``out`` a float32 or float64 CPU tensor ``(rows, cols)`` with unit column
        stride; ``left`` ``(rows, inner)`` and ``right`` ``(inner, cols)`` CSR (values cast to ``out``'s dtype)."""
        _check_out(out)
        if left.shape[0] != out.shape[0] or right.shape[1] != out.shape[1] or left.shape[1] != right.shape[0]:
            raise ValueError(f"shapes {left.shape} @ {right.shape} -> {tuple(out.shape)} do not chain")
        keep: list[np.ndarray] = []  # the arrays the call reads, alive until it returns
        fn = self._lib.et_paths_add_f32 if out.dtype == torch.float32 else self._lib.et_paths_add_f64
        fn(out.shape[0], *_arrays(left, out.dtype, keep), *_arrays(right, out.dtype, keep), out.data_ptr(),
           out.stride(0), int(max(1, threads)))

    def add_double(self, out: torch.Tensor, mask: sp.csr_matrix, mask_t: sp.csr_matrix, dv: sp.csr_matrix,
                   du: sp.csr_matrix, threads: int) -> None:
        """``out[a, k] += sum over the paths a - i - b - k of du[i, k] * dv[a, b]``: ``mask`` ``(O, I)`` and
        ``mask_t`` its transpose (CSR, sorted), ``dv`` ``(O, O)`` and ``du`` ``(I, I)`` CSR corrections."""
        _check_out(out)
        n_out, n_in = mask.shape
        if tuple(out.shape) != (n_out, n_in) or mask_t.shape != (n_in, n_out) or dv.shape != (n_out, n_out) \
                or du.shape != (n_in, n_in):
            raise ValueError(f"mask {mask.shape}, its transpose {mask_t.shape}, dv {dv.shape}, du {du.shape} and "
                             f"out {tuple(out.shape)} do not fit together")
        keep: list[np.ndarray] = []
        fn = self._lib.et_paths_double_f32 if out.dtype == torch.float32 else self._lib.et_paths_double_f64
        fn(n_out, n_in, *_arrays(mask, out.dtype, keep)[:2], *_arrays(mask_t, out.dtype, keep)[:2],
           *_arrays(dv, out.dtype, keep), *_arrays(du, out.dtype, keep), out.data_ptr(), out.stride(0),
           int(max(1, threads)))


def _check_out(out: torch.Tensor) -> None:
    if out.dtype not in (torch.float32, torch.float64) or out.device.type != "cpu" or out.stride(1) != 1:
        raise ValueError(f"out must be a float32/float64 CPU tensor with unit column stride, got {out.dtype}")


def _arrays(m: sp.csr_matrix, dtype: torch.dtype, keep: list[np.ndarray]) -> tuple[int, int, int]:
    """Pointers to ``m``'s row pointers (int64), column indices (int32) and values (``dtype``), converted
    where needed; the arrays are appended to ``keep`` so that they outlive the call."""
    real = np.float32 if dtype == torch.float32 else np.float64
    indptr = np.ascontiguousarray(m.indptr, dtype=np.int64)
    indices = np.ascontiguousarray(m.indices, dtype=np.int32)
    data = np.ascontiguousarray(m.data, dtype=real)
    keep.extend((indptr, indices, data))
    return indptr.ctypes.data, indices.ctypes.data, data.ctypes.data


def load() -> PathKernels | None:
    """The kernel, built first when not cached; None (one log line per process) when it cannot be had."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get("EDGETUNE_NATIVE", "1").strip().lower() in ("0", "off", "false", "no"):
        log.info("native path kernel off (EDGETUNE_NATIVE); exact CH scores use scipy's sparse products")
        return None
    try:
        _loaded = PathKernels(build_library(SOURCE))
    except (NativeBuildError, OSError, AttributeError) as err:
        log.info("native path kernel unavailable, exact CH scores use scipy's sparse products (slower): %s", err)
        _loaded = None
    return _loaded


def reset() -> None:
    """Forget the result of :func:`load` (tests; a later call tries again)."""
    global _loaded, _tried
    _loaded, _tried = None, False
