"""sparse-predictors bench: path counts, the official-code wrapper (on a stub), the suite's rows and table."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.core.errors import ConfigError
from edgetune.sparse.bench import official_cht
from edgetune.sparse.bench.predictors import count_paths, predictor_rows, random_mask


def test_count_paths_equals_enumeration() -> None:
    mask = random_mask(9, 7, 0.35, 0)
    m = mask.tolist()
    brute = sum(
        1
        for a in range(9)
        for i in range(7)
        for b in range(9)
        for k in range(7)
        if m[a][i] and m[b][i] and m[b][k] and a != b and i != k
    )
    assert brute > 0 and count_paths(mask) == brute


def _stub_official(mask: torch.Tensor) -> types.ModuleType:
    """A stand-in for the compiled extension: checks the monopartite CSR it receives, returns (i*N + j)."""
    n_out, n_in = mask.shape
    n = n_out + n_in

    def scorer(ir, jc, size, lengths, n_lengths, length_max, models, n_models):  # type: ignore[no-untyped-def]
        adjacency = np.zeros((size, size))
        for row in range(size):
            adjacency[row, ir[jc[row] : jc[row + 1]]] = 1
        block = mask.numpy().astype(float)
        assert size == n and np.array_equal(adjacency[:n_out, n_out:], block)
        assert np.array_equal(adjacency[n_out:, :n_out], block.T) and adjacency[:n_out, :n_out].sum() == 0
        assert (list(lengths), n_lengths, length_max, n_models) == ([3], 1, 3, 1)
        scorer.models = list(models)  # type: ignore[attr-defined]
        return np.arange(size * size, dtype=float)[None, :]

    return types.SimpleNamespace(CH_scores_new_v2=scorer)  # type: ignore[return-value]


def test_official_wrapper_passes_the_monopartite_graph_and_slices_the_block() -> None:
    mask = random_mask(5, 3, 0.4, 1)
    module = _stub_official(mask)
    scores = official_cht.official_scores(module, mask, "ch2_l3")
    assert module.CH_scores_new_v2.models == [2]  # CH2 is model 2 of the official numbering
    n = 8
    expected = (np.arange(n * n).reshape(n, n)[:5, 5:]) * (~mask.numpy())
    np.testing.assert_array_equal(scores, expected)
    official_cht.official_scores(module, mask, "ch3_l3")
    assert module.CH_scores_new_v2.models == [3]
    with pytest.raises(ConfigError, match="no 'ch3_l3n'"):
        official_cht.official_scores(module, mask, "ch3_l3n")


def test_rows_with_official_time_it_on_the_same_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetune.sparse.predictors import link_scores

    def exact_official(module: object, mask: torch.Tensor, method: str) -> np.ndarray:
        return link_scores(mask, method, dtype=torch.float64).numpy() + 1e-13  # type: ignore[arg-type]

    monkeypatch.setattr("edgetune.sparse.bench.predictors.official_scores", exact_official)
    rows = predictor_rows([(40, 30, 0.1), (60, 60, 0.05)], ["ch3_l3", "ch3_l3n"], repeats=1,
                          official=types.ModuleType("stub"), official_repeats=2, num_threads=1)  # fmt: skip
    exact = [r for r in rows if r["method"] == "ch3_l3"]
    assert len(exact) == 2
    for r in exact:
        assert r["official_s"] > 0 and r["speedup_vs_official"] == pytest.approx(
            r["official_s"] / r["median_s"]
        )
        assert r["official_max_abs_diff"] == pytest.approx(1e-13, rel=1e-3) and r["paths"] > 0
    assert all(r["official_s"] is None for r in rows if r["method"] == "ch3_l3n")  # no official L3n here


def test_missing_official_sources_are_refused(tmp_path: Path) -> None:
    (tmp_path / "bindings.cpp").write_text("")
    with pytest.raises(ConfigError, match="CH_scores_new_v2.cpp"):
        official_cht.load_official(tmp_path)


def test_suite_runs_without_the_official_code(tmp_path: Path) -> None:
    from edgetune.bench.harness import run_suite

    out = tmp_path / "sp.csv"
    rows = run_suite("sparse-predictors", out_csv=out, quick=True, device="cpu",
                     options={"sizes": [[64, 48, 0.05]], "methods": ["ch3_l3", "ch2_l3"], "repeats": 1},
                     env={"timestamp_utc": "t", "git_sha": "g", "hardware": "h", "torch": "x"})  # fmt: skip
    assert [r["method"] for r in rows] == ["ch3_l3", "ch2_l3"]
    assert all(r["official_s"] is None and r["median_s"] > 0 for r in rows)
    table = out.with_suffix(".md").read_text()
    assert "| ch3_l3 | 64x48 | 0.05 |" in table and "| ch2_l3 | 64x48 | 0.05 |" in table
    with pytest.raises(ConfigError, match="official_src"):
        run_suite("sparse-predictors", out_csv=out, quick=True, device="cpu", options={"oficial_src": "x"})
