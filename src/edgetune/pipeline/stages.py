"""Multi-stage recipes: resolve ``stages:`` into one validated recipe per stage.

A stage is a partial recipe with a ``name``: its ``data``, ``train``, ``seed`` and ``expect`` are merged over
the recipe's top-level ones (mappings merge key by key, other values replace), its ``model`` too unless it
names its own source (``name``, ``from`` or ``hf``: then it replaces the top-level model). Family sections
(``sparse:``, ...) and step options are the stage's own: they are not inherited, so a stage that starts
``from: stage:X`` does not re-apply X's methods. ``step`` says what the stage does (``train``, ``evaluate``, or
a family's step). A stage's model may come only from a stage listed before it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError

__all__ = ["INHERITED", "resolve_stages"]

#: top-level keys every stage inherits
INHERITED = ("version", "name", "description", "seed", "data", "model", "train", "output_dir", "expect")
_SOURCE_KEYS = ("name", "from", "from_", "hf")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve_stages(cfg: Any) -> list[tuple[str, Any]]:
    """``[(stage name, validated stage recipe)]`` in order; a recipe without ``stages`` is one stage ``main``."""
    from edgetune.recipe import recipe_schema

    if not cfg.stages:
        return [("main", cfg)]
    top = cfg.to_dict()
    base = {k: top[k] for k in INHERITED if k in top}
    schema = recipe_schema()
    out: list[tuple[str, Any]] = []
    for i, raw in enumerate(cfg.stages):
        if not isinstance(raw, dict):
            raise ConfigError(f"stages[{i}] must be a mapping with a name (e.g. {{name: base, train: {{epochs: 2}}}})")
        raw = dict(raw)
        name = raw.pop("name", None)
        where = f"stages[{i}]"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where} needs a name: letters, digits, '-', '_' or '.', at most 64 characters "
                              f"(got {name!r}); it names the stage's folder")
        if name in (n for n, _ in out):
            raise ConfigError(f"{where}: two stages are named {name!r}; stage names must be unique")
        if "stages" in raw:
            raise ConfigError(f"stage {name!r} holds its own stages; stages do not nest")
        merged = {k: v for k, v in base.items() if k != "model"}
        merged = _merge(merged, {k: v for k, v in raw.items() if k != "model"})
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"stage {name!r}: model must be a mapping")
        own_source = any(k in model for k in _SOURCE_KEYS)
        merged["model"] = copy.deepcopy(model) if own_source else _merge(base.get("model", {}), model)
        merged["name"] = top.get("name", "run")
        src = merged["model"].get("from") or merged["model"].get("from_")
        if isinstance(src, str) and src.startswith("stage:"):
            ref = src.removeprefix("stage:")
            earlier = [n for n, _ in out]
            if ref == name:
                raise ConfigError(f"stage {name!r} takes its model from itself (model.from: stage:{ref}); name an "
                                  f"earlier stage ({', '.join(earlier) or 'none yet'})")
            if ref not in earlier:
                later = [r.get("name") for r in cfg.stages[i + 1:] if isinstance(r, dict)]
                why = "a later stage" if ref in later else "no stage"
                raise ConfigError(f"stage {name!r}: model.from: stage:{ref} names {why}; a stage can only start from "
                                  f"a stage listed before it ({', '.join(earlier) or 'none yet'})")
        out.append((name, validate(schema, merged, where=f"stage {name!r}")))
    return out
