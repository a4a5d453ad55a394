"""``SparseConfig``: what to sparsify and how its topology evolves (the ``sparse:`` recipe section).

Fields left ``None`` take the chosen method's defaults (each method file declares them), so
``SparseConfig(method="rigl", density=0.05)`` is RigL as its paper runs it, and any field can still be
overridden. :meth:`SparseConfig.resolved` returns the config with every default filled in.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgetune.core.config import Config

__all__ = ["RULE_KINDS", "SparseConfig"]

Predictor = Literal["ch3_l3", "ch2_l3", "ch3_l3n", "ch2_l3n"]
# fields naming a registered rule (edgetune.sparse.strategies), each with a ``<kind>_options`` mapping
RULE_KINDS = ("removal", "regrowth", "topology", "weight_init", "density_schedule")


def _names(kind: str) -> Any:
    """JSON-schema hook: list the registered rule names of ``kind`` when a schema is generated."""

    def extra(schema: dict[str, Any]) -> None:
        from edgetune.sparse.strategies import registry_of

        schema["description"] = f"one of: {', '.join(registry_of(kind).names())}"

    return extra


def _default_schedule(initial_density: Any, density: float) -> str:
    """The density schedule when none is named: sigmoid decay when an initial density is given, else constant."""
    return "sigmoid" if initial_density and initial_density != density else "constant"


class SparseConfig(Config):
    """Dynamic sparse training of the ``nn.Linear`` layers of a model.

    method: a registered sparse method (``edgetune ls methods``): static, set, rigl, cht, chts, chtss.
    density: final fraction of links kept in every sparse layer, in (0, 1].
    include / exclude: name patterns (globs on the full or last name, or ``re:`` regexes) of the
        ``nn.Linear`` layers to sparsify. dense_head: keep the model's last ``nn.Linear`` dense.
    topology: initial masks, a registered topology rule: er (Erdos-Renyi), bsw (bipartite small world,
        ``beta``), brf (bipartite receptive field, ``brf_r``), csti (correlated sparse topological init
        from training inputs; layers whose inputs are not the data fall back to er).
    weight_init: a registered weight init: swi (std sqrt(2/(density*fan_in))), kaiming (std
        sqrt(2/fan_in)), keep (the dense layer's weights under the mask).
    update_interval / update_unit: topology update every N steps or epochs; stop_fraction: no updates
        after this fraction of training. zeta: fraction of links removed per update, with a constant
        or cosine schedule.
    removal / regrowth / predictor: the rules (registered names: ``edgetune ls methods``; e.g. removal
        magnitude, soft_magnitude, relative_importance, soft_relative_importance, mest; regrowth none,
        random, gradient, ch_hard, ch_soft); temperature: soft-removal exponent T rising linearly
        from the first to the second value until the stop (default 1 -> 3, the MLP/Transformer code;
        the official LLM runs use 1 -> 9).
    percolation: cut hidden neurons left without inputs or outputs along each layer chain; their
        links go to the regrowth budget. percolation_refund: false regrows only what the removal rule
        (and density decay) cut plus the schedule's growth, not what percolation cut (the official EM_S
        scheduler's fixed regrowth), so a percolating run can end below its density.
    regrown_removed: a link the update removed (by the removal rule or percolation) and regrew:
        ``reset`` starts it at 0 with zero optimizer state, like a link new to the layer; ``keep`` gives it
        back its weight and optimizer state (the official CHT and rigl-torch schedulers, which zero only
        the links absent before the update).
    skip_step_on_update: skip the optimizer step on update iterations (as the CHT and RigL code do).
    early_stop_overlap: freeze a layer once the overlap of its removed and regrown links exceeds it.
    initial_density / decay_steepness: gradual density decay (CHTss sigmoid) from initial_density to
        density; None keeps the density constant.
    density_schedule: a registered density schedule: constant, sigmoid (the default when initial_density
        is set), em_s (the CHT code's EM_S: start at density + 5%, step down, land on density).
    <rule>_options (removal_options, regrowth_options, topology_options, weight_init_options,
        density_schedule_options): the chosen rule's own parameters, e.g. ``removal_options: {lambda:
        0.01}`` for mest; a key the rule does not take is refused with the rule's parameter list.
    backend: SparseLinear compute backend (auto picks the native C++ kernels on CPU float32 where they built, else
        CSR kernels or a dense scatter by density).
    seed: seed of topology decisions (default: the run's seed), identical on every DDP rank.
    """

    method: str = "chts"
    density: float = Field(default=0.05, gt=0, le=1)
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    dense_head: bool = True
    topology: str | None = Field(default=None, json_schema_extra=_names("topology"))
    beta: float = Field(default=0.25, ge=0, le=1)
    brf_r: float = Field(default=0.3, ge=0, le=1)
    weight_init: str = Field(default="swi", json_schema_extra=_names("weight_init"))
    update_interval: int | None = Field(default=None, ge=1)
    update_unit: Literal["steps", "epochs"] | None = None
    stop_fraction: float = Field(default=0.75, gt=0, le=1)
    zeta: float | None = Field(default=None, gt=0, lt=1)
    zeta_schedule: Literal["constant", "cosine"] | None = None
    removal: str | None = Field(default=None, json_schema_extra=_names("removal"))
    regrowth: str | None = Field(default=None, json_schema_extra=_names("regrowth"))
    predictor: Predictor | None = None
    temperature: tuple[float, float] | None = None
    percolation: bool | None = None
    percolation_refund: bool = True
    regrown_removed: Literal["reset", "keep"] = "reset"
    skip_step_on_update: bool | None = None
    early_stop_overlap: float | None = Field(default=None, gt=0, le=1)
    initial_density: float | None = Field(default=None, gt=0, le=1)
    decay_steepness: float = Field(default=6.0, gt=0)
    density_schedule: str | None = Field(default=None, json_schema_extra=_names("density_schedule"))
    removal_options: dict[str, Any] = Field(default_factory=dict)
    regrowth_options: dict[str, Any] = Field(default_factory=dict)
    topology_options: dict[str, Any] = Field(default_factory=dict)
    weight_init_options: dict[str, Any] = Field(default_factory=dict)
    density_schedule_options: dict[str, Any] = Field(default_factory=dict)
    backend: Literal["auto", "native", "csr", "gather", "dense"] = "auto"
    seed: int | None = Field(default=None, ge=0)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from edgetune.core.errors import did_you_mean
        from edgetune.sparse.methods import SPARSE_METHODS

        if v.lower() not in SPARSE_METHODS:
            raise ValueError(
                f"unknown sparse method {v!r}.{did_you_mean(v.lower(), SPARSE_METHODS.names())} "
                f"Known: {', '.join(SPARSE_METHODS.names())}"
            )
        return v.lower()

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        return float(v)

    @field_validator(*RULE_KINDS)
    @classmethod
    def _rule(cls, v: str | None, info: Any) -> str | None:
        from edgetune.sparse.strategies import check_name

        return check_name(info.field_name, v)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and (v[0] < 0 or v[1] < 0):
            raise ValueError("temperatures must be >= 0")
        return v

    @model_validator(mode="after")
    def _decay(self) -> SparseConfig:
        if self.initial_density is not None and self.initial_density < self.density:
            raise ValueError(
                f"initial_density={self.initial_density} is below density={self.density}: the density decays "
                "from initial_density down to density"
            )
        if self.density_schedule is not None and self.initial_density not in (None, self.density):
            from edgetune.sparse.strategies import DENSITY_SCHEDULES

            if not DENSITY_SCHEDULES.get(self.density_schedule).uses_initial_density:
                raise ValueError(
                    f"density_schedule={self.density_schedule} does not start from initial_density (it sets its "
                    f"own start, see edgetune ls methods), so initial_density={self.initial_density} cannot "
                    "apply; remove initial_density, or use density_schedule=sigmoid to decay from it"
                )
        self._check_options()
        return self

    def _check_options(self) -> None:
        """Validate each ``<kind>_options`` against the rule it configures (refusals name key, value, fix)."""
        from edgetune.sparse.methods import SPARSE_METHODS
        from edgetune.sparse.strategies import rule_options

        defaults = SPARSE_METHODS.entry(self.method).obj if self.method in SPARSE_METHODS else {}
        for kind in RULE_KINDS:
            opts = getattr(self, f"{kind}_options")
            name = getattr(self, kind) or defaults.get(kind)
            if kind == "density_schedule" and name is None:
                name = _default_schedule(
                    self.initial_density or defaults.get("initial_density"), self.density
                )
            if name is None:
                if opts:
                    raise ValueError(
                        f"{kind}_options={opts} given but sparse method {self.method!r} sets no {kind} "
                        f"rule; set sparse.{kind} too"
                    )
                continue
            rule_options(kind, name, opts)

    def rule_options(self, kind: str) -> Any:
        """The validated options object of this (resolved) config's ``kind`` rule."""
        from edgetune.sparse.strategies import rule_options

        return rule_options(kind, getattr(self, kind), getattr(self, f"{kind}_options"))

    def resolved(self) -> SparseConfig:
        """This config with the method's defaults filled into every ``None`` field."""
        from edgetune.sparse.methods import SPARSE_METHODS

        entry = SPARSE_METHODS.entry(self.method)
        filled = {
            k: (v(self) if callable(v) else v) for k, v in entry.obj.items() if getattr(self, k) is None
        }
        if self.temperature is None and "temperature" not in filled:  # a method may set its own
            # the MLP/Transformer code's 1 -> 3 (used by soft removal only)
            filled["temperature"] = (1.0, 3.0)
        out = self.model_copy(update=filled)
        out = out.model_copy(update=out._schedule())
        missing = [
            k
            for k in (
                "topology",
                "update_interval",
                "update_unit",
                "zeta",
                "zeta_schedule",
                "removal",
                "regrowth",
                "predictor",
                "percolation",
                "skip_step_on_update",
            )
            if getattr(out, k) is None
        ]
        if missing:  # a bug in a method file
            raise ValueError(f"sparse method {self.method!r} leaves {missing} unset")
        return out

    def _schedule(self) -> dict[str, Any]:
        """The density schedule and its initial density (None when it equals the final density)."""
        from edgetune.sparse.strategies import DENSITY_SCHEDULES

        name = self.density_schedule or _default_schedule(self.initial_density, self.density)
        sched = DENSITY_SCHEDULES.get(name)
        first = sched.initial(
            self.density, self.initial_density, sched.options.model_validate(self.density_schedule_options)
        )
        return {"density_schedule": name, "initial_density": None if first == self.density else first}
