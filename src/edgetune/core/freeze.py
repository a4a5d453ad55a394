"""Which parameters train: freezing by name patterns, head surgery, and the trainable-parameter report."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.core.select import _matches
from edgetune.core.surgery import replace_module

__all__ = ["find_head", "replace_head_", "set_trainable_", "trainable_report"]

log = logging.getLogger(__name__)


def find_head(model: nn.Module) -> str | None:
    """Qualified name of the model's classification head: the last ``nn.Linear`` registered in it."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return last


def replace_head_(model: nn.Module, head: str, num_classes: int, *, generator: torch.Generator | None = None) -> nn.Module:
    """Put a fresh ``Linear(in_features, num_classes)`` at ``head`` (same device and dtype); return the model."""
    try:
        old = model.get_submodule(head)
    except AttributeError:
        raise ConfigError(f"the model has no module named {head!r} to use as its head; name the head module "
                          f"with model.head_module (the last Linear is {find_head(model)!r})") from None
    in_f = getattr(old, "in_features", None)
    if in_f is None:
        raise ConfigError(f"the head {head!r} is a {type(old).__name__}, not a Linear layer; name a Linear with "
                          "model.head_module")
    p = next(old.parameters())
    new = nn.Linear(in_f, num_classes, bias=old.bias is not None if hasattr(old, "bias") else True,
                    device=p.device, dtype=p.dtype)
    if generator is not None:  # reproducible init independent of the global RNG's history
        with torch.no_grad():
            bound = 1.0 / in_f**0.5
            new.weight.uniform_(-bound, bound, generator=generator)
            if new.bias is not None:
                new.bias.uniform_(-bound, bound, generator=generator)
    replace_module(model, head, new)
    log.info("head %s replaced: %d -> %d outputs", head, getattr(old, "out_features", -1), num_classes)
    return model


def set_trainable_(model: nn.Module, patterns: Sequence[str], *, head: str | None = None) -> list[str]:
    """Train only parameters whose qualified name matches one of ``patterns``; freeze the rest.

    Patterns are globs on the full parameter name or its last component (``"encoder.layer.5.*"``,
    ``"*.bias"``), regexes prefixed with ``re:``, or ``head`` for every parameter of the model's head module.
    A pattern that matches nothing is an error (a typo would otherwise freeze the whole model silently).
    Returns the names of the trainable parameters.
    """
    names = [n for n, _ in model.named_parameters()]
    expanded: list[tuple[str, str]] = []
    for pat in patterns:
        if pat == "head":
            if head is None:
                raise ConfigError("train.trainable names 'head' but this model has no known head; give parameter "
                                  "name patterns instead (see the trainable-parameter table in the report)")
            expanded.append((pat, f"{head}.*"))
        else:
            expanded.append((pat, pat))

    def hit(name: str, pat: str) -> bool:
        return _matches(name, pat) or (pat.endswith(".*") and name.startswith(pat[:-1]))

    unused = [orig for orig, pat in expanded if not any(hit(n, pat) for n in names)]
    if unused:
        from edgetune.core.errors import did_you_mean

        raise ConfigError(
            f"train.trainable pattern(s) {unused} match no parameter of the model.{did_you_mean(unused[0], names)} "
            f"Parameter names look like {names[:3]}; use globs such as 'encoder.*' or 'head'."
        )
    keep = []
    for name, p in model.named_parameters():
        on = any(hit(name, pat) for _, pat in expanded)
        p.requires_grad_(on)
        if on:
            keep.append(name)
    return keep


def trainable_report(model: nn.Module) -> dict[str, Any]:
    """Counts of trainable and frozen parameters, and the trainable ones grouped by their top-level module."""
    total = trainable = 0
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        top = name.split(".")[0]
        g = groups.setdefault(top, [0, 0])
        g[1] += n
        if p.requires_grad:
            trainable += n
            g[0] += n
    return {"parameters": total, "trainable_parameters": trainable,
            "trainable_fraction": trainable / max(1, total),
            "trainable_by_module": {k: {"trainable": v[0], "total": v[1]} for k, v in groups.items()}}
