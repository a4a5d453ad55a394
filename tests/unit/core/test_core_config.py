from typing import Literal

import pydantic
import pytest
from pydantic import Field

from edgetune.core.config import Config, apply_overrides, parse_override, validate
from edgetune.core.errors import ConfigError
from edgetune.core.registry import Registry


class Inner(Config):
    lr: float = Field(default=0.1, gt=0)
    name: Literal["sgd", "adam"] = "sgd"


class Outer(Config):
    epochs: int = Field(default=1, ge=1)
    optim: Inner = Field(default_factory=Inner)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as e:
        validate(Outer, {"epochz": 3})
    assert "unknown key 'epochz'" in str(e.value) and 'Did you mean "epochs"' in str(e.value)


def test_unknown_nested_key_names_path_and_suggestion():
    with pytest.raises(ConfigError) as e:
        validate(Outer, {"optim": {"lrr": 1}}, where="train")
    msg = str(e.value)
    assert "train.optim.lrr" in msg and 'Did you mean "lr"' in msg


def test_range_error_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        validate(Outer, {"optim": {"lr": -1}})
    assert "optim.lr" in str(e.value) and "-1" in str(e.value)


def test_configs_are_frozen_and_round_trip():
    cfg = validate(Outer, {"epochs": 3, "optim": {"name": "adam"}})
    with pytest.raises(pydantic.ValidationError):
        cfg.epochs = 4  # type: ignore[misc]
    assert validate(Outer, cfg.to_dict()) == cfg
    assert cfg.replace(epochs=5).epochs == 5


def test_overrides_parse_yaml_values_and_nest():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("w=[1, 2]") == (["w"], [1, 2])
    out = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=true", "d.e=x"])
    assert out == {"a": {"b": 2, "c": True}, "d": {"e": "x"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_overrides_enter_stages_by_name():
    recipe = {"stages": [{"name": "base", "train": {"epochs": 2}}, {"name": "sessions", "step": "incremental"}]}
    out = apply_overrides(recipe, ["stages.base.train.epochs=5", "stages.sessions.incremental.shots=1"])
    assert out["stages"] == [{"name": "base", "train": {"epochs": 5}},
                             {"name": "sessions", "step": "incremental", "incremental": {"shots": 1}}]
    assert recipe["stages"][0]["train"]["epochs"] == 2  # the input is not changed
    with pytest.raises(ConfigError, match="no entry named 'bas'; names: base, sessions"):
        apply_overrides(recipe, ["stages.bas.train.epochs=5"])
    with pytest.raises(ConfigError, match="name a key inside the entry 'base'"):
        apply_overrides(recipe, ["stages.base=3"])


def test_registry_raises_on_duplicates_and_suggests():
    reg: Registry[int] = Registry("thing-test")
    reg.add("alpha", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("Alpha", 2)
    with pytest.raises(ConfigError) as e:
        reg.get("alpah")
    assert 'Did you mean "alpha"' in str(e.value)
    assert reg.get("ALPHA") == 1 and "alpha" in reg and reg.names() == ["alpha"]
