"""Typed, frozen, validated configs (pydantic v2) with messages that speak to the user.

``Config`` is the base of every config in edgetune: unknown keys are rejected, values are range-checked
by field constraints, instances are immutable and round-trip through plain dicts / YAML.
:func:`validate` turns pydantic's errors into one :class:`ConfigError` that names each offending key,
the value given, and (for unknown keys) the closest known key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from edgetune.core.errors import ConfigError, did_you_mean

__all__ = ["Config", "apply_overrides", "dump_yaml", "load_yaml", "parse_override", "validate"]

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base config: frozen, unknown keys forbidden, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def replace(self, **changes: Any) -> Self:
        """Return a validated copy with ``changes`` applied."""
        return validate(type(self), {**self.to_dict(), **changes})


def _fields_at(cls: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Names of the fields of the (sub)model that ``loc`` points into, for suggestions."""
    model: Any = cls
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        ann = fields[part].annotation
        # unwrap Optional[...] / X | None
        args = getattr(ann, "__args__", None)
        if args:
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        model = ann
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


def _format(cls: type[BaseModel], err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = ".".join(str(p) for p in ([where] if where else []) + loc) or "(root)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(cls, loc[:-1])
            hint = did_you_mean(str(loc[-1]), known)
            allowed = f" Allowed keys here: {', '.join(known)}." if known else ""
            lines.append(f"unknown key {key!r}.{hint}{allowed}")
        elif e["type"] == "missing":
            lines.append(f"missing required key {key!r}.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {e.get('input')!r}).")
    return "invalid config: " + " ".join(lines)


def validate(cls: type[C], data: Mapping[str, Any] | None, where: str = "") -> C:
    """Validate ``data`` into ``cls`` or raise :class:`ConfigError` with readable messages."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format(cls, err, where)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file {str(p)!r} does not exist; check the path or run `edgetune ls recipes`")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a","b","c"], value); the value is read as YAML (1e-3, [1,2], true)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part; use dotted keys like train.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; users mean a number
        try:
            value = float(value)
        except ValueError:
            pass
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with dotted ``key=value`` overrides applied (validation comes later)."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return out
