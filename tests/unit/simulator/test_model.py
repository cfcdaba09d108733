"""The simulated device model: readings, sequence numbers, fan physics and command handling."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from devices.command import Command
from devices.event import FieldValue
from devices.payload import PayloadDecoder
from simulator.model import SimulatedDevice, ThermalProfile

T0 = 1_764_000_000.0  # epoch seconds; inside the decoder's accepted window
STILL = ThermalProfile(hot=40.0, cold=18.0, time_constant=15.0, noise=0.0)


def device(seed: int = 1, **kwargs: Any) -> SimulatedDevice:
    return SimulatedDevice("gh-1", random.Random(seed), **kwargs)


def fan(on: object, command_id: str = "c1") -> Command:
    return Command(command_id, "gh-1", "fan", {"on": on}, T0)


def readings(d: SimulatedDevice, seconds: float, step: float = 0.5) -> list[dict[str, FieldValue]]:
    return [d.reading(T0 + i * step) for i in range(int(seconds / step) + 1)]


def test_same_seed_same_readings_other_seed_other_readings() -> None:
    first = readings(device(seed=7), 20)
    assert readings(device(seed=7), 20) == first
    assert readings(device(seed=8), 20) != first


def test_seq_starts_at_1_and_increments_by_one_per_reading() -> None:
    d = device()
    assert [r["seq"] for r in readings(d, 5)] == list(range(1, 12))
    assert d.seq == 11


def test_reading_is_a_telemetry_payload_the_gateway_decodes() -> None:
    d = device()
    d.reading(T0)
    reading = d.reading(T0 + 0.5)
    [event] = PayloadDecoder().decode("gh-1", json.dumps(reading).encode(), T0 + 0.6)
    assert event.ts == T0 + 0.5
    assert event.seq == 2
    assert set(event.fields) == {"temperature", "humidity", "fan"}
    assert event.fields["fan"] is False


def test_first_reading_reports_the_starting_state() -> None:
    d = device(temperature=24.0, humidity=50.0, profile=STILL)
    assert d.reading(T0) == {"ts": T0, "seq": 1, "temperature": 24.0, "humidity": 50.0, "fan": False}


@pytest.mark.parametrize("seed", range(10))
def test_fan_off_heats(seed: int) -> None:
    d = device(seed, temperature=25.0)
    readings(d, 10)
    assert d.temperature > 28.0  # noise-free: 32.3 °C after 10 s


@pytest.mark.parametrize("seed", range(10))
def test_fan_on_cools(seed: int) -> None:
    d = device(seed, temperature=32.0, fan_on=True)
    readings(d, 10)
    assert d.temperature < 28.0  # noise-free: 24.9 °C after 10 s


def test_noise_free_temperature_follows_the_profile_exactly() -> None:
    d = device(temperature=25.0, profile=STILL)
    d.reading(T0)
    # 40 - 15 * exp(-15 / 15): one time constant takes 63 % of the way to the hot level
    assert d.reading(T0 + 15.0)["temperature"] == pytest.approx(34.48, abs=0.01)


def test_step_size_does_not_change_the_noise_free_curve() -> None:
    coarse, fine = device(temperature=25.0, profile=STILL), device(temperature=25.0, profile=STILL)
    readings(coarse, 12, step=4.0)
    readings(fine, 12, step=0.1)
    assert coarse.temperature == pytest.approx(fine.temperature, rel=1e-9)
    assert coarse.temperature > 30.0


def test_time_running_backwards_changes_nothing() -> None:
    d = device(temperature=25.0, profile=STILL)
    d.reading(T0 + 10)
    assert d.reading(T0)["temperature"] == 25.0


def test_fan_command_switches_the_fan_and_is_acked_ok() -> None:
    d = device()
    ack = d.handle(fan(True, "abc123"), T0)
    assert (ack.id, ack.device_id, ack.status, ack.detail) == ("abc123", "gh-1", "ok", "")
    assert d.fan_on is True
    assert d.reading(T0 + 1)["fan"] is True
    assert d.handle(fan(False), T0 + 2).status == "ok"
    assert d.fan_on is False


def test_command_time_splits_heating_and_cooling() -> None:
    d = device(temperature=25.0, profile=STILL)
    d.reading(T0)
    d.handle(fan(True), T0 + 15.0)  # 15 s of heating first
    assert d.temperature == pytest.approx(34.48, abs=0.01)
    assert d.reading(T0 + 30.0)["temperature"] == pytest.approx(18 + (34.48 - 18) * 0.3679, abs=0.01)


def test_unknown_command_is_acked_with_an_error_and_changes_nothing() -> None:
    d = device()
    ack = d.handle(Command("x9", "gh-1", "open_window", {}, T0), T0)
    assert (ack.id, ack.status) == ("x9", "error")
    assert "open_window" in ack.detail
    assert d.fan_on is False
    assert json.loads(ack.encode()) == {"id": "x9", "status": "error", "detail": ack.detail}


@pytest.mark.parametrize("params", [{}, {"on": "yes"}, {"on": 1}, {"speed": "high"}])
def test_fan_without_a_boolean_on_is_an_error(params: dict[str, object]) -> None:
    d = device()
    ack = d.handle(Command("c", "gh-1", "fan", params, T0), T0)
    assert ack.status == "error" and "params.on" in ack.detail
    assert d.fan_on is False


def test_humidity_stays_in_range() -> None:
    values = [float(r["humidity"]) for r in readings(device(3), 600, step=5.0)]
    assert all(5.0 <= v <= 95.0 for v in values)
    assert max(values) - min(values) > 1.0  # it does move


@pytest.mark.parametrize("seed", range(20))
def test_demo_rule_alarms_fire_and_clear_repeatedly(seed: int) -> None:
    """Drive a device with the demo's rule (fan on above 30 °C, off below 26 °C) for a simulated minute."""
    d = device(seed)
    alarm, raised, cleared, first_raise = False, 0, 0, None
    for i in range(120):  # 2 readings/s
        now = T0 + i * 0.5
        temperature = d.reading(now)["temperature"]
        assert isinstance(temperature, float)
        if not alarm and temperature > 30:
            alarm, raised = True, raised + 1
            first_raise = now - T0 if first_raise is None else first_raise
            assert d.handle(fan(True, f"on{i}"), now + 0.05).status == "ok"
        elif alarm and temperature < 26:
            alarm, cleared = False, cleared + 1
            assert d.handle(fan(False, f"off{i}"), now + 0.05).status == "ok"
    assert first_raise is not None and first_raise <= 15.0
    assert raised >= 3 and cleared >= 3  # a raise-and-clear cycle every 8-20 s
