"""SparseLinear: every backend equals a dense masked reference; topology changes and optimizer remap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.sparse import native
from edgetune.sparse.kernels import Topology, csr_linear_t, dense_linear, gather_linear_t
from edgetune.sparse.layer import SparseLinear, choose_backend, remap_optimizer_state

BACKENDS = ["csr", "gather", "dense", "auto"]
DT = torch.float64


def _layer(out_f: int, in_f: int, density: float, seed: int, backend: str = "auto",
           bias: bool = True, **kw: object) -> tuple[SparseLinear, nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(DT)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[0, 0] = True  # at least one link
    return SparseLinear.from_dense(lin, mask, backend=backend, **kw), lin, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed_output", [False, True])
@pytest.mark.parametrize("case", [(7, 11, 0.3, (5,)), (33, 20, 0.05, (3, 4)), (16, 48, 0.6, (2, 3, 2)),
                                  (64, 40, 0.02, (9,))])
def test_forward_backward_equal_dense_masked_reference(backend: str, transposed_output: bool,
                                                       case: tuple) -> None:
    out_f, in_f, density, lead = case
    layer, lin, mask = _layer(out_f, in_f, density, seed=out_f * in_f, backend=backend,
                              transposed_output=transposed_output)
    x = torch.randn(*lead, in_f, dtype=DT, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = layer(x)
    g = torch.randn(y.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
    y.backward(g)

    w_ref = (lin.weight.detach() * mask).requires_grad_()
    b_ref = lin.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(g)

    assert y.shape == y_ref.shape == (*lead, out_f)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=0)
    assert layer.values.grad.shape == (layer.nnz(),)
    torch.testing.assert_close(layer.values.grad, w_ref.grad[mask], atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("backend", ["csr", "gather", "dense"])
def test_no_bias_and_input_without_grad(backend: str) -> None:
    layer, _lin, mask = _layer(9, 6, 0.4, seed=3, backend=backend, bias=False)
    x = torch.randn(4, 6, dtype=DT)  # first layer of a net: no input gradient wanted
    layer(x).sum().backward()
    torch.testing.assert_close(layer.values.grad, x.sum(0).expand(9, 6)[mask], atol=1e-12, rtol=0)
    assert layer.bias is None


@pytest.mark.parametrize("kernel", [csr_linear_t, gather_linear_t])
def test_gradcheck_transposed_kernels(kernel) -> None:
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([[0, 0, 1, 2, 3, 3, 4], [1, 3, 0, 2, 1, 3, 0]], dtype=torch.int32)
    topo = Topology(idx, (5, 4))
    xt = torch.randn(4, 3, dtype=DT, generator=g, requires_grad=True)
    v = torch.randn(7, dtype=DT, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=DT, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: kernel(a, c, d, topo), (xt, v, b))


def test_gradcheck_dense_kernel() -> None:
    g = torch.Generator().manual_seed(0)
    topo = Topology(torch.tensor([[0, 1, 1, 2], [2, 0, 1, 2]], dtype=torch.int32), (3, 3))
    x = torch.randn(2, 3, dtype=DT, generator=g, requires_grad=True)
    v = torch.randn(4, dtype=DT, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: dense_linear(a, c, None, topo), (x, v))


def test_hand_computed_case() -> None:
    # W = [[2, 0], [0, -1], [3, 1]] with bias [1, 0, 0]; x = [1, 2]  ->  y = [3, -2, 5]
    layer = SparseLinear(2, 3, torch.tensor([[2, 0, 1, 2], [0, 0, 1, 1]]), torch.tensor([3.0, 2.0, -1.0, 1.0]),
                         backend="csr")
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    assert layer.indices.tolist() == [[0, 1, 2, 2], [0, 1, 0, 1]]  # sorted row-major, values follow
    assert layer.values.tolist() == [2.0, -1.0, 3.0, 1.0]
    assert layer(torch.tensor([[1.0, 2.0]])).tolist() == [[3.0, -2.0, 5.0]]


def test_from_dense_round_trip_and_queries() -> None:
    layer, lin, mask = _layer(12, 10, 0.25, seed=4)
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(layer.to_dense_weight(), lin.weight.detach() * mask)
    assert torch.equal(layer.bias.detach(), lin.bias.detach())
    assert layer.nnz() == int(mask.sum())
    assert layer.density == pytest.approx(int(mask.sum()) / 120)
    assert layer.indices.dtype == torch.int32 and layer.indices.shape == (2, layer.nnz())
    keys = layer.indices[0].long() * 10 + layer.indices[1].long()
    assert bool((keys[1:] > keys[:-1]).all())
    back = nn.Linear(10, 12).to(DT)
    with torch.no_grad():
        back.weight.copy_(layer.to_dense_weight())
    assert torch.equal(SparseLinear.from_dense(back, mask).values, layer.values)


def test_errors_name_the_problem() -> None:
    lin = nn.Linear(5, 4)
    with pytest.raises(ShapeError, match=r"mask shape \(5, 4\).*\(4, 5\)"):
        SparseLinear.from_dense(lin, torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="density 0"):
        SparseLinear.from_dense(lin, torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ShapeError, match="out of range"):
        SparseLinear(5, 4, torch.tensor([[0, 4], [1, 1]]))
    with pytest.raises(ShapeError, match="out of range"):
        SparseLinear(5, 4, torch.tensor([[0, -1], [1, 1]]))
    with pytest.raises(ShapeError, match="duplicate link"):
        SparseLinear(5, 4, torch.tensor([[1, 0, 1], [2, 3, 2]]))
    with pytest.raises(ShapeError, match=r"\(2, nnz\)"):
        SparseLinear(5, 4, torch.tensor([0, 1]))
    with pytest.raises(ShapeError, match=r"values must have shape \(2,\)"):
        SparseLinear(5, 4, torch.tensor([[0, 1], [1, 1]]), torch.ones(3))
    with pytest.raises(ConfigError, match='Did you mean "csr"'):
        SparseLinear(5, 4, torch.tensor([[0], [1]]), backend="csx")
    with pytest.raises(ConfigError, match="no CPU kernels for torch.bfloat16"):
        SparseLinear(5, 4, torch.tensor([[0], [1]]), backend="csr", dtype=torch.bfloat16).resolved_backend()
    layer = SparseLinear(5, 4, torch.tensor([[0], [1]]))
    with pytest.raises(ShapeError, match="expected 5"):
        layer(torch.ones(2, 6))


def test_auto_backend_by_density_device_dtype() -> None:
    cpu = torch.device("cpu")
    # CPU float32: edgetune's native kernels when they could be built (test_native_kernels.py), else csr
    assert choose_backend(0.01, cpu, torch.float32) == ("native" if native.load() else "csr")
    assert choose_backend(0.01, cpu, torch.float64) == "csr"
    assert choose_backend(0.5, cpu, torch.float32) == "dense"
    assert choose_backend(0.01, cpu, torch.bfloat16) == "gather"
    half = SparseLinear(30, 20, torch.tensor([[0, 5, 19], [3, 2, 29]]), dtype=torch.bfloat16)
    x = torch.randn(4, 30, dtype=torch.bfloat16, requires_grad=True)
    half(x).float().sum().backward()  # the gather kernels run in bfloat16
    assert half.resolved_backend() == "gather" and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.values.grad, x.detach().sum(0)[[3, 2, 29]])
    assert choose_backend(0.01, torch.device("cuda"), torch.float32) == "csr"
    assert _layer(20, 20, 0.02, 0)[0].resolved_backend() == "csr"
    assert _layer(20, 20, 0.9, 0)[0].resolved_backend() == "dense"


def test_set_topology_keeps_parameter_and_invalidates_cache() -> None:
    layer, _, _ = _layer(8, 6, 0.3, seed=5, backend="csr")
    param = layer.values
    x = torch.randn(3, 6, dtype=DT)
    layer(x).sum().backward()  # builds the caches and a grad
    new_idx = torch.tensor([[7, 0, 3, 3, 5], [5, 2, 0, 4, 1]])
    new_val = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=DT)
    old = layer.set_topology(new_idx, new_val)
    assert layer.values is param and param.grad is None and old.shape[0] == 2
    assert layer.indices.tolist() == [[0, 3, 3, 5, 7], [2, 0, 4, 1, 5]]
    assert layer.values.tolist() == [2.0, 3.0, 4.0, 5.0, 1.0]
    w = torch.zeros(8, 6, dtype=DT)
    w[new_idx[0], new_idx[1]] = new_val
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias.detach()), atol=1e-12, rtol=0)
    # a same-count change through the buffer in place also refreshes the cached CSR
    with torch.no_grad():
        layer.indices[1, 0] = 3  # (0, 2) -> (0, 3): still sorted
    w2 = torch.zeros(8, 6, dtype=DT)
    w2[layer.indices[0].long(), layer.indices[1].long()] = layer.values.detach()
    torch.testing.assert_close(layer(x), F.linear(x, w2, layer.bias.detach()), atol=1e-12, rtol=0)


def test_gather_values() -> None:
    layer = SparseLinear(4, 3, torch.tensor([[0, 1, 2], [1, 3, 0]]), torch.tensor([1.0, 2.0, 3.0]))
    got = layer.gather_values(torch.tensor([[2, 0, 1, 1], [0, 0, 3, 2]]))
    assert got.tolist() == [3.0, 0.0, 2.0, 0.0]


def _adam_pair(seed: int) -> tuple:
    layer, lin, mask = _layer(10, 8, 0.35, seed=seed, backend="csr")
    ref_w = (lin.weight.detach() * mask).clone().requires_grad_()
    opt = torch.optim.Adam([layer.values], lr=0.05)
    ref_opt = torch.optim.Adam([ref_w], lr=0.05)
    return layer, mask, ref_w, opt, ref_opt


def _train(layer, mask, ref_w, opt, ref_opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 8, dtype=DT, generator=g)
        t = torch.randn(6, 10, dtype=DT, generator=g)
        opt.zero_grad()
        ref_opt.zero_grad()
        ((layer(x) - t) ** 2).sum().backward()
        ((F.linear(x, ref_w, layer.bias.detach()) - t) ** 2).sum().backward()
        ref_w.grad.mul_(mask)  # masked-dense DST reference: no gradient off the links
        opt.step()
        ref_opt.step()


@pytest.mark.parametrize("change", ["same_count", "grow", "shrink"])
def test_remap_adam_state_matches_masked_dense_training(change: str) -> None:
    layer, mask, ref_w, opt, ref_opt = _adam_pair(seed=6)
    _train(layer, mask, ref_w, opt, ref_opt, steps=3, seed=0)
    torch.testing.assert_close(layer.values.detach(), ref_w.detach()[mask], atol=1e-10, rtol=0)

    # new topology: drop every third link, add links at random free positions
    g = torch.Generator().manual_seed(7)
    keep = mask.clone()
    on = mask.nonzero()
    keep[on[::3, 0], on[::3, 1]] = False
    free = (~mask).nonzero()
    n_add = {"same_count": int(mask.sum() - keep.sum()), "grow": 12, "shrink": 2}[change]
    add = free[torch.randperm(len(free), generator=g)[:n_add]]
    new_mask = keep.clone()
    new_mask[add[:, 0], add[:, 1]] = True
    new_idx = new_mask.nonzero().t()
    new_vals = layer.gather_values(new_idx)  # survivors keep their weight, new links start at 0

    before = {k: v.clone() for k, v in opt.state[layer.values].items()}
    old_mask = layer.mask()
    layer.set_topology(new_idx, new_vals, optimizer=opt)
    state = opt.state[layer.values]
    assert state["exp_avg"].shape == (layer.nnz(),) == (int(new_mask.sum()),)
    dense_before = torch.zeros(10, 8, dtype=DT)
    for name in ("exp_avg", "exp_avg_sq"):
        dense_before[old_mask] = before[name]
        expected = torch.where(keep[new_mask], dense_before[new_mask], torch.zeros((), dtype=DT))
        torch.testing.assert_close(state[name], expected, atol=0, rtol=0)
    assert int(state["step"]) == int(before["step"])

    # the dense reference does the same update: new weights and moments zero off/at new links
    with torch.no_grad():
        ref_w.mul_(keep)
        for name in ("exp_avg", "exp_avg_sq"):
            ref_opt.state[ref_w][name].mul_(keep)
    _train(layer, new_mask, ref_w, opt, ref_opt, steps=3, seed=1)
    torch.testing.assert_close(layer.values.detach(), ref_w.detach()[new_mask], atol=1e-10, rtol=0)
    assert not bool(ref_w.detach()[~new_mask].any())


def test_remap_sgd_momentum_and_noop_path() -> None:
    layer, _, _ = _layer(6, 5, 0.5, seed=8, backend="gather")
    opt = torch.optim.SGD([layer.values], lr=0.1, momentum=0.9)
    layer(torch.randn(4, 5, dtype=DT)).sum().backward()
    opt.step()
    buf = opt.state[layer.values]["momentum_buffer"]
    saved = buf.clone()
    remap_optimizer_state(opt, layer.values, layer.indices, layer.indices.clone())  # no change
    assert opt.state[layer.values]["momentum_buffer"] is buf and torch.equal(buf, saved)

    old_idx = layer.indices.clone()
    free = (~layer.mask()).nonzero()[:2].t().to(old_idx.dtype)  # two new links, first old one dropped
    layer.set_topology(torch.cat([old_idx[:, 1:], free], 1), torch.zeros(old_idx.shape[1] + 1, dtype=DT),
                       optimizer=opt)
    before = torch.zeros(6, 5, dtype=DT)
    before[old_idx[0].long(), old_idx[1].long()] = saved
    before[old_idx[0, 0].long(), old_idx[1, 0].long()] = 0.0  # dropped
    mom = opt.state[layer.values]["momentum_buffer"]
    assert mom.shape == (old_idx.shape[1] + 1,)
    torch.testing.assert_close(mom, before[layer.mask()], atol=0, rtol=0)  # new links: 0
    opt.zero_grad()
    layer(torch.randn(4, 5, dtype=DT)).sum().backward()
    opt.step()  # the optimizer keeps working on the resized parameter


def test_state_dict_round_trip_with_other_nnz() -> None:
    a, _, _ = _layer(9, 7, 0.3, seed=9)
    b, _, _ = _layer(9, 7, 0.7, seed=10)
    assert a.nnz() != b.nnz()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.indices, a.indices) and torch.equal(b.values, a.values)
    x = torch.randn(2, 7, dtype=DT)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


def test_train_step_rows_smoke() -> None:
    from edgetune.sparse.bench.train_speed import train_step_rows

    rows = train_step_rows(0.05, widths=(64, 64), batch=8, repeats=2, warmup=1, in_features=32, threads=None)
    dense, sparse = rows
    assert (dense["model"], sparse["model"]) == ("dense", "sparse")
    assert sparse["backend"] == ("native" if native.load() else "csr") and dense["speedup"] == 1.0
    assert sparse["fused_relu"] and not dense["fused_relu"]
    # hidden links: 5% of 32*64 + 64*64; head 64*10 and biases stay dense
    n_dense = 32 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    n_sparse = round(0.05 * 32 * 64) + round(0.05 * 64 * 64) + 64 + 64 + 64 * 10 + 10
    assert dense["param_bytes"] == 4 * n_dense and sparse["param_bytes"] == 4 * n_sparse
    assert sparse["state_bytes"] == 4 * (4 * n_sparse) + 6 * 4  # params, grads, 2 moments; 6 Adam steps
    assert sparse["memory_ratio"] < 0.5 and sparse["step_ms"] > 0
    assert sparse["block"] == 5 and not sparse["fused_adam"]
    fused = train_step_rows(0.05, widths=(64, 64), batch=8, repeats=1, warmup=1, in_features=32, threads=None,
                            block=2, fused_adam=True)
    assert all(r["fused_adam"] for r in fused) and fused[1]["block"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_backends_match_cpu(backend: str) -> None:
    layer, _, _ = _layer(40, 30, 0.05, seed=11, backend=backend, transposed_output=True)
    x = torch.randn(2, 5, 30, dtype=DT, requires_grad=True)
    y_cpu = layer(x)
    y_cpu.square().sum().backward()
    grad_values = layer.values.grad.clone()
    layer.values.grad = None
    layer.bias.grad = None
    layer.to("cuda")
    xc = x.detach().cuda().requires_grad_()
    y = layer(xc)
    y.square().sum().backward()
    torch.testing.assert_close(y.cpu(), y_cpu.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(xc.grad.cpu(), x.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.values.grad.cpu(), grad_values, atol=1e-10, rtol=0)
