"""Native sparse kernels: equal to the dense reference and to the csr backend; the fallback when they cannot
be built; a short training run that matches the csr backend step for step."""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.sparse import native
from edgetune.sparse.layer import SparseLinear, choose_backend


@pytest.fixture()
def kernels() -> native.NativeKernels:
    """The loaded kernels (loaded here, not at import); the test is skipped when they cannot be built."""
    k = native.load()
    if k is None:
        pytest.skip("native sparse kernels unavailable (no C++ compiler?); the csr fallback is tested below")
    return k


@pytest.fixture()
def fresh_native(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A forgotten load() result and an empty cache folder; restored afterwards."""
    monkeypatch.setenv("EDGETUNE_NATIVE_DIR", str(tmp_path))
    native.reset()
    yield tmp_path
    native.reset()


def _mask(out_f: int, in_f: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[0, 0] = True
    if out_f > 2 and in_f > 2:
        mask[1] = False  # an output without links
        mask[:, 2] = False  # an input without links
    return mask


def _run(layer: SparseLinear, x: torch.Tensor, gy_seed: int = 3) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=y.dtype)
    (y * gy).sum().backward()
    out = (y.detach(), x.grad, layer.values.grad, None if layer.bias is None else layer.bias.grad)
    layer.zero_grad(set_to_none=True)
    return out


CASES = [(7, 5, 0.5, 1), (9, 13, 0.3, 2), (40, 50, 0.1, 16), (64, 40, 0.05, 33), (300, 200, 0.02, 130),
         (96, 80, 0.05, 600), (33, 20, 0.2, 1030)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_equals_dense_reference(kernels: native.NativeKernels, case: tuple, bias: bool, relu: bool,
                                       threads: int) -> None:
    out_f, in_f, density, n = case
    mask = _mask(out_f, in_f, density, seed=out_f + n)
    torch.manual_seed(n)
    lin = nn.Linear(in_f, out_f, bias=bias)
    layer = SparseLinear.from_dense(lin, mask, backend="native", activation="relu" if relu else None)
    assert layer.resolved_backend() == "native"
    x = torch.randn(n, in_f, generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # the kernels read both layouts: (N, in) contiguous, and the transposed view of (in, N)
        got = [_run(layer, x), _run(layer, x.t().contiguous().t())]
    finally:
        torch.set_num_threads(old)

    w = (lin.weight.detach() * mask).double().requires_grad_()
    b = lin.bias.detach().double().requires_grad_() if bias else None
    xr = x.double().requires_grad_()
    y = F.linear(xr, w, b)
    y = y.relu() if relu else y
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).double())
    ref = (y.detach(), xr.grad, w.grad[mask], None if b is None else b.grad)
    for res in got:
        for name, a, r in zip(("output", "input grad", "value grad", "bias grad"), res, ref):
            if r is None:
                assert a is None
                continue
            scale = float(r.abs().max()) + 1.0
            assert float((a.double() - r).abs().max()) <= 2e-6 * scale, name


@pytest.mark.parametrize("transposed_output", [False, True])
def test_native_equals_csr_backend(kernels: native.NativeKernels, transposed_output: bool) -> None:
    mask = _mask(120, 90, 0.04, seed=0)
    lin = nn.Linear(90, 120)
    x = torch.randn(3, 37, 90, generator=torch.Generator().manual_seed(4))  # leading dims flattened
    results = {}
    for backend in ("native", "csr"):
        layer = SparseLinear.from_dense(lin, mask, backend=backend, transposed_output=transposed_output,
                                        activation="relu")
        results[backend] = _run(layer, x)
    for a, b in zip(results["native"], results["csr"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert results["native"][0].shape == (3, 37, 120)


@pytest.mark.parametrize("n", [40, 600, 1024])
def test_native_chain_equals_dense_reference(kernels: native.NativeKernels, n: int) -> None:
    """Three layers passing batch-contiguous (from N = 512: padded) outputs and gradients between them,
    the first reading a plain (N, in) input, then a dense head; under no_grad the same outputs."""
    dims = [24, 48, 40, 36]
    lins = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
    masks = [_mask(b, a, 0.15, seed=i) for i, (a, b) in enumerate(itertools.pairwise(dims))]
    head = nn.Linear(dims[-1], 5)
    sparse = nn.Sequential(*[SparseLinear.from_dense(lin, m, backend="native", transposed_output=True,
                                                     activation="relu") for lin, m in zip(lins, masks)], head)
    x = torch.randn(n, dims[0], generator=torch.Generator().manual_seed(2))
    y = sparse(x)
    (y * torch.arange(5.0)).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), y.detach(), atol=0, rtol=0)

    h = x.double()
    ws = [(lin.weight.detach() * m).double().requires_grad_() for lin, m in zip(lins, masks)]
    for w, lin in zip(ws, lins):
        h = F.linear(h, w, lin.bias.detach().double()).relu()
    y_ref = F.linear(h, head.weight.detach().double(), head.bias.detach().double())
    (y_ref * torch.arange(5.0).double()).sum().backward()
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    for layer, w, m in zip(sparse, ws, masks):
        torch.testing.assert_close(layer.values.grad.double(), w.grad[m], atol=1e-3, rtol=1e-4)


def test_auto_picks_native_for_cpu_float32(kernels: native.NativeKernels) -> None:
    cpu = torch.device("cpu")
    assert choose_backend(0.01, cpu, torch.float32) == "native"
    assert choose_backend(0.01, cpu, torch.float32, torch.int64) == "csr"  # huge layers: int64 links
    assert choose_backend(0.01, cpu, torch.float64) == "csr"
    assert choose_backend(0.15, cpu, torch.float32) == "native"  # above the csr limit, below native's
    assert choose_backend(0.5, cpu, torch.float32) == "dense"
    layer = SparseLinear(20, 10, torch.tensor([[0, 3], [1, 2]]), dtype=torch.float64, backend="native")
    with pytest.raises(ConfigError, match="float32 on the CPU"):
        layer.resolved_backend()
    layer = SparseLinear(20, 10, torch.tensor([[0, 3], [1, 2]]), backend="native")
    with pytest.raises(ShapeError, match="cast the input"):
        layer(torch.ones(3, 20, dtype=torch.float64))


def _mlp(backend: str, seed: int) -> nn.Sequential:
    from edgetune.sparse.bench.train_speed import build_mlp

    return build_mlp((48, 40), 24, 3, 0.2, backend=backend, seed=seed)


def test_training_matches_csr_and_learns(kernels: native.NativeKernels) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 24, generator=g)
    y = (x[:, :3].argmax(1))  # a learnable rule
    losses = {}
    for backend in ("native", "csr"):
        model = _mlp(backend, seed=1)
        assert {m.resolved_backend() for m in model if isinstance(m, SparseLinear)} == {backend}
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses[backend] = []
        for _ in range(60):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[backend].append(float(loss.detach()))
    assert losses["native"][-1] < 0.5 * losses["native"][0]  # it learns
    torch.testing.assert_close(torch.tensor(losses["native"]), torch.tensor(losses["csr"]), atol=1e-3, rtol=1e-3)


def test_fallback_when_the_build_fails(fresh_native: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-edgetune")
    with caplog.at_level(logging.WARNING, logger="edgetune.sparse.native"):
        assert native.load() is None
        assert native.load() is None  # said once
        layer = SparseLinear.from_dense(nn.Linear(30, 20), _mask(20, 30, 0.1, 0), backend="native",
                                        activation="relu")
        auto = SparseLinear.from_dense(nn.Linear(30, 20), _mask(20, 30, 0.1, 0))
        assert layer.resolved_backend() == "csr" and auto.resolved_backend() == "csr"
        y, gx, gv, _ = _run(layer, torch.randn(5, 30))
        assert y.shape == (5, 20) and bool((y >= 0).all()) and gv.shape == (layer.nnz(),)
        assert gx.shape == (5, 30)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falls back to the csr kernels" in warnings[0].getMessage()
    assert "no-such-compiler-edgetune" in warnings[0].getMessage()
    assert not list(fresh_native.glob("*.so"))


def test_disabled_by_environment(fresh_native: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGETUNE_NATIVE", "0")
    assert native.load() is None
    assert choose_backend(0.01, torch.device("cpu"), torch.float32) == "csr"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_build_command_builds_and_checks(fresh_native: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgetune.sparse.native.__main__ import main

    assert main(["status"]) == 0 and "not built" in capsys.readouterr().out
    assert main(["build"]) == 0
    assert "built and checked" in capsys.readouterr().out
    assert native.library_path().exists() and native.library_path().parent == fresh_native
    assert native.load() is not None
