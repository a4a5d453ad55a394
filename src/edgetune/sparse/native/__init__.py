"""Native CPU kernels of :class:`~edgetune.sparse.layer.SparseLinear`: build, cache and load.

``sparse_kernels.cpp`` (next to this file) holds two float32 entry points over int32 CSR links: the
forward (``y^T = W x^T + b``, ReLU and its bit mask fused) and the backward (value, bias and input
gradients from one pass over each batch tile, the ReLU mask applied while the output gradient is packed).
Activations may come batch-contiguous (what the layers pass between them) or row-major; outputs are
batch-contiguous, their rows padded from 512 batch rows on (see :func:`_padded`). It is a plain C++ shared
library called through ``ctypes``: building needs a C++ compiler with OpenMP (``g++``), no Python headers,
and takes about a second (:mod:`edgetune.sparse.native.compile`).

``make setup`` builds it (``python -m edgetune.sparse.native build``) into a cache folder keyed by the
source, the flags, the compiler and the CPU (``-march=native``): ``$EDGETUNE_NATIVE_DIR``, else
``<venv>/share/edgetune-native`` inside a virtualenv, else ``~/.cache/edgetune/native``. :func:`load`
returns the loaded kernels, building them first when the cache lacks them, or None when that fails (no
compiler, another CPU without a compiler, ``EDGETUNE_NATIVE=0``); it logs why once per process, and the
layers then use the ``csr`` kernels (``torch.sparse``).
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from edgetune.sparse.native.compile import NativeBuildError, build_library, cache_dir, cached_path

__all__ = ["NativeBuildError", "NativeKernels", "build", "cache_dir", "library_path", "load", "reset"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sparse_kernels.cpp")
_VERSION = 5  # et_version() of the source this module expects
_DISABLE_VALUES = ("0", "off", "false", "no")

_loaded: NativeKernels | None = None
_tried = False


def library_path() -> Path:
    """Where the library for this source, flags, compiler and CPU is (or would be) cached."""
    return cached_path(SOURCE)


def build(force: bool = False) -> Path:
    """Compile ``sparse_kernels.cpp`` into the cache (unless there already) and return the library's path.

    Raises :class:`NativeBuildError` with the compiler's message when compiling fails.
    """
    return build_library(SOURCE, force=force)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _layout(t: Tensor) -> tuple[Tensor, int, int]:
    """An ``(N, features)`` activation as the kernels take it: ``(t, 0, ld)`` when ``t.t()`` is row-major
    with leading dimension ``ld`` (batch-contiguous, what the layers pass between them), ``(t, 1, ld)``
    when ``t`` is, else ``(contiguous copy, 1, features)``."""
    n, f = t.shape
    s0, s1 = t.stride()
    if (n <= 1 or s0 == 1) and (f <= 1 or s1 >= n):
        return t, 0, (s1 if f > 1 else max(n, 1))
    if (f <= 1 or s1 == 1) and (n <= 1 or s0 >= f):
        return t, 1, (s0 if n > 1 else max(f, 1))
    return t.contiguous(), 1, max(f, 1)


def _padded(rows: int, n: int, like: Tensor) -> Tensor:
    """An uninitialised ``(rows, n)`` float32 tensor, row-major; from n = 512 on its leading dimension is
    padded to an odd number of 64-byte lines, so that the rows of one batch tile spread over the cache
    sets (see ``direct`` in the C++ source)."""
    ld = n
    if n >= 512:
        ld = -(-n // 16) * 16
        ld += 16 if (ld // 16) % 2 == 0 else 0
    return torch.empty_strided((rows, n), (ld, 1), dtype=like.dtype, device=like.device)


class NativeKernels:
    """The loaded library. Values float32, links int32, contiguous, on the CPU (the caller checks)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        if lib.et_version() != _VERSION:
            raise NativeBuildError(f"{path} has kernel version {lib.et_version()}, expected {_VERSION}")
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.et_forward.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int, i64, ptr, i64, c_int, ptr, i64,
                                   c_int]
        lib.et_forward.restype = None
        lib.et_backward.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int, i64, ptr, i64,
                                    ptr, c_int, i64, ptr, i64, ptr, ptr, c_int]
        lib.et_backward.restype = None
        self._lib = lib

    def forward(self, crow: Tensor, idx: Tensor, values: Tensor, bias: Tensor | None, x: Tensor,
                relu: bool = False, relu_mask: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """``act(x @ W^T + b)`` for x ``(N, cols)``; ``W`` the CSR ``(crow, idx, values)``, ``rows = len(crow) - 1``.

        Returns ``(yt, x_used, mask)``: ``yt = y^T`` ``(rows, N)`` row-major (its leading dimension
        padded from N = 512 on), ``x`` as the kernel read it (a contiguous copy when it was in neither
        layout), and with ``relu`` and ``relu_mask`` the ReLU's mask for :meth:`backward` (one bit per
        output, int16 ``(rows, ceil(N / 16))``), else None.
        """
        x, layout, ldx = _layout(x)
        n, cols = x.shape
        rows = crow.shape[0] - 1
        yt = _padded(rows, n, x)
        mask = torch.empty(rows, -(-n // 16), dtype=torch.int16) if relu and relu_mask else None
        self._lib.et_forward(rows, cols, n, crow.data_ptr(), idx.data_ptr(), values.data_ptr(), _ptr(bias),
                             x.data_ptr(), layout, ldx, yt.data_ptr(), yt.stride(0), int(relu), _ptr(mask),
                             0 if mask is None else mask.stride(0), torch.get_num_threads())
        return yt, x, mask

    def backward(self, crow: Tensor, idx: Tensor, transposed: tuple[Tensor, Tensor, Tensor] | None,
                 values: Tensor, gyt: Tensor, relu_mask: Tensor | None, x: Tensor, need_values: bool,
                 need_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients ``(gx (N, cols) or None, gv (nnz,) or None, gb (rows,) or None)`` of :meth:`forward`
        from the gradient ``gyt`` ``(rows, N)`` of its output (any strides); gx when ``transposed``
        (``(crow_t, idx_t, perm_t)``, the CSR of ``W^T``) is given, as the transposed view of a row-major
        ``(cols, N)``. ``relu_mask``: the mask :meth:`forward` returned, when it applied ReLU."""
        g, g_layout, ldg = _layout(gyt.t())
        x, x_layout, ldx = _layout(x)
        n, cols = x.shape
        rows = crow.shape[0] - 1
        gxt = _padded(cols, n, x) if transposed is not None else None
        gv = values.new_empty(values.shape) if need_values else None
        gb = values.new_empty(rows) if need_bias else None
        crow_t, idx_t, perm_t = transposed if transposed is not None else (None, None, None)
        self._lib.et_backward(rows, cols, n, crow.data_ptr(), idx.data_ptr(), _ptr(crow_t), _ptr(idx_t),
                              _ptr(perm_t), values.data_ptr(), g.data_ptr(), g_layout, ldg, _ptr(relu_mask),
                              0 if relu_mask is None else relu_mask.stride(0), x.data_ptr(), x_layout, ldx,
                              _ptr(gxt), 0 if gxt is None else gxt.stride(0), _ptr(gv), _ptr(gb),
                              torch.get_num_threads())
        return (None if gxt is None else gxt.t()), gv, gb


def _disabled() -> bool:
    return os.environ.get("EDGETUNE_NATIVE", "1").strip().lower() in _DISABLE_VALUES


def load() -> NativeKernels | None:
    """The native kernels, built first when not cached; None (with one log line per process) when they
    cannot be had. ``EDGETUNE_NATIVE=0`` turns them off."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if _disabled():
        log.info("native sparse kernels off (EDGETUNE_NATIVE=%s); SparseLinear uses the csr kernels",
                 os.environ.get("EDGETUNE_NATIVE"))
        return None
    try:
        _loaded = NativeKernels(build())
    except (NativeBuildError, OSError, AttributeError) as err:
        log.warning("native sparse kernels unavailable, SparseLinear falls back to the csr kernels "
                    "(torch.sparse, slower): %s. Build them with `python -m edgetune.sparse.native build`.", err)
        _loaded = None
    return _loaded


def reset() -> None:
    """Forget the result of :func:`load` (tests; a later call tries again)."""
    global _loaded, _tried
    _loaded, _tried = None, False
