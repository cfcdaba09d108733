"""A simulated greenhouse controller: pure state, time passed in, randomness from a seeded `random.Random`.

Each device has a temperature that relaxes towards a hot level while its fan is off and towards a
cold level while it is on, plus a random walk; and a humidity that drifts against the temperature.
Under the demo rule (raise above 30 °C and send fan on; clear below 26 °C and send fan off) a device
starting at 22-28 °C raises its first alarm within about 10 s, then one raise-and-clear cycle takes
8-20 s (12 s on average at 2 readings/s).

`reading(now)` returns the telemetry object a device publishes on `devices/{device_id}/telemetry`:

    {"ts": <epoch seconds float>, "seq": <int, from 1, +1 per reading>,
     "temperature": <°C>, "humidity": <%RH>, "fan": <bool>}

`handle(command, now)` answers a `Command` (from `devices/{device_id}/commands`) with the
`CommandAck` the device publishes on `devices/{device_id}/commands/ack`: `fan` with params
`{"on": true|false}` is acked "ok"; anything else is acked "error" with a detail.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from devices.command import AckStatus, Command, CommandAck
from devices.event import FieldValue

FAN_COMMAND = "fan"
HUMIDITY_RANGE = (5.0, 95.0)
# Humidity falls as the air warms; these keep it in a plausible greenhouse band around 35-60 %RH.
HUMIDITY_AT_20C = 60.0
HUMIDITY_PER_DEGREE = -0.9
HUMIDITY_TIME_CONSTANT = 30.0
HUMIDITY_NOISE = 0.3


@dataclass(frozen=True, slots=True)
class ThermalProfile:
    """How one device's temperature moves.

    Attributes:
        hot: °C the temperature relaxes towards while the fan is off.
        cold: °C it relaxes towards while the fan is on.
        time_constant: seconds for 63 % of the way to the target.
        noise: standard deviation of the random walk per √second, °C.
    """

    hot: float = 40.0
    cold: float = 18.0
    time_constant: float = 15.0
    noise: float = 0.15

    @classmethod
    def random(cls, rng: random.Random) -> ThermalProfile:
        """Draw a profile near the defaults, so devices in one run do not move in lockstep."""
        return cls(
            hot=rng.uniform(38.0, 42.0),
            cold=rng.uniform(17.0, 19.0),
            time_constant=rng.uniform(12.0, 18.0),
            noise=rng.uniform(0.1, 0.2),
        )


class SimulatedDevice:
    """One simulated device: its sensors, its fan and its telemetry sequence number.

    Args:
        device_id: the id in its topics and in its command acks.
        rng: the only source of randomness; seed it for a reproducible device.
        profile: the temperature dynamics; drawn from `rng` when omitted.
        temperature: the starting temperature; drawn from 22-28 °C when omitted.
        humidity: the starting humidity; derived from the temperature when omitted.
        fan_on: whether the fan starts on.
    """

    __slots__ = ("_last", "_rng", "device_id", "fan_on", "humidity", "profile", "seq", "temperature")

    def __init__(
        self,
        device_id: str,
        rng: random.Random,
        *,
        profile: ThermalProfile | None = None,
        temperature: float | None = None,
        humidity: float | None = None,
        fan_on: bool = False,
    ) -> None:
        self.device_id = device_id
        self._rng = rng
        self.profile = profile if profile is not None else ThermalProfile.random(rng)
        self.temperature = temperature if temperature is not None else rng.uniform(22.0, 28.0)
        self.humidity = humidity if humidity is not None else _humidity_target(self.temperature)
        self.fan_on = fan_on
        self.seq = 0  # of the last reading; the first reading is 1
        self._last: float | None = None

    def __repr__(self) -> str:
        fan = "on" if self.fan_on else "off"
        return f"SimulatedDevice({self.device_id!r}, {self.temperature:.2f} °C, fan {fan}, seq {self.seq})"

    def reading(self, now: float) -> dict[str, FieldValue]:
        """Advance to `now` (epoch seconds) and return the next telemetry payload object."""
        self.advance(now)
        self.seq += 1
        return {
            "ts": now,
            "seq": self.seq,
            "temperature": round(self.temperature, 2),
            "humidity": round(self.humidity, 1),
            "fan": self.fan_on,
        }

    def handle(self, command: Command, now: float) -> CommandAck:
        """Advance to `now`, obey `command` if it is one this device knows, and return the ack."""
        self.advance(now)  # the time before the command ran with the fan as it was
        if command.name != FAN_COMMAND:
            return self._ack(command, "error", f"unknown command {command.name!r}; this device knows 'fan'")
        on = command.params.get("on")
        if not isinstance(on, bool):
            return self._ack(command, "error", f"'fan' needs params.on true or false, got {on!r}")
        self.fan_on = on
        return self._ack(command, "ok")

    def advance(self, now: float) -> None:
        """Move the sensors forward to `now`; time that runs backwards is treated as no time."""
        if self._last is None:
            self._last = now
            return
        dt = now - self._last
        if dt <= 0.0:
            return
        self._last = now
        p = self.profile
        target = p.cold if self.fan_on else p.hot
        # Exact exponential relaxation, so the step size (publish rate, jitter) does not change the curve.
        self.temperature = target + (self.temperature - target) * math.exp(-dt / p.time_constant)
        self.temperature += self._rng.gauss(0.0, p.noise * math.sqrt(dt))
        h_target = _humidity_target(self.temperature)
        self.humidity = h_target + (self.humidity - h_target) * math.exp(-dt / HUMIDITY_TIME_CONSTANT)
        self.humidity += self._rng.gauss(0.0, HUMIDITY_NOISE * math.sqrt(dt))
        self.humidity = min(max(self.humidity, HUMIDITY_RANGE[0]), HUMIDITY_RANGE[1])

    def _ack(self, command: Command, status: AckStatus, detail: str = "") -> CommandAck:
        return CommandAck(command.id, self.device_id, status, detail)


def _humidity_target(temperature: float) -> float:
    target = HUMIDITY_AT_20C + HUMIDITY_PER_DEGREE * (temperature - 20.0)
    return min(max(target, HUMIDITY_RANGE[0]), HUMIDITY_RANGE[1])
