"""Every registered sparse rule that no method uses by default trains the digits MLP end to end.

The methods (test_sparse_methods_learn) cover the rules they name; this loops over the rule registries
and runs each remaining removal rule and density schedule on top of SET (random regrowth) in the same
reduced setting: 64-256-256-256-10 at 10% density, 8 epochs. A rule that breaks the layer or the density
falls far below 0.88 or misses the density.
"""

from __future__ import annotations

import pytest

from edgetune.recipe import load_recipe
from edgetune.runner import run
from edgetune.sparse import SPARSE_METHODS
from edgetune.sparse.strategies import DENSITY_SCHEDULES, REMOVALS, load_rules

load_rules()
OVERRIDES = [
    "data.name=digits",
    "model.widths=[256,256,256]",
    "sparse.density=0.1",
    "train.epochs=8",
    "train.progress=false",
    "train.num_threads=1",
    "sparse.method=set",
]


def _uncovered() -> list[tuple[str, str]]:
    used = {(k, v) for e in SPARSE_METHODS.entries() for k, v in e.obj.items() if isinstance(v, str)}
    used |= {("density_schedule", "constant"), ("density_schedule", "sigmoid")}  # set, chtss
    return [
        (kind, name)
        for kind, reg in (("removal", REMOVALS), ("density_schedule", DENSITY_SCHEDULES))
        for name in reg.names()
        if (kind, name) not in used
    ]


def test_the_new_rules_are_among_those_checked():
    assert {("removal", "mest"), ("density_schedule", "em_s")} <= set(_uncovered())


@pytest.mark.parametrize(("kind", "name"), _uncovered(), ids=lambda x: str(x))
def test_rule_learns_digits_at_10_percent(kind, name, tmp_path):
    cfg = load_recipe(
        "sparse/fmnist-mlp-1pct", [*OVERRIDES, f"sparse.{kind}={name}", f"output_dir={tmp_path}"]
    )
    res = run(cfg, tmp_path / name, write_report=False)
    s = res.summary
    assert s["test_acc"] >= 0.88, (kind, name, s["test_acc"])
    mm = s["method_metrics"]
    assert mm["sparse_density"] == pytest.approx(0.1, abs=1e-4)
    assert mm["sparse_updates"] >= 5 and mm["sparse_removed"] > 0
