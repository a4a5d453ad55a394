"""Exact CH3-L3 / CH2-L3 by sparse products (predictors_paths) against brute force and the grouped algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from edgetune.core.errors import ConfigError
from edgetune.sparse import predictors_paths as paths
from edgetune.sparse.predictors import link_scores
from edgetune.sparse.predictors_exact import choose_algorithm, path_scores
from edgetune.testing.reference_predictors import reference_path_scores

EXACT = {"rtol": 1e-12, "atol": 1e-12}
MODELS = ["ch3", "ch2"]


def random_mask(n_out: int, n_in: int, density: float, seed: int) -> torch.Tensor:
    """Seeded Erdős-Rényi bipartite mask with exactly round(density * n_out * n_in) links."""
    g = torch.Generator().manual_seed(seed)
    nnz = round(density * n_out * n_in)
    mask = torch.zeros(n_out * n_in, dtype=torch.bool)
    mask[torch.randperm(n_out * n_in, generator=g)[:nnz]] = True
    return mask.view(n_out, n_in)


def sparse(mask: torch.Tensor, model: str, **kw: object) -> torch.Tensor:
    return path_scores(mask, model, dtype=torch.float64, algorithm="sparse", **kw)  # type: ignore[arg-type]


# tiny masks, from ultra-sparse (many isolated nodes) to dense enough that most pairs have 2+ common
# neighbours (every correction term active), square and rectangular both ways
TINY = [
    (20, 20, 0.08, 1),
    (30, 25, 0.12, 2),
    (15, 40, 0.2, 3),
    (40, 12, 0.3, 4),
    (18, 18, 0.5, 5),
    (12, 16, 0.75, 6),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shape", TINY, ids=lambda s: f"{s[0]}x{s[1]}@{s[2]}")
def test_sparse_algorithm_equals_brute_force(model: str, shape: tuple[int, int, float, int]) -> None:
    mask = random_mask(*shape)
    expected = reference_path_scores(mask, model)
    assert expected.abs().sum() > 0  # there are candidates with paths: the check is not vacuous
    torch.testing.assert_close(sparse(mask, model), expected, **EXACT)


@pytest.mark.parametrize("model", MODELS)
def test_empty_rows_and_columns_and_degree_one_nodes(model: str) -> None:
    mask = random_mask(25, 30, 0.2, 7)
    mask[[0, 4, 9], :] = False  # isolated outputs
    mask[:, [1, 2, 20]] = False  # isolated inputs
    mask[5, :] = False
    mask[5, 3] = True  # an output of degree 1 (its factor 1/sqrt(deg - 1) has a zero denominator)
    mask[:, 7] = False
    mask[11, 7] = True  # an input of degree 1
    scores = sparse(mask, model)
    torch.testing.assert_close(scores, reference_path_scores(mask, model), **EXACT)
    assert (scores[[0, 4, 9]] == 0).all() and (scores[:, [1, 2, 20]] == 0).all()


@pytest.mark.parametrize("model", MODELS)
def test_every_correction_term_contributes(model: str) -> None:
    # with the corrections dU, dV dropped the scores must differ: the decomposition's terms are all exercised
    mask = random_mask(30, 30, 0.3, 8)
    layer = paths.layer_csr(mask, np.float64)
    deg_out, deg_in = layer.deg_out, layer.deg_in
    assert (deg_out > 2).any() and (deg_in > 2).any()
    full = sparse(mask, model)
    only_first = torch.zeros_like(full)
    v1 = paths.lc_factor(np.ones_like(deg_out), deg_out, model)  # type: ignore[arg-type]
    c_in = paths._common(layer.st, paths._scaled(layer.s, v1, np.complex128))
    u = paths.lc_factor(c_in.count, deg_in[c_in.rows], model)  # type: ignore[arg-type]
    q = sp.csr_matrix((u * c_in.weighted, c_in.cols, c_in.csr.indptr), shape=(30, 30))
    paths._add_product(only_first, layer.s, q, 1)
    only_first.masked_fill_(mask, 0.0)
    assert (full - only_first).abs().max() > 1e-3


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shape", [(300, 400, 0.03, 9), (500, 500, 0.01, 10), (700, 200, 0.05, 11)])
def test_medium_masks_equal_the_grouped_algorithm(model: str, shape: tuple[int, int, float, int]) -> None:
    mask = random_mask(*shape)
    grouped = path_scores(mask, model, dtype=torch.float64, algorithm="grouped")
    torch.testing.assert_close(sparse(mask, model), grouped, **EXACT)
    # float32 (the default dtype) within float32 rounding of the float64 scores
    torch.testing.assert_close(
        path_scores(mask, model, algorithm="sparse").double(), grouped, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("model", MODELS)
def test_blocks_threads_and_lookup_kinds_do_not_change_scores(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mask = random_mask(60, 45, 0.15, 12)
    expected = reference_path_scores(mask, model)
    monkeypatch.setattr(paths, "BLOCK_FLOPS", 1)  # one row per sparse product block
    monkeypatch.setattr(paths, "WEDGE_BLOCK", 1)  # one node per wedge batch
    torch.testing.assert_close(sparse(mask, model), expected, **EXACT)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # row blocks on two Python threads
    try:
        torch.testing.assert_close(sparse(mask, model), expected, **EXACT)
    finally:
        torch.set_num_threads(threads)
    for pairs_below in (0.0, float("inf")):  # first halves from the wedges, or from the pairs
        monkeypatch.setattr(paths, "PAIRS_BELOW", pairs_below)
        torch.testing.assert_close(sparse(mask, model), expected, **EXACT)
    monkeypatch.setattr(paths, "LOOKUP_QUERIES_PER_ENTRY", 10**9)  # dense lookup tables
    torch.testing.assert_close(sparse(mask, model), expected, **EXACT)
    monkeypatch.setattr(paths, "LOOKUP_TABLE_MAX", 0)  # hash filter + binary search
    torch.testing.assert_close(sparse(mask, model), expected, **EXACT)


@pytest.mark.parametrize("way", ["sparse", "dense_right", "dense_left"])
def test_each_product_way_adds_the_product(way: str) -> None:
    left = sp.random(13, 17, density=0.3, format="csr", random_state=1)
    right = sp.random(17, 11, density=0.2, format="csr", random_state=2)
    out = torch.full((13, 11), 2.0, dtype=torch.float64)
    assert paths._add_product(out, left, right, 1, way=way) == way
    torch.testing.assert_close(out, torch.from_numpy(left.toarray() @ right.toarray()) + 2.0)


def test_lookup_returns_values_and_zero_for_absent_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = np.array([5, 17, 3, 40_000], dtype=np.int64)
    values = np.array([1.5, -2.0, 3.0, 4.0])
    queries = np.array([3, 4, 5, 17, 40_000, 39_999, 0], dtype=np.int64)
    expected = np.array([3.0, 0.0, 1.5, -2.0, 4.0, 0.0, 0.0])
    dense = paths._Lookup(keys, values, 50_000, queries=10**6)
    assert dense.dense
    np.testing.assert_array_equal(dense(queries), expected)
    hashed = paths._Lookup(keys, values, 50_000, queries=1)
    assert not hashed.dense
    np.testing.assert_array_equal(hashed(queries), expected)


def test_degenerate_masks_and_fill_existing() -> None:
    for mask in (torch.zeros(6, 9, dtype=torch.bool), torch.ones(6, 9, dtype=torch.bool)):
        assert (sparse(mask, "ch3") == 0).all()
    one = torch.zeros(4, 5, dtype=torch.bool)
    one[1, 2] = True
    assert (sparse(one, "ch2") == 0).all()
    mask = random_mask(20, 25, 0.2, 13)
    s = sparse(mask, "ch3")
    neg = sparse(mask, "ch3", fill_existing=float("-inf"))
    assert torch.isneginf(neg[mask]).all() and (s[mask] == 0).all()
    torch.testing.assert_close(neg[~mask], s[~mask], rtol=0, atol=0)
    assert path_scores(torch.zeros(0, 3, dtype=torch.bool), algorithm="sparse").shape == (0, 3)


def test_auto_picks_sparse_at_low_density_and_grouped_at_high() -> None:
    assert choose_algorithm(random_mask(2048, 2048, 0.01, 14)) == "sparse"
    assert choose_algorithm(random_mask(1024, 1024, 0.05, 15)) == "grouped"
    mask = random_mask(200, 150, 0.02, 16)
    torch.testing.assert_close(
        link_scores(mask, "ch3_l3", dtype=torch.float64), reference_path_scores(mask, "ch3"), **EXACT
    )


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ConfigError, match='"auto", "grouped" or "sparse"'):
        path_scores(random_mask(4, 4, 0.5, 17), algorithm="fast")  # type: ignore[arg-type]
