"""Initial topologies (exact counts, hand-built lattices, sampling laws) and sparse weight init (SWI)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgetune.core.errors import ConfigError
from edgetune.sparse.init import degree_scaled_init, kaiming_active_init, sparse_weight_init, swi_std
from edgetune.sparse.topology import (
    bipartite_receptive_field,
    bipartite_small_world,
    correlated_sparse_topology,
    erdos_renyi,
    input_correlation,
    link_count,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _csti(o: int, i: int, d: float, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(64, i, generator=gen(99))
    return correlated_sparse_topology(x, o, d, g)


BUILDERS = {
    "er": lambda o, i, d, g: erdos_renyi(o, i, d, g),
    "bsw0": lambda o, i, d, g: bipartite_small_world(o, i, d, 0.0, g),
    "bsw25": lambda o, i, d, g: bipartite_small_world(o, i, d, 0.25, g),
    "brf0": lambda o, i, d, g: bipartite_receptive_field(o, i, d, 0.0, g),
    "brf3": lambda o, i, d, g: bipartite_receptive_field(o, i, d, 0.3, g),
    "brf3bal": lambda o, i, d, g: bipartite_receptive_field(o, i, d, 0.3, g, degree_dist="balanced"),
    "csti": _csti,
    "csti_soft": lambda o, i, d, g: correlated_sparse_topology(
        torch.randn(64, i, generator=gen(5)), o, d, g, soft=True
    ),
}
SHAPES = [(16, 16, 0.2), (40, 12, 0.1), (12, 40, 0.15), (33, 7, 0.5), (9, 9, 1.0)]


# ------------------------------------------------------------------------------------------ link counts


def test_link_count_rounds_half_up() -> None:
    assert link_count(10, 10, 0.1) == 10
    assert link_count(10, 10, 0.105) == 11  # 10.5 -> 11
    assert link_count(7, 3, 1.0) == 21


def test_layer_too_small_names_shape_density_and_minimum() -> None:
    with pytest.raises(ConfigError) as err:
        link_count(100, 10, 0.05)  # 50 links < 100 neurons
    msg = str(err.value)
    assert (
        "fewer links than neurons" in msg and "(100, 10)" in msg and "0.05" in msg and "density >= 0.1" in msg
    )
    for builder in BUILDERS.values():
        with pytest.raises(ConfigError, match="fewer links than neurons"):
            builder(100, 10, 0.05, gen(0))


@pytest.mark.parametrize("bad", [0.0, 1.2, -0.5, float("nan")])
def test_bad_density_rejected(bad: float) -> None:
    with pytest.raises(ConfigError, match="density"):
        erdos_renyi(8, 8, bad, gen(0))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("o, i, d", SHAPES)
def test_exact_count_shape_dtype_determinism(name: str, o: int, i: int, d: float) -> None:
    build = BUILDERS[name]
    m = build(o, i, d, gen(1))
    assert m.dtype == torch.bool and m.shape == (o, i)
    assert int(m.sum()) == link_count(o, i, d)
    assert torch.equal(m, build(o, i, d, gen(1)))
    if d < 1.0 and name not in ("bsw0", "csti"):  # the pure lattice / hard CSTI are (nearly) seed-free
        assert any(not torch.equal(m, build(o, i, d, gen(s))) for s in range(2, 6))


def test_erdos_renyi_is_uniform_per_entry() -> None:
    freq = torch.stack([erdos_renyi(6, 5, 0.4, gen(s)) for s in range(3000)]).double().mean(0)
    assert float((freq - 0.4).abs().max()) < 0.04  # binomial sd ≈ 0.009


# ------------------------------------------------------------------------------------------------- BSW


def test_bsw_lattice_hand_cases() -> None:
    # 4x4 at density 1/2: every node has degree 2, window centred at j -> {j, j+1} (mod 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for j in range(4):
        expected[j, j] = expected[j, (j + 1) % 4] = True
    assert torch.equal(bipartite_small_world(4, 4, 0.5, 0.0, gen(0)), expected)
    # 6x3 at density 1/3: degree 1, centre j·3/6 rounded half up -> columns 0,1,1,2,2,0
    m = bipartite_small_world(6, 3, 1 / 3, 0.0, gen(0))
    assert m.int().argmax(dim=1).tolist() == [0, 1, 1, 2, 2, 0]
    # the other orientation is the transpose (the larger side is always the one with the windows)
    assert torch.equal(bipartite_small_world(3, 6, 1 / 3, 0.0, gen(0)), m.t())


def test_bsw_rewiring_fraction_follows_beta() -> None:
    lattice = bipartite_small_world(64, 64, 0.1, 0.0, gen(0))
    n = int(lattice.sum())
    kept = [
        int((bipartite_small_world(64, 64, 0.1, beta, gen(3)) & lattice).sum()) / n for beta in (0.25, 1.0)
    ]
    assert 0.68 < kept[0] < 0.83  # ≈ 1 − β (+ a few regrown onto lattice spots)
    assert kept[1] < 0.2  # β = 1: an ER graph, overlap ≈ density
    degree = lattice.sum(dim=1)
    assert int(degree.max() - degree.min()) <= 1


# ------------------------------------------------------------------------------------------------- BRF


def test_brf_nearest_window_hand_case() -> None:
    # (4, 8) at density 3/8: the 4 output rows are the smaller side, centres 0,2,4,6 on the 8-ring,
    # balanced degree 3 and r = 0 -> exactly the window {c−1, c, c+1}.
    m = bipartite_receptive_field(4, 8, 3 / 8, 0.0, gen(0), degree_dist="balanced")
    expected = torch.zeros(4, 8, dtype=torch.bool)
    for a in range(4):
        for dc in (-1, 0, 1):
            expected[a, (2 * a + dc) % 8] = True
    assert torch.equal(m, expected)
    # degree 2: centre plus one of its two neighbours at ring distance 1
    m2 = bipartite_receptive_field(4, 8, 2 / 8, 0.0, gen(0), degree_dist="balanced")
    for a in range(4):
        cols = m2[a].nonzero().squeeze(1).tolist()
        assert 2 * a in cols and len(cols) == 2
        other = next(c for c in cols if c != 2 * a)
        assert min((other - 2 * a) % 8, (2 * a - other) % 8) == 1


def test_brf_distance_law_matches_reference() -> None:
    # square 256x256 (the inputs count as the smaller side) with one link per input column: the neighbour's ring distance d to the centre has
    # P(d) ∝ mult(d)·(1+d)^(−α), mult = 1 at d=0 and d=L/2, 2 otherwise; r=0.5 -> α=1.
    big, alpha = 256, 1.0
    d = np.arange(big // 2 + 1)
    mult = np.where((d == 0) | (d == big // 2), 1.0, 2.0)
    p = mult * (1.0 + d) ** (-alpha)
    p /= p.sum()
    dist = []
    centre = torch.arange(big)
    for s in range(20):
        m = bipartite_receptive_field(big, big, 1 / big, 0.5, gen(s), degree_dist="balanced")
        assert torch.all(m.sum(dim=0) == 1)
        row = m.int().argmax(dim=0)
        dd = (row - centre).abs()
        dist.append(torch.minimum(dd, big - dd))
    emp = torch.cat(dist).numpy()
    for cut in (0, 3, 20):
        assert abs((emp <= cut).mean() - p[: cut + 1].sum()) < 0.025  # 5120 draws: sd <= 0.007


def test_brf_r_controls_locality_and_degrees() -> None:
    def mean_dist(r: float) -> float:
        m = bipartite_receptive_field(64, 256, 0.05, r, gen(4))  # rows = smaller side
        a, j = m.nonzero(as_tuple=True)
        dd = (j - 4 * a).abs()
        return float(torch.minimum(dd, 256 - dd).double().mean())

    assert mean_dist(0.1) < 5.0
    assert 50.0 < mean_dist(1.0) < 78.0  # uniform on a 256-ring: mean distance ≈ 64
    m = bipartite_receptive_field(64, 256, 0.05, 0.3, gen(4), degree_dist="uniform")
    assert int(m.sum(dim=1).min()) >= 1
    bal = bipartite_receptive_field(64, 256, 0.05, 0.3, gen(4), degree_dist="balanced").sum(dim=1)
    assert int(bal.max() - bal.min()) <= 1


def test_bad_topology_parameters() -> None:
    with pytest.raises(ConfigError, match="beta"):
        bipartite_small_world(8, 8, 0.5, 1.5, gen(0))
    with pytest.raises(ConfigError, match="r "):
        bipartite_receptive_field(8, 8, 0.5, -0.1, gen(0))
    with pytest.raises(ConfigError, match="degree_dist"):
        bipartite_receptive_field(8, 8, 0.5, 0.3, gen(0), degree_dist="powerlaw")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ CSTI


def test_input_correlation_matches_numpy_and_handles_constant_features() -> None:
    x = torch.randn(50, 6, generator=gen(0))
    x[:, 3] = 2.0  # constant feature: correlation 0 instead of NaN
    c = input_correlation(x).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.corrcoef(x.double().numpy(), rowvar=False))
    np.testing.assert_allclose(c, ref, atol=1e-12)
    assert not np.isnan(c).any()


def test_csti_hand_case_picks_the_correlated_pair() -> None:
    f0 = torch.tensor([1.0, 2, 3, 4, 5, 6])
    # f1 = 2·f0 (corr 1), f2 alternates (|corr| with f0 and f1 = 3/sqrt(105) ≈ 0.29)
    x = torch.stack([f0, 2 * f0, torch.tensor([1.0, -1, 1, -1, 1, -1])], dim=1)
    m = correlated_sparse_topology(x, 6, 6 / 18, gen(0))  # out = 2·in: rows tiled, 6 links
    for a, k in [(0, 1), (1, 0), (3, 1), (4, 0)]:  # the |corr| = 1 entries of both tiles
        assert m[a, k]
    rest = m.clone()
    for a, k in [(0, 1), (1, 0), (3, 1), (4, 0)]:
        rest[a, k] = False
    a_idx, k_idx = rest.nonzero(as_tuple=True)
    assert len(a_idx) == 2
    assert all(int(a) % 3 == 2 or int(k) == 2 for a, k in zip(a_idx, k_idx))  # links touching f2
    assert not any(bool(m[a, a % 3]) for a in range(6))  # self-correlation excluded


# ------------------------------------------------------------------------------------------------- SWI


def test_swi_std_uses_fan_in_and_square_root() -> None:
    mask = erdos_renyi(128, 512, 0.1, gen(0))  # non-square: fan-in 512 != out_features 128
    w = sparse_weight_init(mask, gen(1))
    vals = w[mask]
    expected = math.sqrt(2.0 / (0.1 * 512))
    assert swi_std(512, 0.1) == pytest.approx(expected)
    assert float(vals.std()) == pytest.approx(expected, rel=0.03)  # 6554 draws: rel sd ≈ 0.9%
    assert abs(float(vals.mean())) < 3 * expected / math.sqrt(vals.numel())
    assert float(vals.std()) < 0.6 * math.sqrt(2.0 / (0.1 * 128))  # the official d·out_features bug: 2x off
    assert torch.all(w[~mask] == 0)
    assert torch.equal(w, sparse_weight_init(mask, gen(1)))


def test_kaiming_and_degree_scaled_init() -> None:
    mask = erdos_renyi(256, 200, 0.2, gen(0))
    k = kaiming_active_init(mask, gen(2))
    assert float(k[mask].std()) == pytest.approx(math.sqrt(2.0 / 200), rel=0.03)
    assert torch.all(k[~mask] == 0)
    d = degree_scaled_init(mask, gen(3))
    deg = mask.sum(dim=1, keepdim=True).double()
    z = (d.double() * deg.sqrt() / math.sqrt(2.0))[mask]  # standardised per row -> N(0, 1)
    assert float(z.std()) == pytest.approx(1.0, rel=0.03)
    assert torch.all(d[~mask] == 0)


def test_init_rejects_empty_mask() -> None:
    with pytest.raises(ConfigError, match="no active link"):
        sparse_weight_init(torch.zeros(3, 4, dtype=torch.bool), gen(0))
