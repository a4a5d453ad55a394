"""Schedules of dynamic sparse training: endpoints, hand-computed values, monotonicity, validation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from edgetune.core.errors import ConfigError
from edgetune.sparse.schedules import (
    constant_density,
    constant_zeta,
    cosine_zeta,
    cubic_density,
    last_update_step,
    linear_density,
    removal_temperature,
    sigmoid_density,
    stop_step,
    update_due,
)


def test_stop_step_floors_with_float_guard() -> None:
    assert stop_step(1000) == 750
    assert stop_step(10, 0.7) == 7
    assert stop_step(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert stop_step(7, 1.0) == 7


def test_update_due_every_interval_until_t_end() -> None:
    due = [s for s in range(1001) if update_due(s, 100, 0.75, 1000)]
    assert due == [100, 200, 300, 400, 500, 600, 700]
    # as rigl-torch and the official CHT code (step < T_end): T_end itself has no update
    assert update_due(700, 50, 0.75, 1000) and not update_due(750, 50, 0.75, 1000)
    assert not update_due(800, 50, 0.75, 1000)
    assert [last_update_step(750, 50), last_update_step(751, 50), last_update_step(749, 50)] == [700, 750, 700]
    assert last_update_step(140625, 1875) == 138750  # CHT MLP, 100 epochs: the final update ends epoch 74
    assert not update_due(0, 1, 1.0, 10)


def test_cosine_zeta_endpoints_and_hand_values() -> None:
    assert cosine_zeta(0, 300, 0.3) == pytest.approx(0.3)
    assert cosine_zeta(100, 300, 0.3) == pytest.approx(0.3 * 0.75)  # cos(pi/3) = 1/2
    assert cosine_zeta(150, 300, 0.3) == pytest.approx(0.15)
    assert cosine_zeta(300, 300, 0.3) == pytest.approx(0.0, abs=1e-15)
    assert cosine_zeta(400, 300, 0.3) == pytest.approx(0.0, abs=1e-15)
    values = [cosine_zeta(t, 300, 0.3) for t in range(301)]
    assert np.all(np.diff(values) <= 1e-15)
    assert constant_zeta(123, 0.3) == 0.3


def test_removal_temperature_linear_and_clamped() -> None:
    assert removal_temperature(0, 100) == pytest.approx(1.0)
    assert removal_temperature(50, 100) == pytest.approx(2.0)
    assert removal_temperature(100, 100) == pytest.approx(3.0)
    assert removal_temperature(500, 100) == pytest.approx(3.0)
    assert removal_temperature(25, 100, 1.0, 9.0) == pytest.approx(3.0)  # LLM README values
    values = [removal_temperature(t, 100) for t in range(120)]
    assert np.all(np.diff(values) >= 0)


def test_sigmoid_density_hand_values_readme_settings() -> None:
    # README CHTss: d0=0.5 -> d1=0.1, ΔT=100, pruning end 8000 -> P=80, m=40, κ=6/40.
    f = lambda s: sigmoid_density(s, 8000, 0.5, 0.1, steepness=6.0, interval=100)
    assert f(0) == pytest.approx(0.5, abs=1e-12)
    assert f(8000) == pytest.approx(0.1, abs=1e-12)
    assert f(4000) == pytest.approx(0.3, abs=1e-12)  # symmetric sigmoid: midpoint is the mean
    # p=20: σ(−3)=0.0474259, σ(−6)=0.0024726, σ(6)=0.9975274 -> σ̂=0.0451767 -> d=0.5−0.4·σ̂
    assert f(2000) == pytest.approx(0.481929336, abs=1e-8)
    # The released code stops DST at 7500 < 8000: density stays at ≈10.11% (spec §1.8 / §3 item 11).
    assert f(7500) == pytest.approx(0.1011045, abs=1e-6)
    # piecewise constant between pruning iterations, clamped outside the window
    assert f(2000) == f(2099)
    assert f(9000) == f(8000)


def test_sigmoid_density_matches_released_code_expression() -> None:
    # The released scheduler writes the normalisation as (x − 0.5)·scale + 0.5; both agree when m = P/2.
    total, k = 80, 6.0
    mid = total / 2.0
    kk = k / mid
    a0, a1 = 1 / (1 + math.exp(kk * mid)), 1 / (1 + math.exp(-kk * (total - mid)))
    for p in range(total + 1):
        x = 1 / (1 + math.exp(-kk * (p - mid)))
        released = (0.9 - 0.5) * ((x - 0.5) / (a1 - a0) + 0.5) + 0.5  # sparsity 0.5 -> 0.9
        assert 1.0 - sigmoid_density(p * 100, 8000, 0.5, 0.1, interval=100) == pytest.approx(
            released, abs=1e-12
        )


def test_density_decays_monotone_between_endpoints() -> None:
    steps = range(0, 1201, 7)
    for f in (
        lambda s: sigmoid_density(s, 1000, 0.6, 0.05, steepness=4.0, interval=10, t_start=100),
        lambda s: cubic_density(s, 100, 1000, 0.6, 0.05, interval=10),
        lambda s: linear_density(s, 100, 1000, 0.6, 0.05, interval=10),
    ):
        values = [f(s) for s in steps]
        assert np.all(np.diff(values) <= 1e-15)
        assert f(0) == pytest.approx(0.6) and f(100) == pytest.approx(0.6)
        assert f(1000) == pytest.approx(0.05) and f(1200) == pytest.approx(0.05)


def test_cubic_and_linear_hand_values() -> None:
    # halfway: cubic d1 + (d0 − d1)·(1/2)^3, linear the mean
    assert cubic_density(500, 0, 1000, 0.5, 0.1) == pytest.approx(0.1 + 0.4 * 0.125)
    assert cubic_density(250, 0, 1000, 0.5, 0.1) == pytest.approx(0.1 + 0.4 * 0.75**3)
    assert linear_density(500, 0, 1000, 0.5, 0.1) == pytest.approx(0.3)
    # GraNet's cubic prunes fast from the start; the CHTss sigmoid starts slowly: cubic <= sigmoid inside
    for s in range(100, 8000, 100):
        assert cubic_density(s, 0, 8000, 0.5, 0.1, 100) < sigmoid_density(s, 8000, 0.5, 0.1, interval=100)


def test_constant_density() -> None:
    assert constant_density(5, 0.01) == 0.01
    assert constant_density(0, 1.0) == 1.0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_names_the_value(bad: float) -> None:
    with pytest.raises(ConfigError, match=r"density.*" + re.escape(repr(bad))):
        constant_density(0, bad)
    with pytest.raises(ConfigError, match="d_init"):
        sigmoid_density(0, 100, bad, 0.01)


def test_decay_direction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"d_final=0\.5.*d_init=0\.1"):
        sigmoid_density(0, 100, 0.1, 0.5)
    with pytest.raises(ConfigError, match="d_final"):
        cubic_density(0, 0, 100, 0.1, 0.5)
    with pytest.raises(ConfigError, match="d_final"):
        linear_density(0, 0, 100, 0.1, 0.5)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: cosine_zeta(0, 100, 1.0), "zeta"),
        (lambda: cosine_zeta(-1, 100, 0.3), "step"),
        (lambda: cosine_zeta(0, 0, 0.3), "t_end"),
        (lambda: update_due(10, 0, 0.75, 100), "interval"),
        (lambda: update_due(10, 10, 0.0, 100), "stop_fraction"),
        (lambda: update_due(10, 10, 1.5, 100), "stop_fraction"),
        (lambda: removal_temperature(0, 10, -1.0, 3.0), "t_start"),
        (lambda: sigmoid_density(0, 100, 0.5, 0.1, steepness=0.0), "steepness"),
        (lambda: cubic_density(0, 100, 100, 0.5, 0.1), "t_end"),
    ],
)
def test_bad_schedule_arguments(call, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=needle):
        call()
