"""What one field of one simulated device reads over time: pure, time passed in, randomness from a seeded rng.

A field is built once per device from its `FieldSpec`, drawing every `a..b` range from the device's
`random.Random`; then `read(t, rng)` returns the value at epoch time `t` (readings come in time
order). A number is composed as

    value = base(t)                 constant | sine | daily | random walk
          + steps (add) + drift     a `set` step replaces the base from its time on
          + offset                  what commands did (see `apply`), fading back with `recovery`
          + spikes (add)            a `set` spike replaces the whole value while it runs
          + noise                   normal with sd `noise`, fresh for every reading
    then clamped to min/max and rounded.

A bool or text field reads its constant, overridden by steps, then by a command's `set`, then by
a running spike. Each reading draws from the rng in a fixed order (random walk, each spike, noise),
so the same seed and the same reading times give the same values. Commands (`apply`) never draw,
so when they arrive does not shift the sequence of anything else.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from devices.event import FieldValue
from simulator.fleet import EffectSpec, FieldSpec, SpikeSpec, Spread

DAY = 86_400.0
TAU = 2.0 * math.pi


def _concrete(value: bool | str | Spread, rng: random.Random) -> FieldValue:
    return value.draw(rng) if isinstance(value, Spread) else value


@dataclass(frozen=True, slots=True)
class Effect:
    """A command's effect on one field, with every range already drawn for one device.

    Attributes:
        kind: "set", "rate" (value in units per second), "target" (with time_constant) or "release".
        value: the value set, the rate, or the target.
        time_constant: seconds for 63 % of the way to a target (0: at once).
        duration: seconds the effect lasts; None lasts until the next effect on the field.
    """

    kind: str
    value: FieldValue = 0.0
    time_constant: float = 0.0
    duration: float | None = None

    @classmethod
    def resolve(cls, spec: EffectSpec, rng: random.Random) -> Effect:
        """Draw the effect's ranges for one device."""
        duration = spec.for_.draw(rng) if spec.for_ is not None else None
        if spec.release:
            return cls("release")
        if spec.rate is not None:
            return cls("rate", spec.rate, duration=duration)
        if spec.target is not None:
            return cls("target", spec.target.draw(rng), spec.time_constant.draw(rng), duration)
        assert spec.set is not None  # the spec validator allows exactly one of the four
        return cls("set", _concrete(spec.set, rng), duration=duration)


class Spike:
    """One spike definition of one field: which occurrence runs now, and its drawn size.

    Times are seconds since the run started. A scheduled occurrence that began between two
    readings still shows in the next one; missed repeats of `every` are skipped, not replayed.
    """

    __slots__ = ("_end", "_next", "_shown", "_value", "adds", "spec")

    def __init__(self, spec: SpikeSpec) -> None:
        self.spec = spec
        self.adds = spec.add is not None
        self._next: float | None = spec.at
        self._end: float | None = None  # when the running occurrence ends; None: none running
        self._shown = False
        self._value: FieldValue = 0.0

    def value(self, elapsed: float, rng: random.Random) -> FieldValue | None:
        """Return the spike's add (or set) value if it affects the reading at `elapsed`, else None."""
        if self._end is not None and self._shown and elapsed >= self._end:
            self._end = None
        spec = self.spec
        if spec.probability is None:
            start = self._next
            if start is not None and elapsed >= start:
                if spec.every is not None:  # the latest occurrence that has begun
                    start += math.floor((elapsed - start) / spec.every) * spec.every
                    self._next = start + spec.every
                else:
                    self._next = None
                self._begin(start, rng)
        elif self._end is None and rng.random() < spec.probability:
            self._begin(elapsed, rng)
        if self._end is None:
            return None
        self._shown = True
        return self._value

    def _begin(self, start: float, rng: random.Random) -> None:
        spec = self.spec
        self._end = start + spec.for_.draw(rng)
        self._shown = False
        if spec.add is not None:
            self._value = spec.add.draw(rng)
        else:
            assert spec.set is not None
            self._value = _concrete(spec.set, rng)


