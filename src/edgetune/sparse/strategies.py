"""Registries of the sparse family's rules: removal, regrowth, initial topology, weight init, density schedule.

A rule is one small frozen object holding its function, its parameters and whether it reads the dense
gradient of the layer (``needs_gradients``: the engine then captures it on the batch before an update).
Rules register by name; :class:`~edgetune.sparse.config.SparseConfig` accepts exactly the registered names
(``sparse.removal``, ``sparse.regrowth``, ``sparse.topology``, ``sparse.weight_init``,
``sparse.density_schedule``) and validates ``sparse.<kind>_options`` against the chosen rule's ``options``
model; the engine and ``sparsify_`` dispatch through these registries, never on rule names.

Adding a rule is one file: build the object, ``REMOVALS.add(name, rule, summary=...)`` (or another
registry), and import the file from :mod:`edgetune.sparse.rules`. The engine's invariant tests loop over
every registered name, so the new rule is tested by registering it. ``edgetune ls methods`` lists them.

Signatures (all tensors ``(out, in)``, masks bool):

- removal ``fn(weight, mask, k, ctx) -> removed``: exactly ``k`` active links;
- regrowth ``fn(mask, k, ctx) -> new``: exactly ``k`` inactive links;
- topology ``fn(out, in, density, ctx) -> mask`` with ``link_count(out, in, density)`` links;
- weight init ``fn(mask, ctx) -> values`` (zeros off the mask);
- density schedule: see :class:`DensitySchedule`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, ShapeError
from edgetune.core.registry import Registry

__all__ = [
    "DENSITY_SCHEDULES",
    "REGROWTHS",
    "REMOVALS",
    "TOPOLOGIES",
    "WEIGHT_INITS",
    "DensitySchedule",
    "InitContext",
    "NoOptions",
    "RegrowthRule",
    "RemovalRule",
    "RuleContext",
    "ScheduleContext",
    "TopologyContext",
    "TopologyRule",
    "WeightInit",
    "apply_rule",
    "load_rules",
    "rule_options",
    "summary_of",
]


class NoOptions(Config):
    """A rule without parameters of its own."""


@dataclass(frozen=True)
class RuleContext:
    """What a removal or regrowth rule may read besides the weight and mask of one layer at one update."""

    layer: str  # the layer's name, for messages
    step: int
    generator: torch.Generator  # seeded by (seed, step, layer): the same on every DDP rank
    temperature: float = 1.0  # soft-removal exponent T at this step
    predictor: str = "ch3_l3"  # CH link predictor of the ch_* regrowth rules
    grad: torch.Tensor | None = None  # dense gradient (out, in) of the loss, when the rule needs_gradients
    options: Any = None  # the rule's validated options (an instance of its ``options`` model)


@dataclass(frozen=True)
class RemovalRule:
    """``fn(weight, mask, k, ctx)`` -> bool mask of exactly ``k`` active links to remove."""

    fn: Callable[[torch.Tensor, torch.Tensor, int, RuleContext], torch.Tensor]
    options: type[Config] = NoOptions
    needs_gradients: bool = False


@dataclass(frozen=True)
class RegrowthRule:
    """``fn(mask, k, ctx)`` -> bool mask of exactly ``k`` inactive links to add.

    ``evolves=False`` marks a rule that never changes the topology (static sparse training): the engine
    then neither removes nor regrows links (density decay still prunes).
    """

    fn: Callable[[torch.Tensor, int, RuleContext], torch.Tensor]
    options: type[Config] = NoOptions
    needs_gradients: bool = False
    evolves: bool = True


@dataclass(frozen=True)
class TopologyContext:
    """What an initial-topology builder may read: the generator, the data, the config's parameters."""

    layer: str
    generator: torch.Generator
    train_inputs: torch.Tensor | None = None  # (N, ...) training inputs, for data-driven topologies (CSTI)
    options: Any = None
    params: Mapping[str, Any] = field(default_factory=dict)  # config fields the rule lists in ``params``


@dataclass(frozen=True)
class TopologyRule:
    """``fn(out, in, density, ctx)`` -> bool mask ``(out, in)`` with ``link_count`` links.

    ``params``: the SparseConfig fields it reads (passed in ``ctx.params``), e.g. ``("beta",)`` for BSW.
    """

    fn: Callable[[int, int, float, TopologyContext], torch.Tensor]
    options: type[Config] = NoOptions
    params: tuple[str, ...] = ()
    needs_data: bool = False


@dataclass(frozen=True)
class InitContext:
    layer: str
    generator: torch.Generator
    density: float  # the layer's initial density
    weight: torch.Tensor  # the dense layer's current weight (out, in), on the CPU
    options: Any = None


@dataclass(frozen=True)
class WeightInit:
    """``fn(mask, ctx)`` -> initial values ``(out, in)`` (dtype of ``ctx.weight``), zero off the mask."""

    fn: Callable[[torch.Tensor, InitContext], torch.Tensor]
    options: type[Config] = NoOptions


@dataclass(frozen=True)
class ScheduleContext:
    """Where training stands: ``t_end`` the stop step ``T_end`` (updates happen before it), ``last_update``
    the step of the last update (:func:`~edgetune.sparse.schedules.last_update_step`), ``interval`` steps
    between updates."""

    density: float  # final density
    initial_density: float  # density at the start
    t_end: int
    interval: int
    last_update: int
    zeta: float  # removal fraction at this step (already scheduled)
    steepness: float = 6.0
    options: Any = None


