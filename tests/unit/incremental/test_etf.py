"""Simplex ETF: exact geometry for d >= K-1 (d == K-1 included), seeding, near-ETF for d < K-1, errors."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.etf import (
    etf_geometry_error,
    ideal_etf_gram,
    max_coherence,
    near_etf,
    simplex_etf,
)


def _naive_gram_error(m: torch.Tensor) -> float:
    """Loop over every pair: |<m_i, m_j> - (1 if i == j else -1/(K-1))|, the largest."""
    k = m.shape[0]
    worst = 0.0
    for i in range(k):
        for j in range(k):
            want = 1.0 if i == j else -1.0 / (k - 1)
            worst = max(worst, abs(float(torch.dot(m[i], m[j])) - want))
    return worst


def _naive_max_cos(m: torch.Tensor) -> float:
    k = m.shape[0]
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    return max(float(torch.dot(m[i], m[j]) / (m[i].norm() * m[j].norm())) for i, j in pairs)


@pytest.mark.parametrize(
    "k,d", [(2, 1), (2, 7), (5, 4), (5, 5), (5, 16), (60, 59), (60, 64), (100, 99), (100, 128)]
)
def test_exact_geometry(k: int, d: int) -> None:
    m = simplex_etf(k, d, seed=3)
    assert m.shape == (k, d) and m.dtype == torch.float64
    torch.testing.assert_close(m.norm(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.sum(dim=0), torch.zeros(d, dtype=torch.float64), atol=1e-6, rtol=0)
    assert etf_geometry_error(m) < 1e-6
    assert max_coherence(m) == pytest.approx(-1.0 / (k - 1), abs=1e-6)
    if k <= 5:  # the loop reference on the small ones
        assert _naive_gram_error(m) < 1e-6
    assert torch.linalg.matrix_rank(m).item() == k - 1  # a simplex spans K-1 dimensions


def test_hand_computed_cases() -> None:
    pair = simplex_etf(2, 3, seed=0)
    torch.testing.assert_close(pair[0], -pair[1])  # K=2: antipodal
    assert float(pair[0].norm()) == pytest.approx(1.0)
    one = simplex_etf(1, 4, seed=0)
    assert one.shape == (1, 4) and float(one.norm()) == pytest.approx(1.0)
    assert etf_geometry_error(one) == pytest.approx(0.0, abs=1e-12) and max_coherence(one) == -math.inf
    # d == K-1 == 2: an equilateral triangle in the plane, 120 degrees apart
    tri = simplex_etf(3, 2, seed=5)
    angles = sorted(math.degrees(math.atan2(float(v[1]), float(v[0]))) % 360 for v in tri)
    gaps = [angles[1] - angles[0], angles[2] - angles[1], 360 - angles[2] + angles[0]]
    assert gaps == pytest.approx([120.0, 120.0, 120.0], abs=1e-6)
    gram = ideal_etf_gram(3)
    torch.testing.assert_close(gram, torch.tensor([[1, -0.5, -0.5], [-0.5, 1, -0.5], [-0.5, -0.5, 1]],
                                                  dtype=torch.float64))


def test_geometry_error_and_coherence_match_loops() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert etf_geometry_error(m) == pytest.approx(_naive_gram_error(m), abs=1e-12)
    assert max_coherence(m) == pytest.approx(_naive_max_cos(m), abs=1e-12)
    broken = simplex_etf(5, 8).clone()
    broken[0] *= 1.01  # one norm off by 1 %: the diagonal error shows it
    assert etf_geometry_error(broken) == pytest.approx(1.01**2 - 1, abs=1e-9)


def test_seeded_determinism_and_dtype() -> None:
    a, b, c = simplex_etf(10, 12, seed=1), simplex_etf(10, 12, seed=1), simplex_etf(10, 12, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    f32 = simplex_etf(10, 12, seed=1, dtype=torch.float32)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), a, atol=1e-7)
    assert etf_geometry_error(f32) < 1e-6
    # different seeds are different frames with the same geometry
    assert etf_geometry_error(c) < 1e-6


@pytest.mark.parametrize("k,d", [(10, 6), (60, 16), (20, 3)])
def test_near_etf_beats_a_random_draw_and_warns(k: int, d: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgetune.incremental.etf"):
        m = simplex_etf(k, d, seed=0)
    assert any(f"needs dim >= K-1 = {k - 1}" in r.getMessage() and f"dim={d}" in r.getMessage()
               for r in caplog.records), caplog.text
    assert m.shape == (k, d)
    torch.testing.assert_close(m.norm(dim=1), torch.ones(k, dtype=torch.float64))
    got = max_coherence(m)
    g = torch.Generator().manual_seed(0)
    naive = [max_coherence(torch.randn(k, d, generator=g, dtype=torch.float64)) for _ in range(20)]
    assert got < min(naive) - 0.2, (got, min(naive))
    assert got >= -1e-9  # Rankin: K > d + 1 unit vectors always have a pair with cosine >= 0
    if k <= 2 * d:
        assert got < 0.01  # an orthoplex subset reaches 0; the optimizer gets close
    m2, reported = near_etf(k, d, seed=0)
    assert torch.equal(m2, m) and reported == pytest.approx(got, abs=1e-12)


def test_near_etf_known_optima() -> None:
    """Tammes-problem values: 5 points on a circle (regular pentagon) and 10 points on the 2-sphere."""
    _, pentagon = near_etf(5, 2, seed=0)
    assert pentagon == pytest.approx(math.cos(math.radians(72)), abs=1e-4)
    _, ten = near_etf(10, 3, seed=0)
    assert ten == pytest.approx(math.cos(math.radians(66.1468)), abs=5e-3)


def test_no_warning_when_exact(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgetune.incremental.etf"):
        simplex_etf(8, 7)
    assert not caplog.records


def test_near_etf_runs_under_no_grad_and_inference_mode() -> None:
    ref = near_etf(6, 3, seed=0, steps=50)
    with torch.no_grad():
        a = near_etf(6, 3, seed=0, steps=50)
    with torch.inference_mode():
        b = near_etf(6, 3, seed=0, steps=50)
    assert torch.equal(a[0], ref[0]) and torch.equal(b[0], ref[0]) and a[1] == b[1] == ref[1]


def test_errors() -> None:
    with pytest.raises(ConfigError, match="num_classes.*got 0"):
        simplex_etf(0, 4)
    with pytest.raises(ConfigError, match="dim.*got -1"):
        simplex_etf(3, -1)
    with pytest.raises(ConfigError, match="steps"):
        near_etf(5, 2, steps=0)
    with pytest.raises(ShapeError, match=r"\(K, d\).*\(4,\)"):
        etf_geometry_error(torch.ones(4))
    with pytest.raises(ShapeError, match=r"\(K, d\)"):
        max_coherence(torch.ones(2, 3, 4))