class FieldSignal:
    """A bool or text field: its constant, steps, a command's `set`, and spikes."""

    __slots__ = ("_constant", "_last", "_set", "_spikes", "_steps", "kind", "name", "start")

    def __init__(self, name: str, spec: FieldSpec, rng: random.Random, start: float) -> None:
        self.name = name
        self.kind = spec.kind
        self.start = start
        # (at, set value or None, add or 0.0), every range drawn once for this device
        self._steps: list[tuple[float, FieldValue | None, float]] = sorted(
            (
                (
                    step.at,
                    _concrete(step.set, rng) if step.set is not None else None,
                    step.add.draw(rng) if step.add is not None else 0.0,
                )
                for step in spec.steps
            ),
            key=lambda item: item[0],
        )
        self._spikes = [Spike(spike) for spike in spec.spikes]
        self._last: FieldValue | None = None
        self._set: tuple[FieldValue, float | None] | None = None  # a command's (value, ends at)
        self._constant: FieldValue = _concrete(spec.constant, rng) if spec.constant is not None else 0.0

    @staticmethod
    def build(name: str, spec: FieldSpec, rng: random.Random, start: float) -> FieldSignal:
        """Return the signal of `spec` for one device, drawing its ranges from `rng`.

        `start` is the epoch time at which the run began: `at` times count from it.
        """
        if spec.kind == "number":
            return NumberSignal(name, spec, rng, start)
        return FieldSignal(name, spec, rng, start)

    @property
    def last(self) -> FieldValue | None:
        """The value of the latest reading (None before the first)."""
        return self._last

    def read(self, t: float, rng: random.Random) -> FieldValue:
        """Return the value at epoch time `t`."""
        elapsed = t - self.start
        value = self._constant
        for at, set_value, _ in self._steps:
            if at > elapsed:
                break
            if set_value is not None:
                value = set_value
        if self._set is not None:
            set_value, ends = self._set
            if ends is None or t < ends:
                value = set_value
            else:
                self._set = None
        for spike in self._spikes:
            spiked = spike.value(elapsed, rng)
            if spiked is not None:
                value = spiked
        self._last = value
        return value

    def apply(self, effect: Effect, t: float) -> None:
        """Start `effect` (`set` or `release`) at epoch time `t`."""
        if effect.kind == "set":
            self._set = (effect.value, None if effect.duration is None else t + effect.duration)
        elif effect.kind == "release":
            self._set = None


