"""Typed, frozen, validated configs (pydantic v2) with messages that speak to the user.

``Config`` is the base of every config in edgetune: unknown keys are rejected, values are range-checked
by field constraints, instances are immutable and round-trip through plain dicts / YAML.
:func:`validate` turns pydantic's errors into one :class:`ConfigError` that names each offending key,
the value given, and (for unknown keys) the closest known key.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from edgetune.core.errors import ConfigError, did_you_mean

__all__ = [
    "Config",
    "apply_overrides",
    "dump_yaml",
    "load_yaml",
    "parse_override",
    "parse_yaml",
    "validate",
    "writable_dir_problem",
]

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base config: frozen, unknown keys forbidden, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, serialize_as_any=True)

    def replace(self, **changes: Any) -> Self:
        """Return a validated copy with ``changes`` applied."""
        return validate(type(self), {**self.to_dict(), **changes})


def method_config(base: type[BaseModel], data: Any, registry: Any, kind: str, default: str | None = None) -> Any:
    """For a ``mode="wrap"`` validator of a family's config base class: a mapping given to ``base`` is validated by
    the config class registered for its ``method`` in ``registry`` (so an option of another method is rejected by
    name). Returns that object, or None where ``base``'s own handler should run (not a mapping, or the method's
    config is ``base`` itself). ``default``: the method when ``data`` names none (None: ``method`` is required)."""
    if not isinstance(data, dict):
        return None
    known = ", ".join(registry.names())
    method = data.get("method", default)
    if method is None:
        raise ValueError(f"say which {kind} method to use: `method:` one of {known}")
    method = str(method).lower()
    target = registry.entry(method).config if method in registry else None
    if target is None:
        raise ValueError(f"unknown {kind} method {method!r}.{did_you_mean(method, registry.names())} Known: {known}")
    if target is base:
        return None
    return target.model_validate({**data, "method": method})


def _submodel(ann: Any) -> Any:
    """The pydantic model inside ``ann`` (unwrapping ``X | None``), or ``ann`` itself."""
    args = getattr(ann, "__args__", None)
    if args:
        return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    return ann


def _fields_at(cls: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Names of the fields of the (sub)model that ``loc`` points into, for suggestions."""
    model: Any = cls
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        model = _submodel(fields[part].annotation)
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


