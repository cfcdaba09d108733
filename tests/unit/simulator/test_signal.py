"""Field signals: each shape, noise, drift, steps, spikes and command effects, with explicit times."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

import pytest

from simulator.fleet import EffectSpec, FieldSpec
from simulator.signal import Effect, FieldSignal, NumberSignal

T0 = 1_764_000_000.0  # 2025-11-24T16:00:00Z
HOUR = 3600.0


def signal(seed: int = 1, **spec: Any) -> FieldSignal:
    return FieldSignal.build("x", FieldSpec.model_validate(spec), random.Random(seed), T0)


def series(field: FieldSignal, times: Sequence[float], seed: int = 1) -> list[Any]:
    rng = random.Random(seed)
    return [field.read(T0 + t, rng) for t in times]


def effect(**spec: Any) -> Effect:
    return Effect.resolve(EffectSpec.model_validate(spec), random.Random(0))


def test_constant_number_bool_and_text() -> None:
    assert series(signal(constant=21.5), [0, 10, 1e5]) == [21.5, 21.5, 21.5]
    assert series(signal(constant=True), [0, 10]) == [True, True]
    assert series(signal(constant="4.2.1"), [0, 10]) == ["4.2.1", "4.2.1"]


def test_a_range_is_drawn_once_per_device_within_it() -> None:
    values = {series(signal(seed, constant="18..22"), [0, 60])[0] for seed in range(50)}
    assert len(values) > 40 and all(18.0 <= v <= 22.0 for v in values)
    one = series(signal(3, constant="18..22"), [0, 60, 120])
    assert len(set(one)) == 1


def test_sine_has_its_period_amplitude_and_phase() -> None:
    field = signal(sine={"mean": 10, "amplitude": 2, "period": "1h", "phase": "15m"}, round=6)
    quarter = HOUR / 4
    values = series(field, [0, quarter, 2 * quarter, 3 * quarter, HOUR])
    # phase 15m: t=0 is already a quarter period in, at the top
    assert values == pytest.approx([12.0, 10.0, 8.0, 10.0, 12.0], abs=1e-6)


def test_daily_cycle_peaks_at_its_utc_hour_and_bottoms_twelve_hours_later() -> None:
    field = signal(daily={"mean": 20, "amplitude": 5, "peak": "14:00"}, round=6)
    day_start = T0 - T0 % 86400
    rng = random.Random(0)
    hourly = [field.read(day_start + h * HOUR, rng) for h in range(24)]
    assert max(range(24), key=lambda h: hourly[h]) == 14 and hourly[14] == pytest.approx(25.0)
    assert min(range(24), key=lambda h: hourly[h]) == 2 and hourly[2] == pytest.approx(15.0)


def test_random_walk_stays_in_its_bounds_and_spreads_with_the_square_root_of_time() -> None:
    field = signal(random_walk={"start": 50, "step": 1, "min": 40, "max": 60}, round=6)
    values = series(field, [float(t) for t in range(5000)])
    assert values[0] == 50.0 and all(40.0 <= v <= 60.0 for v in values)
    assert min(values) < 45 and max(values) > 55  # it does wander
    # Unbounded, the change over dt seconds has sd step * sqrt(dt) whatever the reading interval.
    for dt in (1.0, 4.0):
        changes = []
        for seed in range(400):
            walk = signal(seed, random_walk={"start": 0, "step": 0.5}, round=9)
            first, second = series(walk, [0.0, dt], seed)
            changes.append(second - first)
        assert statistics.stdev(changes) == pytest.approx(0.5 * math.sqrt(dt), rel=0.12)


def test_noise_has_its_standard_deviation_around_the_signal() -> None:
    values = series(signal(constant=20, noise=0.5, round=6), [float(t) for t in range(4000)])
    assert statistics.mean(values) == pytest.approx(20.0, abs=0.05)
    assert statistics.stdev(values) == pytest.approx(0.5, rel=0.06)


def test_drift_is_linear_in_time_since_the_start() -> None:
    values = series(signal(constant=0, drift="2/h", round=6), [0, HOUR, 3 * HOUR])
    assert values == pytest.approx([0.0, 2.0, 6.0])


def test_steps_add_or_set_from_their_time_on() -> None:
    field = signal(
        constant=10, steps=[{"at": "1m", "add": 5}, {"at": "2m", "set": 0}, {"at": "3m", "add": 1}]
    )
    assert series(field, [0, 59, 60, 119, 120, 180, 999]) == [10, 10, 15, 15, 0, 1, 1]
    text = signal(constant="1.0", steps=[{"at": "10m", "set": "1.1"}])
    assert series(text, [0, 599, 600]) == ["1.0", "1.0", "1.1"]


def test_min_max_clamp_and_round() -> None:
    field = signal(constant=10, steps=[{"at": 10, "add": 100}], max=85, round=0)
    assert series(field, [0, 10]) == [10.0, 85.0]
    assert series(signal(constant=1.23456, round=3), [0]) == [1.235]


def test_a_scheduled_spike_runs_for_its_duration_and_repeats_every() -> None:
    field = signal(constant=0, spikes=[{"at": "1m", "every": "10m", "for": "30s", "add": 7}])
    times = [0, 59, 60, 89, 90, 599, 660, 689, 690, 1260]
    assert series(field, times) == [0, 0, 7, 7, 0, 0, 7, 7, 0, 7]


def test_a_spike_always_shows_in_at_least_one_reading() -> None:
    # readings every 60 s never land inside a 5 s spike at 90 s: the next reading still shows it
    field = signal(constant=0, spikes=[{"at": 90, "for": "5s", "add": 3}])
    assert series(field, [0, 60, 120, 180]) == [0, 0, 3, 0]
    one_reading = signal(constant=False, spikes=[{"at": 30, "set": True}])
    assert series(one_reading, [0, 20, 40, 60]) == [False, False, True, False]


def test_a_set_spike_replaces_the_value_noise_and_all() -> None:
    field = signal(constant=20, noise=1, spikes=[{"at": 10, "for": 20, "set": -5}])
    values = series(field, [0, 10, 20, 30])
    assert values[1:3] == [-5.0, -5.0] and values[0] != 20.0 and values[3] != -5.0


def test_random_spikes_start_at_their_probability_per_reading() -> None:
    field = signal(constant=0, spikes=[{"probability": "2%", "add": 1}])
    values = series(field, [float(t) for t in range(20000)])
    assert sum(values) / len(values) == pytest.approx(0.02, rel=0.15)
    # A 10 s spike read every second covers 10 readings; a new one starts only once it is over
    # (possibly at the very next reading), so runs of spiked readings are whole multiples of 10.
    long = signal(constant=0, spikes=[{"probability": "1%", "for": "10s", "add": 1}])
    values = series(long, [float(t) for t in range(20000)])
    runs = [len(run) for run in "".join("1" if v else "0" for v in values).split("0") if run]
    assert len(runs) > 50 and all(run % 10 == 0 for run in runs) and runs.count(10) > len(runs) / 2


def test_spike_sizes_are_drawn_per_spike() -> None:
    field = signal(constant=0, spikes=[{"at": 0, "every": 10, "add": "5..9"}])
    values = series(field, [float(t) for t in range(0, 500, 10)])
    assert all(5 <= v <= 9 for v in values) and len(set(values)) > 20


def test_a_rate_effect_changes_the_value_for_its_duration_then_recovers() -> None:
    field = signal(constant=20, recovery="60s", round=6)
    assert isinstance(field, NumberSignal)
    rng = random.Random(0)
    assert field.read(T0, rng) == 20.0
    field.apply(effect(rate=-0.5, **{"for": "60s"}), T0)
    assert field.read(T0 + 30, rng) == pytest.approx(5.0)
    assert field.read(T0 + 60, rng) == pytest.approx(-10.0)  # -0.5/s for 60 s
    # then the offset of -30 fades with the recovery time constant
    assert field.read(T0 + 120, rng) == pytest.approx(20 - 30 * math.exp(-1), abs=1e-6)


def test_a_target_effect_relaxes_towards_it_and_release_returns_to_the_signal() -> None:
    field = signal(constant=30, recovery="100s", round=6)
    rng = random.Random(0)
    field.read(T0, rng)
    field.apply(effect(target=20, time_constant="50s"), T0)
    assert field.read(T0 + 50, rng) == pytest.approx(20 + 10 * math.exp(-1), abs=1e-6)
    assert field.read(T0 + 1000, rng) == pytest.approx(20.0, abs=1e-6)
    field.apply(effect(release=True), T0 + 1000)
    assert field.read(T0 + 1100, rng) == pytest.approx(30 - 10 * math.exp(-1), abs=1e-6)


def test_an_effect_between_readings_starts_when_applied() -> None:
    field = signal(constant=0, round=6)
    rng = random.Random(0)
    field.read(T0, rng)
    field.apply(effect(rate=1), T0 + 7)  # a command at 7 s: 3 s of effect by the reading at 10 s
    assert field.read(T0 + 10, rng) == pytest.approx(3.0)


def test_set_effects_on_bool_and_text_last_for_their_duration_or_until_released() -> None:
    fan = signal(constant=False)
    rng = random.Random(0)
    fan.apply(effect(set=True, **{"for": "1m"}), T0)
    assert [fan.read(T0 + t, rng) for t in (0, 59, 60)] == [True, True, False]
    fan.apply(effect(set=True), T0 + 100)
    assert fan.read(T0 + 5000, rng) is True
    fan.apply(effect(release=True), T0 + 5000)
    assert fan.read(T0 + 5001, rng) is False


def test_initial_is_the_first_reading_and_fades_into_the_signal() -> None:
    field = signal(constant=40, initial=25, recovery="15s", round=6)
    values = series(field, [0, 15, 1000])
    assert values == pytest.approx([25.0, 40 - 15 * math.exp(-1), 40.0], abs=1e-6)


def test_same_seed_same_values_and_commands_do_not_shift_the_random_sequence() -> None:
    spec: dict[str, Any] = {
        "random_walk": {"start": 0, "step": 1},
        "noise": 0.3,
        "spikes": [{"probability": "5%", "add": 3}],
    }
    times = [float(t) for t in range(200)]
    assert series(signal(4, **spec), times, 4) == series(signal(4, **spec), times, 4)
    assert series(signal(4, **spec), times, 4) != series(signal(5, **spec), times, 5)
    plain, commanded = signal(4, **spec), signal(4, **spec)
    rng_a, rng_b = random.Random(4), random.Random(4)
    a = [plain.read(T0 + t, rng_a) for t in times]
    b = []
    for t in times:
        if t == 100:
            commanded.apply(effect(rate=0.0), T0 + t)  # a command with no effect on the value
        b.append(commanded.read(T0 + t, rng_b))
    assert a == b