class NumberSignal(FieldSignal):
    """A number field: base signal, steps, drift, command offset, spikes, noise, clamp and rounding."""

    __slots__ = (
        "_amplitude",
        "_base",
        "_drift",
        "_effect",
        "_effect_end",
        "_initial",
        "_level",
        "_max",
        "_mean",
        "_min",
        "_noise",
        "_offset",
        "_offset_t",
        "_peak",
        "_period",
        "_phase",
        "_recovery",
        "_round",
        "_walk",
        "_walk_max",
        "_walk_min",
        "_walk_step",
        "_walk_t",
    )

    def __init__(self, name: str, spec: FieldSpec, rng: random.Random, start: float) -> None:
        super().__init__(name, spec, rng, start)
        self._mean = self._amplitude = self._period = self._phase = self._peak = 0.0
        self._walk = self._walk_step = 0.0
        self._walk_min: float | None = None
        self._walk_max: float | None = None
        self._walk_t: float | None = None
        if spec.constant is not None:
            self._base = "constant"
            self._mean = float(self._constant)
        elif spec.sine is not None:
            self._base = "sine"
            self._mean, self._amplitude = spec.sine.mean.draw(rng), spec.sine.amplitude.draw(rng)
            self._period, self._phase = spec.sine.period.draw(rng), spec.sine.phase.draw(rng)
        elif spec.daily is not None:
            self._base = "daily"
            self._mean, self._amplitude = spec.daily.mean.draw(rng), spec.daily.amplitude.draw(rng)
            self._peak = spec.daily.peak
        else:
            walk = spec.random_walk
            assert walk is not None  # the spec validator allows exactly one base
            self._base = "walk"
            self._walk, self._walk_step = walk.start.draw(rng), walk.step.draw(rng)
            self._walk_min, self._walk_max = walk.min, walk.max
        self._drift = spec.drift
        self._noise = spec.noise.draw(rng)
        self._initial = spec.initial.draw(rng) if spec.initial is not None else None
        self._recovery = spec.recovery.draw(rng)
        self._min, self._max, self._round = spec.min, spec.max, spec.round
        self._offset = 0.0  # what commands (and `initial`) add to the signal
        self._offset_t: float | None = None  # when _offset was last brought up to date
        self._level: float | None = None  # the signal (without offset, spikes, noise) at the last reading
        self._effect: Effect | None = None
        self._effect_end: float | None = None

    def read(self, t: float, rng: random.Random) -> float:
        """Return the value at epoch time `t`."""
        elapsed = t - self.start
        level = self._signal(t, elapsed, rng)
        for at, set_value, add in self._steps:
            if at > elapsed:
                break
            if set_value is not None:
                level = float(set_value)
            level += add
        level += self._drift * elapsed
        if self._level is None and self._initial is not None:
            self._offset = self._initial - level  # the first reading is `initial`; it fades to the signal
        self._advance(t, level)
        self._level = level
        value = level + self._offset
        replaced = False
        for spike in self._spikes:
            spiked = spike.value(elapsed, rng)
            if spiked is None:
                continue
            if spike.adds:
                value += float(spiked)
            else:
                value, replaced = float(spiked), True
        if self._noise > 0.0:
            noise = rng.gauss(0.0, self._noise)  # drawn either way, so a spike does not shift the sequence
            if not replaced:
                value += noise
        if self._min is not None and value < self._min:
            value = self._min
        if self._max is not None and value > self._max:
            value = self._max
        value = round(value, self._round)
        self._last = value
        return value

    def _signal(self, t: float, elapsed: float, rng: random.Random) -> float:
        base = self._base
        if base == "constant":
            return self._mean
        if base == "sine":
            return self._mean + self._amplitude * math.sin(TAU * (elapsed + self._phase) / self._period)
        if base == "daily":
            return self._mean + self._amplitude * math.cos(TAU * ((t % DAY) - self._peak) / DAY)
        last = self._walk_t
        if last is not None and t > last and self._walk_step > 0.0:
            walk = self._walk + rng.gauss(0.0, self._walk_step * math.sqrt(t - last))
            low, high = self._walk_min, self._walk_max
            # Reflect at the bounds so the walk does not stick to them; clamp after a huge step.
            if high is not None and walk > high:
                walk = 2.0 * high - walk
            if low is not None and walk < low:
                walk = 2.0 * low - walk
            if high is not None and walk > high:
                walk = high
            self._walk = walk
        if last is None or t > last:
            self._walk_t = t
        return self._walk

    def _advance(self, t: float, level: float) -> None:
        """Bring the command offset from its last update to `t`, with the signal at `level` meanwhile."""
        if self._offset_t is None:
            self._offset_t = t
            return
        while self._offset_t < t:
            effect, end = self._effect, self._effect_end
            until = t if end is None or end >= t else max(end, self._offset_t)
            dt = until - self._offset_t
            if effect is None:
                tau = self._recovery
                self._offset = self._offset * math.exp(-dt / tau) if tau > 0.0 else 0.0
            elif effect.kind == "rate":
                self._offset += float(effect.value) * dt
            else:  # target, and set (a target reached at once)
                goal = float(effect.value) - level
                tau = effect.time_constant
                self._offset = goal + (self._offset - goal) * math.exp(-dt / tau) if tau > 0.0 else goal
            self._offset_t = until
            if end is not None and until >= end:
                self._effect = self._effect_end = None

    def apply(self, effect: Effect, t: float) -> None:
        """Start `effect` at epoch time `t`; it replaces the effect the field had, if any."""
        if self._level is not None:
            self._advance(t, self._level)
        if self._offset_t is not None and self._offset_t < t:
            self._offset_t = t
        if effect.kind == "release":
            self._effect = self._effect_end = None
            return
        if effect.kind == "set":
            effect = Effect("target", effect.value, 0.0, effect.duration)
        self._effect = effect
        self._effect_end = None if effect.duration is None else t + effect.duration
