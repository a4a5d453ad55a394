"""``incremental-etf`` suite: its NCM episode / all-class NCM / collapse maths against naive loops and hand cases, then
the quick run end to end (the ETF frame stays exactly a simplex ETF through training, every head learns the source,
transfer rows finite and above chance, CSV / table / plot written)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgetune.bench import run_suite
from edgetune.core.errors import ConfigError, ShapeError
from edgetune.data.splits import few_shot_episode
from edgetune.incremental.etf import simplex_etf
from edgetune.incremental.learner import IncrementalLearner
from edgetune.incremental.transfer_metrics import (
    collapse_stats,
    effective_rank,
    episode_accuracy,
    mean_ci95,
    ncm_accuracy,
)


def _clustered(n_per: int, k: int, d: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    y = torch.arange(k).repeat_interleave(n_per)
    return centres[y] + spread * torch.randn(len(y), d, generator=g), y


def test_episode_accuracy_matches_a_learner_per_episode() -> None:
    z, y = _clustered(20, 8, 6, 1.2, seed=0)
    eps = [few_shot_episode(y, 5, 3, 4, seed=s) for s in range(12)]
    sup, qry = torch.stack([e.support for e in eps]), torch.stack([e.query for e in eps])
    got = episode_accuracy(z, sup, qry, shots=3, queries=4)
    want = []
    for e in eps:  # naive: one IncrementalLearner per episode, labels 0..4
        learner = IncrementalLearner(None).fit_base_features(z[e.support], e.support_labels)
        want.append(learner.evaluate_features(z[e.query], e.query_labels)["acc"])
    assert got.shape == (12,)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))
    assert 0.0 < float(got.mean()) < 1.0  # the case is neither trivial nor hopeless


def test_episode_accuracy_hand_case() -> None:
    # 2-way 1-shot: prototypes e1, e2; queries (1, .1) -> 0 right, (1, 2) -> 1 wrong, (0, 1) -> 1 right, (3, 1) -> 0 wrong
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.1], [1.0, 2.0], [0.0, 1.0], [3.0, 1.0]])
    acc = episode_accuracy(z, torch.tensor([[0, 1]]), torch.tensor([[2, 3, 4, 5]]), shots=1, queries=2)
    assert acc.tolist() == [0.5]
    with pytest.raises(ShapeError, match="ways\\*shots"):
        episode_accuracy(z, torch.tensor([[0, 1, 2]]), torch.tensor([[2, 3]]), shots=2, queries=1)


def test_ncm_accuracy_matches_the_learner() -> None:
    ztr, ytr = _clustered(10, 6, 5, 1.0, seed=1)
    zte, yte = _clustered(15, 6, 5, 1.0, seed=1)  # same centres (same seed), other noise draws
    zte = zte + 0.3 * torch.randn(zte.shape, generator=torch.Generator().manual_seed(9))
    full = ncm_accuracy(ztr, ytr, zte, yte, list(range(6)), None)
    learner = IncrementalLearner(None).fit_base_features(ztr, ytr)
    assert full == pytest.approx(learner.evaluate_features(zte, yte)["acc"], abs=1e-12)
    # K shots: the same seeded picks as a hand-written loop
    g = torch.Generator().manual_seed(5)
    pick = torch.cat([torch.nonzero(ytr == c).flatten()[torch.randperm(10, generator=g)[:2]] for c in range(6)])
    learner = IncrementalLearner(None).fit_base_features(ztr[pick], ytr[pick])
    got = ncm_accuracy(ztr, ytr, zte, yte, list(range(6)), 2, seed=5)
    assert got == pytest.approx(learner.evaluate_features(zte, yte)["acc"], abs=1e-12)
    with pytest.raises(ConfigError, match="fewer than shots=11"):
        ncm_accuracy(ztr, ytr, zte, yte, list(range(6)), 11)


def test_collapse_stats_at_full_collapse_is_the_simplex() -> None:
    m = simplex_etf(4, 5, seed=3)  # (4, 5) unit rows, cosines -1/3
    y = torch.arange(4).repeat(3)
    z = 2.0 * m[y] + torch.tensor([0.5, -1.0, 0.0, 0.2, 0.3], dtype=torch.float64)  # a global shift only
    s = collapse_stats(z, y, class_vectors=m)
    assert s["nc1"] == pytest.approx(0.0, abs=1e-12) and s["within_between"] == pytest.approx(0.0, abs=1e-12)
    assert s["cos_etf"] == pytest.approx(-1 / 3)
    assert s["cos_mean"] == pytest.approx(-1 / 3, abs=1e-12) and s["cos_std"] == pytest.approx(0.0, abs=1e-12)
    assert s["cos_max"] == pytest.approx(-1 / 3, abs=1e-12)
    assert s["equinorm"] == pytest.approx(0.0, abs=1e-12) and s["self_duality"] == pytest.approx(1.0, abs=1e-12)
    assert s["eff_rank"] == pytest.approx(3.0, abs=1e-9)  # a simplex of 4 spans 3 equal directions
    # within-class spread along one axis only: one direction of class covariance
    wobble = torch.zeros(12, 5, dtype=torch.float64)
    wobble[:, 0] = torch.tensor([0.1, -0.1, 0.2, -0.2] * 3)[torch.argsort(y, stable=True)]
    s = collapse_stats(z + wobble, y)
    assert s["within_eff_rank"] == pytest.approx(1.0, abs=1e-9) and s["nc1"] > 0.0


def test_collapse_stats_against_loops() -> None:
    z, y = _clustered(7, 3, 4, 0.8, seed=2)
    z = z.double()
    s = collapse_stats(z, y)
    mu_g = z.mean(0)
    s_w = torch.zeros(4, 4, dtype=torch.float64)
    s_b = torch.zeros(4, 4, dtype=torch.float64)
    means = []
    for c in range(3):
        mu = z[y == c].mean(0)
        means.append(mu - mu_g)
        s_b += torch.outer(mu - mu_g, mu - mu_g) / 3
        for row in z[y == c]:
            s_w += torch.outer(row - mu, row - mu) / len(z)
    assert s["nc1"] == pytest.approx(float(torch.trace(s_w @ torch.linalg.pinv(s_b))) / 3, rel=1e-9)
    assert s["within_between"] == pytest.approx(float(torch.trace(s_w) / torch.trace(s_b)), rel=1e-12)
    cosines = [float(F.cosine_similarity(means[i], means[j], dim=0)) for i in range(3) for j in range(3) if i != j]
    assert s["cos_mean"] == pytest.approx(sum(cosines) / 6, abs=1e-12)
    assert s["cos_max"] == pytest.approx(max(cosines), abs=1e-12)
    assert "self_duality" not in s
    with pytest.raises(ShapeError, match="class_vectors"):
        collapse_stats(z, y, class_vectors=torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        collapse_stats(z[:3], torch.zeros(3, dtype=torch.long))


def test_effective_rank_and_ci_by_hand() -> None:
    cross = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])  # equal variance on 2 axes, none on z
    assert effective_rank(cross) == pytest.approx(2.0, abs=1e-12)
    line = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]])
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-9)
    mean, half = mean_ci95([0.5, 0.7, 0.6, 0.8])
    assert mean == pytest.approx(0.65)
    assert half == pytest.approx(1.96 * math.sqrt(((0.15**2 + 0.05**2) * 2) / 3) / 2)
    assert mean_ci95([0.4]) == (0.4, 0.0)


def test_quick_suite_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "etf.csv"
    rows = run_suite("incremental-etf", out_csv=out, quick=True, out_dir=tmp_path / "work", threads=1)
    collapse = {r["head"]: r for r in rows if r["kind"] == "collapse"}
    transfer = [r for r in rows if r["kind"] == "transfer"]
    assert set(collapse) == {"cosine", "etf", "etf-all", "linear"}
    for head, r in collapse.items():
        assert r["source_test_acc"] > 0.5, head  # 20 base glyph classes: chance 0.05 (about 0.9 measured)
        assert math.isfinite(r["nc1"]) and r["cos_etf"] == pytest.approx(-1 / 19)
    for head, slots in (("etf", 20), ("etf-all", 30)):  # the fixed frame: still exactly the simplex, untouched
        assert collapse[head]["head_slots"] == slots
        assert collapse[head]["head_geometry_error"] < 1e-6
        assert collapse[head]["head_frame_change"] == 0.0
    assert "head_geometry_error" not in collapse["cosine"]
    targets = {"synglyph-novel": "in", "fashion-mnist": "out", "digits": "out"}
    protocols = {"5w1s", "5w5s", "ncm-1", "ncm-5", "ncm-all"}
    assert {(r["head"], r["target"], r["protocol"]) for r in transfer} == {
        (h, t, p) for h in collapse for t in targets for p in protocols}
    for r in transfer:
        assert r["domain"] == targets[r["target"]]
        assert math.isfinite(r["acc"]) and 0.0 <= r["ci95"] < 0.2
        assert r["feature_dim"] == 32 and 1.0 < r["feature_eff_rank"] <= 32.0
        if r["protocol"] == "5w5s":  # chance 0.2; a frozen network that learned the glyphs beats it everywhere
            assert r["acc"] > 0.35, (r["head"], r["target"])
        if r["protocol"] == "ncm-all":
            assert r["acc"] > 2 * r["chance"], (r["head"], r["target"])
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = out.with_suffix(".md").read_text()
    assert "| synglyph | fashion-mnist | out | 5w5s |" in table and "etf − cosine" in table
    assert "| synglyph | etf | " in table
    assert (tmp_path / "work" / "incremental-etf.png").stat().st_size > 10_000


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown heads"):
        run_suite("incremental-etf", out_csv=tmp_path / "x.csv", quick=True, options={"heads": "cosine,etf-al"})
    with pytest.raises(ConfigError, match="resize"):
        run_suite("incremental-etf", out_csv=tmp_path / "x.csv", quick=True, options={"resize": "big"})
