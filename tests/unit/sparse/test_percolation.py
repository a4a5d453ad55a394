"""Percolation (dead-neuron removal) on hand-built chains and against a naive loop reference."""

from __future__ import annotations

import pytest
import torch

from edgetune.core.errors import ShapeError
from edgetune.sparse.percolation import percolate


def mask(shape: tuple[int, int], links: list[tuple[int, int]]) -> torch.Tensor:
    """Bool mask (out, in) with the given (out, in) links."""
    m = torch.zeros(shape, dtype=torch.bool)
    for a, k in links:
        m[a, k] = True
    return m


def test_backward_cascade_hand_case() -> None:
    # 3 inputs -> A (3) -> B (3) -> 2 outputs.
    m0 = mask((3, 3), [(0, 0), (1, 1), (2, 2)])  # A_a <- in_a
    m1 = mask((3, 3), [(0, 0), (1, 1), (2, 0)])  # B0 <- A0, B1 <- A1, B2 <- A0   (A2 has no outgoing)
    m2 = mask((2, 3), [(0, 0), (1, 0), (1, 2)])  # out0 <- B0, out1 <- B0, B2   (B1 has no outgoing)
    res = percolate([m0, m1, m2])
    # B1 dead -> B1<-A1 cut -> A1 loses its only outgoing link -> A1<-in1 cut (second round).
    # A2 dead (no outgoing) -> A2<-in2 cut.
    assert torch.equal(res.masks[0], mask((3, 3), [(0, 0)]))
    assert torch.equal(res.masks[1], mask((3, 3), [(0, 0), (2, 0)]))
    assert torch.equal(res.masks[2], m2)
    assert res.removed == [2, 1, 0]
    assert res.active_fraction == pytest.approx([1 / 3, 2 / 3])


def test_forward_cascade_hand_case() -> None:
    m0 = mask((3, 3), [(0, 0), (2, 2)])  # A1 has no incoming link
    m1 = mask((3, 3), [(0, 1), (1, 0), (2, 2)])  # B0 <- A1 only, B1 <- A0, B2 <- A2
    m2 = mask((2, 3), [(0, 0), (0, 1), (1, 2)])  # out0 <- B0, B1; out1 <- B2
    res = percolate([m0, m1, m2])
    # A1 dead -> B0<-A1 cut -> B0 has no incoming -> out0<-B0 cut.
    assert torch.equal(res.masks[0], m0)
    assert torch.equal(res.masks[1], mask((3, 3), [(1, 0), (2, 2)]))
    assert torch.equal(res.masks[2], mask((2, 3), [(0, 1), (1, 2)]))
    assert res.removed == [0, 1, 1]
    assert res.active_fraction == pytest.approx([2 / 3, 2 / 3])


def _naive_percolate(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """One dead neuron at a time, with Python loops, until nothing changes."""
    ms = [m.clone() for m in masks]
    changed = True
    while changed:
        changed = False
        for h in range(len(ms) - 1):
            for n in range(ms[h].shape[0]):
                has_in = any(bool(ms[h][n, k]) for k in range(ms[h].shape[1]))
                has_out = any(bool(ms[h + 1][b, n]) for b in range(ms[h + 1].shape[0]))
                if not (has_in and has_out) and (has_in or has_out):
                    ms[h][n, :] = False
                    ms[h + 1][:, n] = False
                    changed = True
    return ms


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_reference_and_invariants(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dims = [12, 9, 10, 8, 5]
    masks = [torch.rand(dims[i + 1], dims[i], generator=g) < 0.12 for i in range(len(dims) - 1)]
    originals = [m.clone() for m in masks]
    res = percolate(masks)
    for got, ref in zip(res.masks, _naive_percolate(masks)):
        assert torch.equal(got, ref)
    for m, orig in zip(masks, originals):
        assert torch.equal(m, orig)  # inputs untouched
    for new, old, removed in zip(res.masks, originals, res.removed):
        assert not bool((new & ~old).any())
        assert removed == int(old.sum()) - int(new.sum())
    for h in range(len(dims) - 2):  # every hidden neuron has both kinds of links or none
        has_in, has_out = res.masks[h].any(dim=1), res.masks[h + 1].any(dim=0)
        assert torch.equal(has_in, has_out)
        assert res.active_fraction[h] == pytest.approx(float(has_in.float().mean()))
    again = percolate(res.masks)  # fixed point: idempotent
    assert again.removed == [0] * len(masks)


def test_single_layer_and_fully_connected_chain_are_untouched() -> None:
    m = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.3
    res = percolate([m])
    assert torch.equal(res.masks[0], m) and res.removed == [0] and res.active_fraction == []
    full = [torch.ones(5, 4, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool)]
    res = percolate(full)
    assert res.removed == [0, 0] and res.active_fraction == [1.0]


def test_chain_validation() -> None:
    with pytest.raises(ShapeError, match="do not form a chain"):
        percolate([torch.ones(5, 4, dtype=torch.bool), torch.ones(3, 6, dtype=torch.bool)])
    with pytest.raises(ShapeError, match="bool"):
        percolate([torch.ones(5, 4)])
    with pytest.raises(ShapeError, match="empty"):
        percolate([])


def _official_chain_removal(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The official CHT scheduler's order: one backward sweep (rows without outgoing links, last hidden
    layer first), then one forward sweep (columns without incoming links, first layer first)."""
    ms = [m.clone() for m in masks]
    for i in reversed(range(len(ms) - 1)):
        ms[i] = ms[i] & ms[i + 1].any(dim=0)[:, None]
    for i in range(1, len(ms)):
        ms[i] = ms[i] & ms[i - 1].any(dim=1)[None, :]
    return ms


@pytest.mark.parametrize("seed", range(4))
def test_fixed_point_equals_one_backward_and_one_forward_sweep(seed: int) -> None:
    # edgetune iterates to a fixed point; the official code sweeps once each way. They must agree, so
    # percolation timing is not a difference between the two.
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        depth = int(torch.randint(2, 6, (1,), generator=g))
        dims = torch.randint(2, 14, (depth + 1,), generator=g).tolist()
        p = float(torch.rand(1, generator=g)) * 0.4 + 0.02
        masks = [torch.rand(dims[i + 1], dims[i], generator=g) < p for i in range(depth)]
        for got, ref in zip(percolate(masks).masks, _official_chain_removal(masks)):
            assert torch.equal(got, ref)
