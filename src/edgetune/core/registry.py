"""A generic name -> object registry, one instance per kind of thing (datasets, models, methods...).

Registering a name twice raises; looking up an unknown name raises :class:`ConfigError` with the
known names and a "did you mean" hint. Entries may carry metadata (a config class, a one-line
summary, test hints) used by ``edgetune ls`` and by the contract tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from edgetune.core.errors import ConfigError, did_you_mean

T = TypeVar("T")

__all__ = ["Entry", "Registry"]


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object with its metadata."""

    name: str
    obj: T
    summary: str = ""
    config: type | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Maps lowercase names to objects. ``kind`` names the registry in messages ("dataset", "model")."""

    _all: ClassVar[dict[str, Registry[Any]]] = {}

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        Registry._all[kind] = self

    @classmethod
    def all(cls) -> dict[str, Registry[Any]]:
        """Every registry created so far, by kind (``edgetune ls`` uses this)."""
        return dict(cls._all)

    def add(self, name: str, obj: T, *, summary: str = "", config: type | None = None, **meta: Any) -> T:
        key = name.lower()
        if key in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        if not summary and getattr(obj, "__doc__", None):
            summary = (obj.__doc__ or "").strip().splitlines()[0]
        self._entries[key] = Entry(key, obj, summary, config, dict(meta))
        return obj

    def register(
        self, name: str, *, summary: str = "", config: type | None = None, **meta: Any
    ) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(obj: T) -> T:
            return self.add(name, obj, summary=summary, config=config, **meta)

        return deco

    def entry(self, name: str) -> Entry[T]:
        key = str(name).lower()
        if key not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{did_you_mean(key, self._entries)} Known {self.kind}s: {known}."
            )
        return self._entries[key]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[k] for k in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
