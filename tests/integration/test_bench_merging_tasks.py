"""``merging-tasks`` suite (quick): every merge method (data-free and data-aware) runs on five fine-tunes of one MLP
backbone, the rows, table and plot are written, and the merges keep the tasks.

Measured on the quick suite, seeds 0-5 (CPU, one thread, torch 2.13): the base backbone with the tasks' heads
reaches 0.74-0.86 of the fine-tunes' accuracy (normalized); TIES 0.048-0.124 above it (its sign election keeps
``digits-inverted``, whose task vector conflicts with ``digits``), task arithmetic 0.006-0.056 above; every merge
0.75 or more. A merge that drops the task vectors (the base) or breaks the weights fails the checks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import edgetune.merging.bench  # noqa: F401  (registers the suite until merging/family.py imports it)
from edgetune.bench import run_suite
from edgetune.core.errors import ConfigError
from edgetune.merging.bench.tasks import runnable_methods

TIES_MARGIN = 0.025  # TIES normalized accuracy above the base's (min over seeds 0-5: 0.048)
FLOOR = 0.65  # every merge's normalized accuracy (min over seeds 0-5: 0.747; a broken merge is near 0.1-0.2)


def test_quick_suite_merges_keep_the_tasks(tmp_path: Path) -> None:
    out = tmp_path / "merging-tasks.csv"
    rows = run_suite("merging-tasks", out_csv=out, quick=True, out_dir=tmp_path / "work", threads=1)
    mean = {(r["case"], r["method"]): r for r in rows if r["task"] == "mean"}
    methods, _ = runnable_methods()
    assert {"linear", "task_arithmetic", "ties", "dare", "breadcrumbs", "model_stock"} <= set(methods)
    for case in ("tasks", "bad-model"):
        assert {m for c, m in mean if c == case} >= set(methods), case
    assert ("bad-model", "bad model alone") in mean

    names = rows[0]["tasks"].split(",")
    assert len(names) == 5
    fine = [r for r in rows if r["method"] == "fine-tuned"]
    assert len(fine) == len(names) + 1 and all(r["norm_acc"] == 1.0 for r in fine)

    base = mean[("tasks", "base")]["norm_acc"]
    ties = mean[("tasks", "ties")]["norm_acc"]
    assert ties > base + TIES_MARGIN, (ties, base)
    low = {m: mean[("tasks", m)]["norm_acc"] for m in methods if mean[("tasks", m)]["norm_acc"] < FLOOR}
    assert not low, low
    bad_alone = mean[("bad-model", "bad model alone")]["must_keep_acc"]
    assert bad_alone < 0.5 * mean[("tasks", "base")]["must_keep_acc"]  # the bad model does break the must-keep task
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows)
    assert mean[("tasks", "ties")]["config"] and mean[("tasks", "ties")]["val_acc"] > 0.5

    # data-aware methods run on their data (seed 0, quick: RegMean 0.98, Fisher 0.80, AdaMerging 0.77, safety 0.79, base
    # 0.73; must-keep with the bad model: safety 0.50, bad model alone 0.26). Safety learns its lambdas on labelled task
    # data: above the base by 0.028-0.107 over seeds 0-3 (quick), with the bad model too (0.015: a broken objective
    # that leaves the lambdas at 0 gives the base)
    assert {"fisher", "regmean", "adamerging", "safety"} <= set(methods)
    assert all(mean[("tasks", m)]["data"] == "data-aware" for m in ("fisher", "regmean", "adamerging", "safety"))
    assert mean[("tasks", "regmean")]["norm_acc"] > base + 0.1
    assert mean[("tasks", "fisher")]["stats_s"] > 0
    assert mean[("bad-model", "safety")]["must_keep_acc"] > 1.5 * bad_alone
    assert mean[("tasks", "safety")]["norm_acc"] > base + 0.015
    assert mean[("bad-model", "safety")]["norm_acc"] > base + 0.015

    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = out.with_suffix(".md").read_text()
    assert "| ties |" in table and "| bad model alone |" in table
    assert (tmp_path / "work" / "merging-tasks.png").stat().st_size > 10_000


@pytest.mark.parametrize(("options", "words"), [({"backbone": "mobilenet-v2"}, "diverges"),
                                                ({"methods": ["rebasin"]}, "whole-model"),
                                                ({"methods": ["tie"]}, "not a registered"),
                                                ({"tasks": ["digits"]}, "at least two")])
def test_bad_options_are_refused_before_any_training(tmp_path: Path, options: dict[str, object], words: str) -> None:
    if options.get("methods") == ["rebasin"] and "rebasin" not in runnable_methods()[1]:
        pytest.skip("no whole-model method registered")
    with pytest.raises(ConfigError, match=words):
        run_suite("merging-tasks", out_csv=tmp_path / "x.csv", quick=True, out_dir=tmp_path / "work", options=options)
    assert not (tmp_path / "x.csv").exists()


def test_multi_head_gives_each_example_its_own_heads_logits() -> None:
    """The module the data-aware methods run on: per example, the logits of its task's head on the shared backbone
    (classes that head lacks far below), and a state dict that is the backbone's alone (prefixed ``body.``); a
    cosine head (CLIP-like, heads=cosine) works as a Linear one does."""
    import torch
    from torch import nn

    from edgetune.merging.bench.task_data_aware import PAD, MultiHead
    from edgetune.merging.bench.task_setup import Backbone, CosineHead
    from edgetune.models import MLP

    torch.manual_seed(0)
    model = MLP(12, 4, widths=(8,))
    bb = Backbone("mlp", model, "head", lambda m, x: m.features(x))
    heads = [nn.Linear(8, 3), CosineHead(torch.randn(5, 8), scale=32.0), model.head]
    mh = MultiHead(bb, heads)
    assert set(mh.state_dict()) == {f"body.{k}" for k in model.state_dict() if not k.startswith("head.")}
    x, task = torch.randn(6, 12), torch.tensor([0, 1, 2, 1, 0, 2])
    out = mh(x, task)
    assert out.shape == (6, 5)
    for i in range(6):
        want = bb.with_head(heads[int(task[i])])(x[i:i + 1])[0]
        torch.testing.assert_close(out[i, :len(want)], want)
        assert (out[i, len(want):] <= PAD / 2).all()
    f, protos = torch.randn(4, 8), torch.randn(5, 8)
    naive = torch.tensor([[32.0 * float(a @ b) / float(a.norm() * b.norm()) for b in protos] for a in f])
    torch.testing.assert_close(CosineHead(protos, scale=32.0)(f), naive)
    assert not list(CosineHead(protos, scale=32.0).parameters())  # fixed: fine-tuning cannot move it
