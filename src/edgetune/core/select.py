"""Choose submodules by fully-qualified name pattern and type.

A selector is ``fn(module, fqn) -> bool``. :func:`make_filter` builds one from glob or regex name
patterns, module types and exclusions; :func:`select_modules` walks a model with it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

__all__ = ["ModuleFilter", "make_filter", "select_modules"]

ModuleFilter = Callable[[nn.Module, str], bool]


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def make_filter(
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    types: Iterable[type[nn.Module]] = (nn.Linear,),
) -> ModuleFilter:
    """Filter modules whose type is one of ``types`` and whose name matches ``include`` but no ``exclude``.

    Patterns are globs on the full name or its last component (``"*.q_proj"``, ``"fc*"``), or regexes
    prefixed with ``re:``.
    """
    types_t = tuple(types)

    def fn(module: nn.Module, fqn: str) -> bool:
        if types_t and not isinstance(module, types_t):
            return False
        if not any(_matches(fqn, p) for p in include):
            return False
        return not any(_matches(fqn, p) for p in exclude)

    return fn


def select_modules(model: nn.Module, filter_fn: ModuleFilter) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` pairs of ``model`` accepted by ``filter_fn``, in definition order."""
    return [(name, m) for name, m in model.named_modules() if name and filter_fn(m, name)]
