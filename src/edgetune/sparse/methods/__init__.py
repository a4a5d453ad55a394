"""Sparse training methods: each file registers one method as defaults over :class:`SparseConfig` fields.

The maths lives in the rule modules (removal, regrowth, predictors, schedules); a method is the
combination its paper uses. ``SPARSE_METHODS.get(name)`` is that dict of defaults.
"""

from __future__ import annotations

from typing import Any

from edgetune.core.registry import Registry

__all__ = ["SPARSE_METHODS", "register_sparse_method"]

SPARSE_METHODS: Registry[dict[str, Any]] = Registry("sparse method")


def register_sparse_method(name: str, defaults: dict[str, Any], summary: str) -> None:
    SPARSE_METHODS.add(name, dict(defaults), summary=summary)


from edgetune.sparse.methods import cht, chts, chtss, rigl, set_, static  # noqa: F401  (registration)