@dataclass(frozen=True)
class DensitySchedule:
    """How the density moves over training and how many links each update removes.

    ``initial(density, initial_density, options)`` -> density at ``sparsify_`` (``initial_density`` is the
    config's, possibly None); ``at(step, ctx)`` -> density the update at ``step`` ends on;
    ``removal(nnz, final, target, ctx)`` -> ``(pruned, removed)``: links first pruned by relative
    importance, then removed by the removal rule (``final``/``target``: link counts of the final and the
    scheduled density of this layer).
    """

    initial: Callable[[float, float | None, Any], float]
    at: Callable[[int, ScheduleContext], float]
    removal: Callable[[int, int, int, ScheduleContext], tuple[int, int]]
    options: type[Config] = NoOptions
    uses_initial_density: bool = False  # starts from sparse.initial_density (else that field is refused)


REMOVALS: Registry[RemovalRule] = Registry("sparse removal method")
REGROWTHS: Registry[RegrowthRule] = Registry("sparse regrowth method")
TOPOLOGIES: Registry[TopologyRule] = Registry("sparse topology method")
WEIGHT_INITS: Registry[WeightInit] = Registry("sparse weight-init method")
DENSITY_SCHEDULES: Registry[DensitySchedule] = Registry("sparse density-schedule method")


def summary_of(text: str, rule: Any) -> str:
    """``text`` followed by the rule's parameters and gradient need, for ``edgetune ls methods``."""
    parts = [f"{v.alias or k}={v.default!r}" for k, v in rule.options.model_fields.items()]
    parts += [f"sparse.{p}" for p in getattr(rule, "params", ())]
    if getattr(rule, "needs_gradients", False):
        parts.append("needs gradients")
    return f"{text} [{'; '.join(parts)}]" if parts else text


_loaded = False


def load_rules() -> None:
    """Import the modules that register the built-in rules (idempotent)."""
    global _loaded
    if _loaded:
        return
    import edgetune.sparse.init
    import edgetune.sparse.regrowth
    import edgetune.sparse.removal
    import edgetune.sparse.rules
    import edgetune.sparse.schedules
    import edgetune.sparse.topology  # noqa: F401

    _loaded = True


def registry_of(kind: str) -> Registry[Any]:
    load_rules()
    return {
        "removal": REMOVALS,
        "regrowth": REGROWTHS,
        "topology": TOPOLOGIES,
        "weight_init": WEIGHT_INITS,
        "density_schedule": DENSITY_SCHEDULES,
    }[kind]


def rule_options(kind: str, name: str, given: Mapping[str, Any] | None) -> BaseModel:
    """Validate ``given`` (the ``sparse.<kind>_options`` mapping) against rule ``name``'s options model.

    Raises ConfigError naming the option, the value and the rule's parameters.
    """
    rule = registry_of(kind).get(name)
    model = rule.options
    try:
        return model.model_validate(dict(given or {}))
    except ValidationError as err:
        known = ", ".join(f.alias or k for k, f in model.model_fields.items()) or "none"
        bits = []
        for e in err.errors():
            key = "".join(f".{x}" for x in e["loc"])
            msg = str(e["msg"]).removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                bits.append(f"sparse.{kind}_options{key} is not a parameter of {kind} {name!r}")
            elif key:
                bits.append(f"sparse.{kind}_options{key}={e.get('input')!r}: {msg}")
            else:
                bits.append(f"sparse.{kind}_options={dict(given or {})}: {msg}")
        raise ConfigError(f"{'; '.join(bits)} (parameters of {kind} {name!r}: {known})") from None


def check_name(kind: str, value: str | None) -> str | None:
    """``value`` lowercased when it names a registered rule of ``kind``; ValueError listing them otherwise."""
    if value is None:
        return None
    from edgetune.core.errors import did_you_mean

    reg = registry_of(kind)
    v = str(value).lower()
    if v not in reg:
        raise ValueError(
            f"sparse.{kind}={value!r} is not a registered {kind} rule.{did_you_mean(v, reg.names())} "
            f"Choose one of: {', '.join(reg.names())} (edgetune ls methods)"
        )
    return v


def apply_rule(
    kind: str, rule: str, layer: str, k: int, mask: torch.Tensor, call: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Run a removal or regrowth ``call``; name ``layer`` in its refusals and check the mask it returns.

    Removal must return exactly ``k`` active links, regrowth exactly ``k`` inactive ones: a rule doing
    otherwise would break the density, so it is refused here with the layer, the counts and the fix.
    """
    try:
        out = call()
    except (ConfigError, ShapeError) as err:
        if repr(layer) in str(err):
            raise
        raise type(err)(f"sparse layer {layer!r} ({kind} {rule!r}): {err}") from None
    removal = kind == "removal"
    wrong = (out.cpu() & ~mask.cpu()) if removal else (out.cpu() & mask.cpu())
    if out.dtype != torch.bool or out.shape != mask.shape or int(out.sum()) != k or bool(wrong.any()):
        raise ConfigError(
            f"sparse layer {layer!r}: {kind} rule {rule!r} returned {int(out.sum())} links ({int(wrong.sum())} of "
            f"them {'inactive' if removal else 'already active'}) of shape {tuple(out.shape)} and dtype {out.dtype} "
            f"where exactly k={k} {'active' if removal else 'inactive'} links of shape {tuple(mask.shape)} (bool) "
            "were asked; fix the rule (edgetune.sparse.strategies documents the contract)"
        )
    return out
