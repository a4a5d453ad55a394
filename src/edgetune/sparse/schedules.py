"""Schedules of dynamic sparse training as pure functions of the training step.

Every function takes the current optimizer step ``step`` (number of optimizer steps taken so far,
``0`` before training) and returns a number; nothing here holds state, so a schedule can be evaluated
anywhere (engine, plots, tests) and resumes exactly from a step count.

- update timing: :func:`stop_step`, :func:`update_due` (every ``interval`` steps before ``T_end``),
  :func:`last_update_step`;
- removal fraction: :func:`constant_zeta`, :func:`cosine_zeta` (RigL, Evci et al. 2020; CHT, Zhang et al.
  ICLR 2024);
- soft-removal temperature: :func:`removal_temperature` (CHTs, Zhang et al. arXiv 2501.19107);
- density: :func:`constant_density`, :func:`linear_density`, :func:`cubic_density` (Zhu & Gupta 2017,
  GraNet, Liu et al. 2021), :func:`sigmoid_density` (CHTss, arXiv 2501.19107).

Invalid arguments raise :class:`~edgetune.core.errors.ConfigError` naming the value and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from edgetune.core.errors import ConfigError

__all__ = [
    "constant_density",
    "constant_zeta",
    "cosine_zeta",
    "cubic_density",
    "last_update_step",
    "linear_density",
    "removal_temperature",
    "sigmoid_density",
    "stop_step",
    "update_due",
]


# ----------------------------------------------------------------------------------------------- checks


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be an integer >= 0, got {step!r}.")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")


def _check_density(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(
            f"{name} must be a density in (0, 1] (fraction of links kept), got {value!r}. "
            "A density is 1 - sparsity: 1% of links kept is density=0.01."
        )


def _check_decay(d_init: float, d_final: float) -> None:
    _check_density("d_init", d_init)
    _check_density("d_final", d_final)
    if d_final > d_init:
        raise ConfigError(
            f"d_final={d_final!r} is larger than d_init={d_init!r}; a density decay schedule goes from a "
            "denser start to a sparser end. Swap the two values or use constant_density."
        )


def _check_zeta(zeta: float) -> None:
    if not (isinstance(zeta, (int, float)) and math.isfinite(zeta) and 0.0 <= zeta < 1.0):
        raise ConfigError(
            f"zeta (fraction of active links removed per update) must be in [0, 1), got {zeta!r}; "
            "typical values are 0.3 (MLP, Transformer) and 0.1 (LLM)."
        )


def _check_window(t_start: int, t_end: int) -> None:
    _check_step(t_start)
    if isinstance(t_end, bool) or not isinstance(t_end, int) or t_end <= t_start:
        raise ConfigError(f"t_end must be an integer > t_start={t_start!r}, got {t_end!r}.")


def _progress(step: int, t_start: int, t_end: int, interval: int) -> float:
    """Fraction p/P in [0, 1] of pruning iterations done: p = (step - t_start) // interval, clipped."""
    total_iters = max(1, (t_end - t_start) // interval)
    it = (step - t_start) // interval
    return min(max(it, 0), total_iters) / total_iters


# ----------------------------------------------------------------------------------------------- timing


def stop_step(total_steps: int, stop_fraction: float = 0.75) -> int:
    """The stop step ``T_end = floor(stop_fraction * total_steps)``: the topology changes only before it.

    RigL recommends stopping topology updates at 75% of training; CHT/CHTs use the same ``T_end``
    (spec §1.7). ``stop_fraction`` must lie in (0, 1].
    """
    _check_positive_int("total_steps", total_steps)
    if not (isinstance(stop_fraction, (int, float)) and 0.0 < stop_fraction <= 1.0):
        raise ConfigError(
            f"stop_fraction must be in (0, 1] (fraction of training with topology updates), "
            f"got {stop_fraction!r}; 0.75 is the RigL/CHT default."
        )
    # 1e-9 absorbs float error such as 0.7 * 10 = 7.000000000000001 / 0.29 * 100 = 28.999999999999996.
    return max(0, math.floor(stop_fraction * total_steps + 1e-9))


def update_due(step: int, interval: int, stop_fraction: float, total_steps: int) -> bool:
    """Whether a topology update happens after optimizer step ``step``.

    Updates happen every ``interval`` (ΔT) steps while ``step < T_end``, with
    ``T_end = stop_step(total_steps, stop_fraction)``: due iff ``step > 0``, ``step % ΔT == 0`` and
    ``step < T_end``, as in rigl-torch's and the official CHT/CHTs schedulers (``self.step % self.delta_T == 0
    and self.step < self.T_end``, steps counted from 1). With ``T_end`` a multiple of ΔT (CHT's MLPs: 75 of 100
    epochs) the last update is at ``T_end - ΔT``; the models then train ``total - T_end + ΔT`` steps on it.
    ΔT is 100 steps for Transformer/LLM runs, one epoch (``len(loader)`` steps) for the CHT MLPs.
    """
    _check_step(step)
    _check_positive_int("interval", interval)
    t_end = stop_step(total_steps, stop_fraction)
    return step > 0 and step % interval == 0 and step < t_end


def last_update_step(t_end: int, interval: int) -> int:
    """Step of the last update :func:`update_due` allows before the stop step ``t_end`` (0: none)."""
    _check_positive_int("t_end", t_end)
    _check_positive_int("interval", interval)
    return (t_end - 1) // interval * interval


# ------------------------------------------------------------------------------------- removal fraction


def constant_zeta(step: int, zeta: float) -> float:
    """Constant removal fraction ζ (SET: 0.3). ``step`` is accepted for a uniform schedule signature."""
    _check_step(step)
    _check_zeta(zeta)
    return float(zeta)


def cosine_zeta(step: int, t_end: int, zeta0: float) -> float:
    """Cosine-annealed removal fraction ``ζ_t = ζ0/2 · (1 + cos(π·t/T_end))``.

    RigL (Evci et al. 2020, drop fraction α with cosine annealing) and CHT's ``--adaptive_zeta``
    (spec §1.7). ``t_end`` is the stop step ``T_end`` (see :func:`stop_step`), not the total number of
    training steps; for ``step >= t_end`` the fraction is 0 (no topology change after ``T_end``).
    """
    _check_step(step)
    _check_positive_int("t_end", t_end)
    _check_zeta(zeta0)
    t = min(step, t_end)
    return float(zeta0 / 2.0 * (1.0 + math.cos(math.pi * t / t_end)))


def removal_temperature(step: int, t_end: int, t_start: float = 1.0, t_final: float = 3.0) -> float:
    """Temperature of CHTs soft removal, linear in the step: ``T_t = T0 + (T1 - T0)·min(t, T_end)/T_end``.

    CHTs keeps links with probability ∝ ``|w|^T`` (spec §1.4): a low ``T`` early explores (close to
    uniform), a high ``T`` late approaches hard magnitude removal. The released MLP/Transformer code uses
    ``T = 1 + 2·t/T_end`` (defaults here, 1→3); the LLM code ``T0=1, T1=9``.
    """
    _check_step(step)
    _check_positive_int("t_end", t_end)
    for name, value in (("t_start", t_start), ("t_final", t_final)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
            raise ConfigError(f"{name} (removal temperature) must be a finite number >= 0, got {value!r}.")
    return float(t_start + (t_final - t_start) * min(step, t_end) / t_end)


# ---------------------------------------------------------------------------------------------- density


def constant_density(step: int, density: float) -> float:
    """Constant density (SET, RigL, CHT, CHTs). ``step`` is accepted for a uniform schedule signature."""
    _check_step(step)
    _check_density("density", density)
    return float(density)


def linear_density(
    step: int, t_start: int, t_end: int, d_init: float, d_final: float, interval: int = 1
) -> float:
    """Linear decay ``d = d0 - (d0 - d1)·p/P`` over pruning iterations (the CHTss code's ``linear``).

    ``p = (step - t_start) // interval`` (clipped to ``[0, P]``), ``P = (t_end - t_start) // interval``.
    """
    _check_step(step)
    _check_window(t_start, t_end)
    _check_positive_int("interval", interval)
    _check_decay(d_init, d_final)
    return float(d_init - (d_init - d_final) * _progress(step, t_start, t_end, interval))


def cubic_density(
    step: int, t_start: int, t_end: int, d_init: float, d_final: float, interval: int = 1
) -> float:
    """Cubic gradual pruning (Zhu & Gupta 2017; GraNet, Liu et al. NeurIPS 2021).

    In sparsity ``s_t = s1 + (s0 - s1)(1 - p/P)^3``, i.e. in density
    ``d_t = d1 + (d0 - d1)·(1 - p/P)^3`` with ``p = (step - t_start) // interval`` clipped to ``[0, P]``
    and ``P = (t_end - t_start) // interval``. Fast decay first, slow at the end.
    """
    _check_step(step)
    _check_window(t_start, t_end)
    _check_positive_int("interval", interval)
    _check_decay(d_init, d_final)
    frac = _progress(step, t_start, t_end, interval)
    return float(d_final + (d_init - d_final) * (1.0 - frac) ** 3)


def sigmoid_density(
    step: int,
    t_end: int,
    d_init: float,
    d_final: float,
    steepness: float = 6.0,
    interval: int = 1,
    t_start: int = 0,
) -> float:
    """CHTss sigmoid ("s_shape") gradual density decay (Zhang et al. arXiv 2501.19107; spec §1.8).

    With pruning iterations ``p = (step - t_start) // interval`` (clipped to ``[0, P]``),
    ``P = (t_end - t_start) // interval``, midpoint ``m = P/2`` and slope ``κ = k/m`` (``k = steepness``,
    6 in the released code)::

        σ̂(p) = [σ(κ(p - m)) - σ(-κm)] / [σ(κ(P - m)) - σ(-κm)]      (σ = logistic, σ̂: 0 -> 1)
        d_t  = d0 - (d0 - d1) · σ̂(p)

    README values: ``d0 = 0.5``, ``d1 = 0.1``, ``interval = 100``, ``t_end = 8000`` (pruning end).
    Note the released code stops DST at ``0.75·steps`` < ``t_end`` and so never reaches ``d1``
    (spec §3 item 11); pass a ``t_end`` no later than the DST stop step to land exactly on ``d_final``.
    """
    _check_step(step)
    _check_window(t_start, t_end)
    _check_positive_int("interval", interval)
    _check_decay(d_init, d_final)
    if not (isinstance(steepness, (int, float)) and math.isfinite(steepness) and steepness > 0.0):
        raise ConfigError(
            f"steepness k of the sigmoid must be a finite number > 0, got {steepness!r}; "
            "the CHTss default is 6."
        )
    total_iters = max(1, (t_end - t_start) // interval)
    p = _progress(step, t_start, t_end, interval) * total_iters
    mid = total_iters / 2.0
    kappa = steepness / mid

    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    lo, hi = sig(-kappa * mid), sig(kappa * (total_iters - mid))
    shaped = (sig(kappa * (p - mid)) - lo) / (hi - lo)
    return float(d_init - (d_init - d_final) * shaped)


# ----------------------------------------------------------------------------------- registered rules
def _prune_then_remove(nnz: int, final: int, target: int, ctx: Any) -> tuple[int, int]:
    """Prune to the scheduled count first (relative importance), then remove ``floor(ζ · nnz)``."""
    from edgetune.sparse.removal import removal_count

    pruned = max(0, nnz - target)
    return pruned, removal_count(nnz - pruned, ctx.zeta)


def _sigmoid_at(step: int, ctx: Any) -> float:
    if ctx.initial_density == ctx.density:
        return ctx.density
    end = max(1, ctx.last_update)  # the last update lands on the final density
    return sigmoid_density(
        min(step, end),
        end,
        ctx.initial_density,
        ctx.density,
        steepness=ctx.steepness,
        interval=ctx.interval,
    )


def _register() -> None:
    from edgetune.sparse.strategies import DENSITY_SCHEDULES, DensitySchedule, summary_of

    rules = {
        "constant": (
            DensitySchedule(
                initial=lambda d, d0, o: d, at=lambda step, ctx: ctx.density, removal=_prune_then_remove
            ),
            "the density stays at sparse.density; each update removes zeta of the links",
        ),
        "sigmoid": (
            DensitySchedule(
                initial=lambda d, d0, o: d if d0 is None else d0,
                at=_sigmoid_at,
                removal=_prune_then_remove,
                uses_initial_density=True,
            ),
            (
                "CHTss: sigmoid decay from sparse.initial_density to sparse.density (steepness "
                "sparse.decay_steepness), pruning by relative importance before each update"
            ),
        ),
    }
    for name, (rule, text) in rules.items():
        DENSITY_SCHEDULES.add(name, rule, summary=summary_of(text, rule))


_register()