def _all_keys(model: Any, prefix: tuple[str, ...] = (), depth: int = 0) -> Iterator[tuple[str, ...]]:
    """Every dotted key path of ``model`` and its sub-configs (for suggestions across sections)."""
    fields = getattr(model, "model_fields", None)
    if not fields or depth > 4:
        return
    for name, field in fields.items():
        key = field.alias or name
        yield (*prefix, key)
        sub = _submodel(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _all_keys(sub, (*prefix, key), depth + 1)


def _suggest(cls: type[BaseModel], loc: Sequence[Any], where: str) -> str:
    """' Did you mean "x"?' for an unknown key: a close sibling, else the same name in another section."""
    name = str(loc[-1])
    paths = list(_all_keys(cls))
    same = [p for p in paths if p[-1] == name]  # the key exists in another section: the likeliest slip
    if not same:
        hint = did_you_mean(name, _fields_at(cls, loc[:-1]))
        if hint:
            return hint
        close = set(difflib.get_close_matches(name, {p[-1] for p in paths}, n=1, cutoff=0.8))
        same = [p for p in paths if p[-1] in close]
    if not same:
        return ""
    here = tuple(str(p) for p in loc[:-1])  # prefer the match nearest to where the key was written
    best = max(same, key=lambda p: (len(_common_prefix(p, here)), -len(p)))
    return f' Did you mean "{".".join(([where] if where else []) + list(best))}"?'


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> list[str]:
    out = []
    for x, y in zip(a, b):
        if x != y:
            break
        out.append(x)
    return out


def _format(cls: type[BaseModel], err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = ".".join(str(p) for p in ([where] if where else []) + loc) or "(root)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(cls, loc[:-1])
            hint = _suggest(cls, loc, where)
            allowed = f" Allowed keys here: {', '.join(known)}." if known else ""
            lines.append(f"unknown key {key!r}.{hint}{allowed}")
        elif e["type"] == "missing":
            lines.append(f"missing required key {key!r}.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            got = "" if isinstance(given, Mapping) else f" (got {given!r})"  # a whole section: the message says it
            lines.append(f"{key}: {msg}{got}.")
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


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"key {key!r} appears twice (lines {first} and {line})")
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys and reads only true/false as booleans.

    YAML 1.1 also reads ``yes/no/on/off/y/n`` as booleans, so ``name: no`` or ``data.name=off`` would turn
    into ``False``; here they stay strings (a boolean key still accepts them: pydantic reads "yes" as True).
    Numbers follow YAML 1.2, so ``1e-3`` is a float, not a string.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
            except TypeError:  # unhashable key: SafeLoader reports it below
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "YAML") -> Any:
    """Parse ``text`` with edgetune's YAML rules (no duplicate keys; only true/false are booleans)."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except _DuplicateKey as err:
        raise ConfigError(
            f"{source}: key {err.key!r} is written twice (lines {err.first} and {err.line}); YAML would silently "
            "keep only the last one. Delete one of them."
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}. Fix the syntax there "
                          "(indentation, a missing ':' or an unclosed bracket or quote).") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing, unreadable, binary, empty or malformed file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{str(p)!r} is a folder, not a recipe file; give a .yaml file inside it "
                          "or a shipped recipe name (edgetune ls recipes)")
    if not p.is_file():
        raise ConfigError(f"recipe file {str(p)!r} does not exist; check the path or run `edgetune ls recipes`")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {p}: {err.strerror or err}; check its permissions") from None
    if b"\x00" in raw:
        raise ConfigError(f"{p} is a binary file, not a YAML recipe; give the recipe's .yaml file "
                          "(a text file, see `edgetune ls recipes` for examples)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{p} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save the recipe "
                          "with UTF-8 encoding") from None
    data = parse_yaml(text.removeprefix("\ufeff"), str(p))
    if data is None:
        raise ConfigError(f"{p} is empty (no keys, only blank lines or comments); write the recipe's keys "
                          "(see `edgetune ls recipes`), or write {} to mean every default")
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of keys to values at the top level (like `train: "
                          f"{{epochs: 3}}`), got a {type(data).__name__}")
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
        raise ConfigError(f"override {text!r} has an empty key part; use dotted keys like train.optimizer.lr=0.01")
    try:  # same rules as recipe files: 1e-3 is a number, no/off/yes/on stay strings
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""  # a SafeLoader
    except _DuplicateKey as err:
        raise ConfigError(f"override {text!r}: key {err.key!r} is written twice; give it once") from None
    except yaml.YAMLError:  # not YAML (e.g. a path with ': '): the text itself
        value = raw
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with dotted ``key=value`` overrides applied (validation comes later).

    A list of named mappings (a recipe's ``stages``) is entered by name: ``stages.sessions.incremental.shots=1``.
    """
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                named = [n for n in node if isinstance(n, dict) and n.get("name") == part]
                if not named:
                    names = [n.get("name") for n in node if isinstance(n, dict)]
                    raise ConfigError(f"override {text!r}: {'.'.join(parts[:i])} has no entry named {part!r}; "
                                      f"names: {', '.join(map(str, names)) or '(none)'}")
                node = named[0]
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = nxt
        if isinstance(node, list):
            raise ConfigError(f"override {text!r}: name a key inside the entry {parts[-1]!r}, e.g. "
                              f"{'.'.join(parts)}.train.epochs=3")
        node[parts[-1]] = value
    return out


def writable_dir_problem(path: str | Path, key: str = "output_dir") -> str | None:
    """Why a folder cannot be created or written at ``path`` (``key`` names the setting), or None when it can.

    Checks without creating anything: every existing part of the path must be a folder, and the deepest
    existing one must be writable. Call it at validate time and before a run writes its first file.
    """
    import os

    p = Path(path).expanduser()
    fix = f"set {key} to a folder you can write (or pass --run-dir DIR)"
    probe = p
    while not probe.exists():
        if probe.is_symlink():  # a dangling link is in the way
            return f"{key}={str(path)!r}: {probe} is a broken link; remove it or {fix}"
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{key}={str(path)!r}: {probe} is a file, not a folder, so no folder can be made there; move the file or {fix}"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}={str(path)!r}: the folder {probe} is not writable (read-only or owned by another user); {fix}"
    return None
