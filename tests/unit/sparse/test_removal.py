"""Link-removal rules: exact counts, only active links, hand cases, naive references, sampling law."""

from __future__ import annotations

import itertools

import pytest
import torch

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.sparse.removal import (
    magnitude_removal,
    relative_importance,
    relative_importance_removal,
    removal_count,
    remove_lowest,
    remove_sampled,
    soft_magnitude_removal,
    soft_relative_importance_removal,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


RULES = {
    "magnitude": lambda w, m, k, g: magnitude_removal(w, m, k),
    "soft_magnitude": lambda w, m, k, g: soft_magnitude_removal(w, m, k, 2.0, g),
    "ri": lambda w, m, k, g: relative_importance_removal(w, m, k),
    "soft_ri": lambda w, m, k, g: soft_relative_importance_removal(w, m, k, 1.0, g),
}


def test_removal_count_floors() -> None:
    assert removal_count(10, 0.3) == 3
    assert removal_count(100, 0.29) == 29  # 0.29·100 = 28.999999999999996
    assert removal_count(7, 0.5) == 3
    assert removal_count(0, 0.3) == 0
    with pytest.raises(ConfigError, match="zeta"):
        removal_count(10, 1.5)


@pytest.mark.parametrize("name", sorted(RULES))
def test_exact_count_subset_of_active_and_deterministic(name: str) -> None:
    rule = RULES[name]
    for trial in range(5):
        w = torch.randn(23, 17, generator=gen(trial))
        m = torch.rand(23, 17, generator=gen(100 + trial)) < 0.3
        w[~m] = 0.0  # inactive entries hold the smallest magnitude: a rule that ignores the mask fails
        nnz = int(m.sum())
        for k in (0, 1, nnz // 3, nnz):
            removed = rule(w, m, k, gen(7))
            assert removed.dtype == torch.bool and removed.shape == m.shape
            assert int(removed.sum()) == k
            assert not bool((removed & ~m).any())
            assert torch.equal(removed, rule(w, m, k, gen(7)))
    if name.startswith("soft"):
        outs = {tuple(rule(w, m, nnz // 3, gen(s)).reshape(-1).tolist()) for s in range(5)}
        assert len(outs) > 1


def test_magnitude_removal_hand_case() -> None:
    w = torch.tensor([[0.5, -0.1, 2.0], [0.0, -3.0, 0.05]])
    m = torch.tensor([[True, True, True], [False, True, True]])
    # removed: |−0.1| and 0.05; (1,0) holds the smallest value but is inactive
    expected = torch.tensor([[False, True, False], [False, False, True]])
    assert torch.equal(magnitude_removal(w, m, 2), expected)


def test_relative_importance_hand_case_differs_from_magnitude() -> None:
    # (0,2) is the smallest weight but the only link of input 2 -> high relative importance.
    w = torch.tensor([[5.0, 6.0, 0.2], [5.0, 5.0, 9.0]])
    m = torch.tensor([[True, True, True], [True, True, False]])
    # row sums 11.2, 10; column sums 10, 11, 0.2
    expected = torch.tensor(
        [
            [5 / 11.2 + 5 / 10, 6 / 11.2 + 6 / 11, 0.2 / 11.2 + 1.0],
            [5 / 10 + 5 / 10, 5 / 10 + 5 / 11, 0.0],
        ]
    )
    torch.testing.assert_close(relative_importance(w, m), expected)
    assert relative_importance_removal(w, m, 1).nonzero().tolist() == [[0, 0]]
    assert magnitude_removal(w, m, 1).nonzero().tolist() == [[0, 2]]


def test_relative_importance_matches_naive_loops() -> None:
    w = torch.randn(9, 7, generator=gen(0), dtype=torch.float64)
    m = torch.rand(9, 7, generator=gen(1)) < 0.5
    m[3] = False  # an empty row: its strength is 0
    ref = torch.zeros_like(w)
    for a in range(9):
        for k in range(7):
            if not m[a, k]:
                continue
            row = sum(abs(float(w[a, j])) for j in range(7) if m[a, j])
            col = sum(abs(float(w[b, k])) for b in range(9) if m[b, k])
            ref[a, k] = abs(float(w[a, k])) / row + abs(float(w[a, k])) / col
    torch.testing.assert_close(relative_importance(w, m), ref)


def test_remove_lowest_matches_sorted_reference() -> None:
    s = torch.rand(30, 20, generator=gen(0))
    m = torch.rand(30, 20, generator=gen(1)) < 0.4
    active = sorted((float(s[a, k]), a, k) for a, k in m.nonzero().tolist())
    removed = remove_lowest(s, m, 17)
    assert {(a, k) for _, a, k in active[:17]} == {tuple(x) for x in removed.nonzero().tolist()}


def _plackett_luce_last(weights: list[float]) -> list[float]:
    """P(link j is the last one drawn) when drawing all links without replacement ∝ weight."""
    prob = [0.0] * len(weights)
    for order in itertools.permutations(range(len(weights))):
        p, left = 1.0, sum(weights)
        for j in order:
            p *= weights[j] / left
            left -= weights[j]
        prob[order[-1]] += p
    return prob


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_removal_law_matches_exact_reference(temperature: float) -> None:
    # keep 2 of 3 links ∝ |w|^T: the removed one is the last in Plackett–Luce order.
    # T=1, |w| = 1,2,3: P(remove) = 7/12, 4/15, 3/20 (removing ∝ |w| would give 1/6, 1/3, 1/2).
    w = torch.tensor([[1.0, -2.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    ref = _plackett_luce_last([1.0, 2.0**temperature, 3.0**temperature])
    if temperature == 1.0:
        assert ref == pytest.approx([7 / 12, 4 / 15, 3 / 20])
    g = gen(0)
    counts = torch.zeros(4)
    draws = 4000
    for _ in range(draws):
        counts += soft_magnitude_removal(w, m, 1, temperature, g)[0].float()
    assert counts[3] == 0
    freq = (counts[:3] / draws).tolist()
    assert freq == pytest.approx(ref, abs=0.025)  # binomial sd <= 0.008


def test_soft_removal_favours_small_weights_and_temperature_sharpens() -> None:
    w = torch.cat([torch.full((50,), 0.5), torch.full((50,), -1.0)]).view(10, 10)
    m = torch.ones(10, 10, dtype=torch.bool)
    small = torch.zeros(10, 10, dtype=torch.bool)
    small.view(-1)[:50] = True

    def small_share(temperature: float) -> float:
        g = gen(1)
        hits = sum(int((soft_magnitude_removal(w, m, 10, temperature, g) & small).sum()) for _ in range(100))
        return hits / (100 * 10)

    share1, share3, share0 = small_share(1.0), small_share(3.0), small_share(0.0)
    assert share1 > 0.75  # measured 0.855; a reversed rule (small weights kept) gives < 0.5
    assert share3 > 0.95 > share1  # higher T -> closer to hard magnitude removal
    assert 0.4 < share0 < 0.6  # T = 0: uniform


def test_soft_removal_with_all_zero_scores_is_uniform_not_nan() -> None:
    m = torch.ones(4, 5, dtype=torch.bool)
    freq = torch.zeros(4, 5)
    g = gen(3)
    for _ in range(1000):
        freq += remove_sampled(torch.zeros(4, 5), m, 2, 1.0, g).float()
    assert float((freq / 1000 - 0.1).abs().max()) < 0.04


def test_soft_removal_beyond_multinomial_limit() -> None:
    n = 4100  # 16.81M active links > 2^24: torch.multinomial refuses this many categories
    w = torch.randn(n, n, generator=gen(0))
    m = torch.ones(n, n, dtype=torch.bool)
    assert int(m.sum()) > 2**24
    removed = soft_magnitude_removal(w, m, 1000, 3.0, gen(1))
    assert int(removed.sum()) == 1000
    assert float(w[removed].abs().mean()) < 0.5 * float(w.abs().mean())


def test_bad_arguments() -> None:
    w = torch.randn(3, 4)
    m = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ConfigError, match="nnz=12"):
        magnitude_removal(w, m, 13)
    with pytest.raises(ConfigError, match="k "):
        magnitude_removal(w, m, -1)
    with pytest.raises(ShapeError, match="does not match"):
        magnitude_removal(w, m[:, :3], 1)
    with pytest.raises(ShapeError, match="bool"):
        magnitude_removal(w, m.float(), 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="temperature"):
        soft_magnitude_removal(w, m, 1, -1.0, gen(0))
    with pytest.raises(ConfigError, match=">= 0"):
        remove_sampled(-w.abs() - 1, m, 1, 1.0, gen(0))
