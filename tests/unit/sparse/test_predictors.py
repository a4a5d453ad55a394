"""CH link predictors (exact L3p, node-based L3n) against brute force; sampling without replacement."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.sparse import predictors_approx
from edgetune.sparse.predictors import METHODS, link_scores, sample_without_replacement
from edgetune.sparse.predictors_approx import node_scores
from edgetune.sparse.predictors_exact import path_scores
from edgetune.testing.reference_predictors import reference_node_scores, reference_path_scores

EXACT = {"rtol": 1e-12, "atol": 1e-12}


def random_mask(n_out: int, n_in: int, density: float, seed: int) -> torch.Tensor:
    """Seeded Erdős-Rényi bipartite mask with exactly round(density * n_out * n_in) links."""
    g = torch.Generator().manual_seed(seed)
    nnz = round(density * n_out * n_in)
    mask = torch.zeros(n_out * n_in, dtype=torch.bool)
    mask[torch.randperm(n_out * n_in, generator=g)[:nnz]] = True
    return mask.view(n_out, n_in)


def reference(mask: torch.Tensor, method: str) -> torch.Tensor:
    model = method[:3]
    return reference_node_scores(mask, model) if method.endswith("n") else reference_path_scores(mask, model)


# Hand-computed case. Outputs o0..o2 (rows), inputs i0..i3 (columns):
#   N(o0)={i0,i1,i2}  N(o1)={i0,i1,i3}  N(o2)={i1,i2}
#   N(i0)={o0,o1}  N(i1)={o0,o1,o2}  N(i2)={o0,o2}  N(i3)={o1}
# Candidates (a,k) and their length-3 paths a-i-b-k, with (di, de) of i w.r.t. k and of b w.r.t. a,
# di(i)=|N(i)∩N(k)|, de(i)=deg(i)-1-di(i), di(b)=|N(b)∩N(a)|, de(b)=deg(b)-1-di(b):
#   (o0,i3): via i0,o1: i0 (1,0), o1 (2,0) | via i1,o1: i1 (1,1), o1 (2,0)
#            CH3 = 1 + 1/sqrt(2)                    CH2 = sqrt(2*3) + sqrt(2*3)/sqrt(2) = sqrt6 + sqrt3
#   (o1,i2): via i0,o0: i0 (1,0) o0 (2,0) | via i1,o0: i1 (2,0) o0 (2,0) | via i1,o2: i1 (2,0) o2 (1,0)
#            CH3 = 3                                CH2 = sqrt6 + 3 + sqrt6
#   (o2,i0): via i1,o0: i1 (2,0) o0 (2,0) | via i2,o0: i2 (1,0) o0 (2,0) | via i1,o1: i1 (2,0) o1 (1,1)
#            CH3 = 1 + 1 + 1/sqrt(2)                CH2 = 3 + sqrt6 + sqrt3
#   (o2,i3): via i1,o1: i1 (1,1) o1 (1,1)           CH3 = 1/2            CH2 = sqrt(2*2)/sqrt(2*2) = 1
# Node-based, f over intermediates b in N(k) with cn=|N(a)∩N(b)|, e=max(deg(b)-cn-1,0) (same for i in N(a)):
#   (o0,i3): o1 (cn 2,e 0); i0 (1,0); i1 (1,1); i2 cn 0   CH3-L3n = 1+1+1/2 = 2.5   CH2-L3n = 3+2+1 = 6
#   (o2,i3): o1 (1,1); i1 (1,1); i2 cn 0                  CH3-L3n = 1/2+1/2 = 1     CH2-L3n = 1+1 = 2
HAND_MASK = [[1, 1, 1, 0], [1, 1, 0, 1], [0, 1, 1, 0]]
S2, S3, S6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)
HAND = {
    "ch3_l3": {(0, 3): 1 + 1 / S2, (1, 2): 3.0, (2, 0): 2 + 1 / S2, (2, 3): 0.5},
    "ch2_l3": {(0, 3): S6 + S3, (1, 2): 3 + 2 * S6, (2, 0): 3 + S6 + S3, (2, 3): 1.0},
    "ch3_l3n": {(0, 3): 2.5, (2, 3): 1.0},
    "ch2_l3n": {(0, 3): 6.0, (2, 3): 2.0},
}


@pytest.mark.parametrize("method", METHODS)
def test_hand_computed_case(method: str) -> None:
    mask = torch.tensor(HAND_MASK, dtype=torch.bool)
    scores = link_scores(mask, method, dtype=torch.float64)
    for (a, k), value in HAND[method].items():
        assert scores[a, k].item() == pytest.approx(value, rel=1e-14)
    assert (scores[mask] == 0).all()
    if not method.endswith("n"):  # the whole matrix is listed above for the path-based scores
        expected = torch.zeros(3, 4, dtype=torch.float64)
        for (a, k), value in HAND[method].items():
            expected[a, k] = value
        torch.testing.assert_close(scores, expected, **EXACT)


SHAPES = [
    (12, 15, 0.3, 1),
    (25, 18, 0.15, 2),
    (16, 40, 0.2, 3),
    (40, 9, 0.35, 4),
    (30, 30, 0.06, 5),
    (20, 20, 0.6, 6),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}@{s[2]}")
def test_equals_brute_force(method: str, shape: tuple[int, int, float, int]) -> None:
    mask = random_mask(*shape)
    expected = reference(mask, method)
    assert expected.abs().sum() > 0  # the graph has length-3 paths, so the check is not vacuous
    torch.testing.assert_close(link_scores(mask, method, dtype=torch.float64), expected, **EXACT)


@pytest.mark.parametrize("model", ["ch3", "ch2"])
def test_exact_blocking_and_orientation_do_not_change_scores(model: str) -> None:
    mask = random_mask(24, 13, 0.3, 7)
    expected = reference_path_scores(mask, model)
    # grouped algorithm: one input node per batched matmul (smallest block) versus everything in one block
    for block in (1, 2**30):
        torch.testing.assert_close(
            path_scores(mask, model, dtype=torch.float64, block_bytes=block, algorithm="grouped"),
            expected,
            **EXACT,
        )
    # score(Mᵀ) = score(M)ᵀ; the two calls group paths by different intermediates
    for algorithm in ("grouped", "sparse"):
        scores_t = path_scores(mask.T, model, dtype=torch.float64, algorithm=algorithm)
        torch.testing.assert_close(scores_t.T, expected, **EXACT)


def test_hub_mask_uses_cheaper_orientation_and_stays_exact() -> None:
    mask = random_mask(30, 12, 0.1, 8)
    mask[:, 0] = True  # input hub: grouping by input nodes would cost more than by output nodes
    mask[3, :] = True
    for model in ("ch3", "ch2"):
        for algorithm in ("grouped", "sparse"):
            torch.testing.assert_close(
                path_scores(mask, model, dtype=torch.float64, algorithm=algorithm),
                reference_path_scores(mask, model),
                **EXACT,
            )


@pytest.mark.parametrize("model", ["ch3", "ch2"])
@pytest.mark.parametrize("sparse_below", [0.0, 1.0])  # CPU: dense GEMMs, or CSR products with the mask
def test_node_chunking_and_csr_do_not_change_scores(
    model: str, sparse_below: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predictors_approx, "SPARSE_BELOW", sparse_below)
    mask = random_mask(17, 29, 0.25, 9)
    expected = reference_node_scores(mask, model)
    torch.testing.assert_close(
        node_scores(mask, model, dtype=torch.float64, chunk_bytes=1), expected, **EXACT
    )
    torch.testing.assert_close(node_scores(mask, model, dtype=torch.float64), expected, **EXACT)


@pytest.mark.parametrize("method", METHODS)
def test_float32_close_to_float64_and_fill_existing(method: str) -> None:
    mask = random_mask(64, 48, 0.1, 10)
    s64 = link_scores(mask, method, dtype=torch.float64)
    s32 = link_scores(mask, method)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, rtol=1e-5, atol=1e-5)
    neg = link_scores(mask, method, dtype=torch.float64, fill_existing=float("-inf"))
    assert torch.isneginf(neg[mask]).all()
    torch.testing.assert_close(neg[~mask], s64[~mask], rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_masks(method: str) -> None:
    empty = torch.zeros(5, 7, dtype=torch.bool)
    assert (link_scores(empty, method) == 0).all()
    full = torch.ones(5, 7, dtype=torch.bool)
    assert (link_scores(full, method) == 0).all()
    mask = random_mask(10, 8, 0.5, 11)
    mask[2, :] = False  # isolated output node: no path reaches it
    mask[:, 5] = False
    scores = link_scores(mask, method, dtype=torch.float64)
    assert (scores[2] == 0).all() and (scores[:, 5] == 0).all()
    torch.testing.assert_close(scores, reference(mask, method), **EXACT)
    assert link_scores(torch.zeros(0, 4, dtype=torch.bool), method).shape == (0, 4)


def test_float_mask_is_read_as_links() -> None:
    mask = random_mask(9, 11, 0.3, 12)
    torch.testing.assert_close(link_scores(mask.float() * 0.5, "ch3_l3"), link_scores(mask, "ch3_l3"))


def test_user_errors() -> None:
    mask = random_mask(4, 4, 0.5, 13)
    with pytest.raises(ConfigError, match='Did you mean "ch3_l3"'):
        link_scores(mask, "ch3-l3")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="2-D"):
        link_scores(mask[None], "ch2_l3n")
    with pytest.raises(ConfigError, match="floating"):
        link_scores(mask, "ch3_l3", dtype=torch.int64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method: str) -> None:
    mask = random_mask(70, 50, 0.1, 14)
    cpu = link_scores(mask, method, dtype=torch.float64)
    torch.testing.assert_close(link_scores(mask.cuda(), method, dtype=torch.float64).cpu(), cpu, **EXACT)


# ---------------------------------------------------------------- sampling without replacement


def test_sampling_distinct_and_never_excluded() -> None:
    g = torch.Generator().manual_seed(0)
    mask = random_mask(40, 30, 0.3, 15)
    scores = link_scores(mask, "ch2_l3n")  # 0 on existing links
    positive = int((scores > 0).sum())
    for chunk in (7, 100, 2**22):
        idx = sample_without_replacement(scores, positive - 3, g, chunk_size=chunk)
        assert idx.numel() == positive - 3 == idx.unique().numel()
        assert (scores.view(-1)[idx] > 0).all() and not mask.view(-1)[idx].any()
        everything = sample_without_replacement(scores, positive, g, chunk_size=chunk)
        assert set(everything.tolist()) == set(torch.nonzero(scores.view(-1) > 0).view(-1).tolist())
    assert sample_without_replacement(scores, 0, g).numel() == 0


def test_sampling_is_reproducible_with_a_seeded_generator() -> None:
    w = torch.rand(50, 20)
    a = sample_without_replacement(w, 30, torch.Generator().manual_seed(3))
    b = sample_without_replacement(w, 30, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [2, 2**22])
def test_sampling_matches_successive_draw_probabilities(chunk: int) -> None:
    # weights 1,2,3,4 and two zero entries ("existing links"); draw k=2 and compare the frequency of each
    # unordered pair with P({x,y}) = w_x/W * w_y/(W-w_x) + w_y/W * w_x/(W-w_y) (successive draws).
    w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]])
    flat = w.view(-1).tolist()
    total = sum(flat)
    pairs = list(itertools.combinations([0, 2, 3, 4], 2))
    prob = {
        p: flat[p[0]] / total * flat[p[1]] / (total - flat[p[0]])
        + flat[p[1]] / total * flat[p[0]] / (total - flat[p[1]])
        for p in pairs
    }
    n = 4000
    g = torch.Generator().manual_seed(1234)
    counts = dict.fromkeys(pairs, 0)
    for _ in range(n):
        idx = sample_without_replacement(w, 2, g, chunk_size=chunk).tolist()
        counts[tuple(sorted(idx))] += 1  # KeyError if a zero-weight entry or a duplicate came out
    chi2 = sum((counts[p] - n * prob[p]) ** 2 / (n * prob[p]) for p in pairs)
    # 5 degrees of freedom: P(chi2 > 25) ~ 1e-4. Uniform pairs would give chi2 ~ 1800, weights w^2 ~ 500.
    assert chi2 < 25.0, (chi2, counts)


def test_sampling_more_than_2_pow_24_entries() -> None:
    n = 2**24 + 5
    w = torch.zeros(n)
    w[-1000:] = 1.0  # only the tail is eligible; it sits past the multinomial limit
    idx = sample_without_replacement(w, 600, torch.Generator().manual_seed(0))
    assert idx.unique().numel() == 600 and (idx >= n - 1000).all()


def test_sampling_errors() -> None:
    w = torch.tensor([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="only 2 of 3"):
        sample_without_replacement(w, 3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        sample_without_replacement(torch.tensor([1.0, -1.0]), 1)
    with pytest.raises(ValueError, match="finite and >= 0"):
        sample_without_replacement(torch.tensor([1.0, float("-inf")]), 1)
    with pytest.raises(ConfigError, match="non-negative integer"):
        sample_without_replacement(w, -1)


# ---------------------------------------------------------------- benchmark rows


def test_benchmark_rows_and_topk_agreement() -> None:
    from edgetune.sparse.bench.predictors import predictor_rows, topk_agreement

    rows = predictor_rows([(48, 40, 0.1)], ["ch3_l3", "ch2_l3n"], repeats=1, quality=True, num_threads=1)
    assert [r["method"] for r in rows] == ["ch3_l3", "ch2_l3n"]
    assert all(r["median_s"] > 0 and r["official_s"] is None and r["threads"] == 1 for r in rows)
    assert rows[0]["algorithm"] in ("grouped", "sparse") and rows[1]["algorithm"] == "node"
    assert rows[0]["topk_overlap"] == rows[0]["topk_valid"] == 1.0  # float32 vs float64 exact: same pick
    mask = random_mask(30, 30, 0.1, 16)
    s = link_scores(mask, "ch3_l3", dtype=torch.float64)
    assert topk_agreement(s, s, mask, 20) == (1.0, 1.0)
    assert topk_agreement(-s, s, mask, 20)[1] < 0.5  # reversed ranking is not a valid top-k
