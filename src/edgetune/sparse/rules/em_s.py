"""EM_S: the CHT code's elastic-mutation density schedule (``--EM_S``; MEST's EM&S, Yuan et al. 2021).

Training starts at ``density + extra`` (5 percentage points in the official code). At every update the
removal rule cuts the layer down to the final ``density`` (``ζ`` is not used), percolation runs, and
regrowth brings it back to ``density + extra`` until ``switch`` (60%) of the updates' span, to
``density + late_extra`` (2.5 points) after that, and the last update before the stop regrows only what
percolation cut, so training ends exactly at ``density`` (spec §1.7; ``mlp_and_cnn/dst_scheduler.py``).

One difference from the official scheduler: there, regrowth adds a fixed ``extra · N`` links and does not
give back the links percolation cut, and the last update regrows nothing, so a percolating method ends below
its density; here every update ends on the scheduled count, like every other edgetune schedule.
Recipe: ``sparse.density_schedule=em_s`` (options: ``sparse.density_schedule_options.extra=0.05``, ...).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from edgetune.core.config import Config
from edgetune.sparse.strategies import DENSITY_SCHEDULES, DensitySchedule, ScheduleContext, summary_of

__all__ = ["EmsOptions", "ems_density"]


class EmsOptions(Config):
    """extra / late_extra: density above the target before / after ``switch`` of the update span."""

    extra: float = Field(default=0.05, gt=0, lt=1)
    late_extra: float = Field(default=0.025, ge=0, lt=1)
    switch: float = Field(default=0.6, gt=0, le=1)

    @model_validator(mode="after")
    def _order(self) -> EmsOptions:
        if self.late_extra > self.extra:
            raise ValueError(
                f"late_extra={self.late_extra} is above extra={self.extra}: EM_S steps the density "
                "down, so set late_extra <= extra (official: 0.05 then 0.025)"
            )
        return self


def ems_density(step: int, ctx: ScheduleContext) -> float:
    """Density after the update at ``step``: ``d + extra`` until ``switch·T_end``, then ``d + late_extra``,
    and ``d`` at the last update (official: ``step >= T_end - ΔT``; updates stop before ``T_end``)."""
    o = ctx.options if ctx.options is not None else EmsOptions()
    if step >= ctx.last_update:
        return ctx.density
    extra = o.extra if step <= o.switch * ctx.t_end else o.late_extra
    return min(1.0, ctx.density + extra)


def _remove_to_final(nnz: int, final: int, target: int, ctx: ScheduleContext) -> tuple[int, int]:
    return 0, max(0, nnz - final)


_RULE = DensitySchedule(
    initial=lambda d, d0, o: min(1.0, d + o.extra),
    at=ems_density,
    removal=_remove_to_final,
    options=EmsOptions,
)
DENSITY_SCHEDULES.add(
    "em_s",
    _RULE,
    summary=summary_of(
        "CHT's EM_S: start at density+extra, remove down to density and regrow back each update, then "
        "density+late_extra after switch, ending on density",
        _RULE,
    ),
)
