"""In-place replacement of submodules by fully-qualified name."""

from __future__ import annotations

from torch import nn

__all__ = ["get_submodule", "replace_module"]


def get_submodule(model: nn.Module, fqn: str) -> nn.Module:
    return model.get_submodule(fqn)


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at ``fqn`` for ``new``; return the old one."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
