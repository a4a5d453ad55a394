"""Same seed => same masks and weights as before the rules became registered strategies.

``fixtures/engine_cases.json`` was written by ``fixtures/engine_cases.py`` from the engine as it was before
the refactor (every method plus the non-default removal, regrowth, predictor, topology and weight-init
choices); each case is recomputed here and must match bit for bit (masks) and to float32 precision (weight
checksums). The weights are float32 and the training steps' matrix products accumulate in an order that
depends on the CPU's vector width, so two machines agree on them to a few float32 ulps, not to 1e-9: the CI
machine of 2026-12-07 differed from the one that wrote the fixture by up to 5e-8 relative. ``_REL`` is ten
times that; a changed rule moves them by orders of magnitude more (zeta 0.3 -> 0.31 on the chts case: 75%).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent / "fixtures" / "engine_cases.py"
_spec = importlib.util.spec_from_file_location("sparse_engine_cases", _PATH)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)  # type: ignore[union-attr]
FROZEN = json.loads(cases.FIXTURE.read_text())["cases"]
_REL = 1e-6


def test_fixture_covers_every_case():
    assert sorted(FROZEN) == sorted(cases.CASES)


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_masks_and_weights_match_the_frozen_run(name):
    got = cases.run_case(name)
    want = FROZEN[name]
    assert [g["name"] for g in got] == [w["name"] for w in want]
    for g, w in zip(got, want):
        assert g["updates"] == w["updates"], (name, g["name"])
        assert g["mask"] == w["mask"], f"{name}: mask of {g['name']} differs from the frozen run"
        assert g["checksum"] == pytest.approx(w["checksum"], rel=_REL, abs=_REL), (name, g["name"])
        assert g["abs_sum"] == pytest.approx(w["abs_sum"], rel=_REL, abs=_REL), (name, g["name"])
