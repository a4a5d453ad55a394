"""The native path kernel (``sparse/native/paths.cpp``): ``out += L @ R`` into a dense tensor equals scipy's
product; the exact CH scores are the same with and without it; when it cannot be built the scores fall back
to scipy's products and say so once."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from edgetune.sparse import predictors_paths as pp
from edgetune.sparse.native import paths as native_paths

kernels = native_paths.load()
needs_kernel = pytest.mark.skipif(kernels is None, reason="native path kernel not built (no C++ compiler)")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_product_equals_scipy(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    lil = sp.random(37, 53, density=0.1, format="lil", random_state=rng)
    lil[5] = 0  # an empty row
    left = lil.tocsr()
    left.eliminate_zeros()
    right = sp.random(53, 41, density=0.1, format="csr", random_state=rng)
    base = torch.randn(37, 60, dtype=dtype, generator=torch.Generator().manual_seed(0))
    out = base.clone()
    view = out[:, 3:44]  # leading dimension 60, unit column stride: rows written in place
    assert kernels is not None
    kernels.add_product(view, left, right, threads=2)
    want = base.double().numpy().copy()
    want[:, 3:44] += (left @ right).toarray()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(out.double().numpy(), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="do not chain"):
        kernels.add_product(view, right, left, threads=1)


@needs_kernel
@pytest.mark.parametrize(("shape", "density", "model"), [((300, 500), 0.02, "ch3"), ((512, 256), 0.03, "ch2"),
                                                         ((64, 64), 0.0, "ch3")])
def test_scores_same_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int],
                                                 density: float, model: str) -> None:
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(1)) < density
    got = pp.sparse_path_scores(mask, model, dtype=torch.float64, fill_existing=-1.0)
    monkeypatch.setattr(pp, "NATIVE_OFF", True)
    want = pp.sparse_path_scores(mask, model, dtype=torch.float64, fill_existing=-1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_falls_back_to_scipy_when_it_cannot_be_built(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    mask = torch.rand(200, 300, generator=torch.Generator().manual_seed(2)) < 0.03
    monkeypatch.setattr(pp, "NATIVE_OFF", True)
    want = pp.sparse_path_scores(mask, "ch3", dtype=torch.float64, fill_existing=0.0)
    monkeypatch.setattr(pp, "NATIVE_OFF", False)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("EDGETUNE_NATIVE_DIR", str(tmp_path))  # an empty cache: it has to build
    native_paths.reset()
    try:
        with caplog.at_level(logging.INFO, logger="edgetune.sparse.native.paths"):
            got = pp.sparse_path_scores(mask, "ch3", dtype=torch.float64, fill_existing=0.0)
            pp.sparse_path_scores(mask, "ch3", dtype=torch.float64, fill_existing=0.0)
        assert native_paths.load() is None
        said = [m for m in caplog.messages if "unavailable" in m]
        assert len(said) == 1 and "no-such-compiler-xyz" in said[0] and "scipy" in said[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        native_paths.reset()


@needs_kernel
def test_add_double_equals_the_path_sum() -> None:
    """``out[a, k] += sum over a - i - b - k of du[i, k] dv[a, b]``, by brute force over every path."""
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(9, 11, generator=g) < 0.4).numpy()
    dv = torch.randn(9, 9, generator=g).double().numpy() * (torch.rand(9, 9, generator=g) < 0.5).numpy()
    du = torch.randn(11, 11, generator=g).double().numpy() * (torch.rand(11, 11, generator=g) < 0.5).numpy()
    want = np.zeros((9, 11))
    for a, i, b, k in itertools.product(range(9), range(11), range(9), range(11)):
        if mask[a, i] and mask[b, i] and mask[b, k]:
            want[a, k] += du[i, k] * dv[a, b]
    out = torch.zeros(9, 11, dtype=torch.float64)
    s = sp.csr_matrix(mask.astype(np.float64))
    assert kernels is not None
    kernels.add_double(out, s, s.T.tocsr(), sp.csr_matrix(dv), sp.csr_matrix(du), threads=2)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)
