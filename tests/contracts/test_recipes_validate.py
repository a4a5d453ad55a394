"""Every shipped recipe validates (data and model options included) and names its command and figure."""

from __future__ import annotations

import pytest

from edgetune.recipe import list_recipes, load_recipe

RECIPES = list_recipes()


def test_there_are_recipes():
    assert any(name == "foundation/default" for name, _ in RECIPES)


@pytest.mark.parametrize("name,path", RECIPES, ids=[n for n, _ in RECIPES])
def test_recipe_validates_and_documents_itself(name, path):
    cfg = load_recipe(str(path))
    header = path.read_text().splitlines()[:3]
    assert header[0].startswith("#"), f"{name}: first line must say what the recipe shows"
    assert any("edgetune run" in line for line in header), f"{name}: header must give the command"
    from edgetune.pipeline.stages import resolve_stages

    stages = resolve_stages(cfg)
    assert all(st.expect for _, st in stages), f"{name}: each stage states the figure it should reach (expect:)"
