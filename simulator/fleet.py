"""The fleet file: which simulated devices exist, what their fields read, how they fail, how they obey.

Pure: `parse_fleet(text, file)` turns YAML text into a `Fleet`, or raises `SourceFileError` listing
every problem with file:line:column. README "Simulator" documents the format; in short:

    seed: 7                                  # default for --seed
    types:                                   # what a kind of device sends and does
      greenhouse:
        interval: 5s                         # one reading every 5 s ...
        jitter: 10%                          # ... each interval drawn within ±10 %
        clock_skew: -2s..2s                  # each device's clock is off by a fixed amount in this range
        fields:
          temperature:
            daily: {mean: 24, amplitude: 6, peak: "14:00"}
            noise: 0.2
          fan: {constant: false}
        commands:
          fan:
            - params: {on: true}
              effects: {fan: {set: true}, temperature: {target: 20, time_constant: 3m}}
        faults:
          malformed: {rate: 1%}
    groups:                                  # the devices: a type, ids, tags, and overrides
      - {type: greenhouse, ids: "greenhouse-{001..020}", tags: {site: north}}

Numbers written `a..b` (and durations `30s..2m`) are drawn once per device, uniformly, so devices of
one group differ; spike sizes are drawn per spike. Times (`at`) count from the start of the run.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.functional_validators import BeforeValidator, PlainValidator
from pydantic_core import PydanticCustomError

from devices.errors import Problem, SourceFileError
from devices.payload import FIELD_NAME_RE
from devices.topic import is_valid_device_id
from devices.yamlsource import LocatedDocument, PathItem

MAX_DEVICES = 1_000_000
MAX_FIELDS = 100  # what the gateway accepts in one payload
COMMAND_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
TYPE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE_RE = re.compile(rf"\s*({_NUMBER})\s*\.\.\s*({_NUMBER})\s*\Z")
_ID_RANGE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_RATE_RE = re.compile(rf"\s*({_NUMBER})\s*/\s*(s|m|h|d)\s*\Z")
_TIME_OF_DAY_RE = re.compile(r"\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*\Z")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# The duration syntax of rule files (rules/duration.py), kept here so the simulator needs only devices/.
_DURATION_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d)"
_DURATION_RE = re.compile(rf"\s*(?:{_DURATION_PART})+\s*\Z")
_DURATION_PART_RE = re.compile(_DURATION_PART)
_DURATION_UNITS = {"ms": 0.001, **_RATE_UNITS}
EXPECTED_DURATION = "a duration like 30s, 5m, 1m30s, 2h or 250ms, or a number of seconds"
MAX_DURATION = 366 * 86400.0

MalformedKind = Literal["bad_json", "nan", "wrong_type", "oversize", "not_utf8", "empty"]
DEFAULT_MALFORMED_KINDS: tuple[MalformedKind, ...] = ("bad_json", "nan", "wrong_type", "oversize")
FieldKind = Literal["number", "bool", "string"]


# -- value types ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spread:
    """A number fixed in the file (`low == high`) or drawn uniformly from `low..high`."""

    low: float
    high: float

    def draw(self, rng: Any) -> float:
        """Return the fixed value, or a uniform draw from `rng` (a `random.Random`)."""
        return self.low if self.low == self.high else float(rng.uniform(self.low, self.high))

    def __str__(self) -> str:
        return f"{self.low:g}" if self.low == self.high else f"{self.low:g}..{self.high:g}"


def _error(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError
    return float(value)


def _spread(value: object) -> Spread:
    expected = "expected a number, or a range like 18..22 drawn once per device"
    if isinstance(value, str):
        match = _RANGE_RE.match(value)
        if match is None:
            raise _error("number_or_range", expected)
        low, high = float(match.group(1)), float(match.group(2))
    else:
        try:
            low = high = _number(value)
        except ValueError:
            raise _error("number_or_range", expected) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise _error("number_or_range", f"{expected}, with the lower end first")
    return Spread(low, high)


def parse_duration(value: object) -> float:
    """Return `value` (`5m`, `30s`, `1m30s`, `90`, ...) in seconds, or raise `ValueError`."""
    if isinstance(value, bool):
        raise ValueError(f"expected {EXPECTED_DURATION}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.match(value):
        seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART_RE.findall(value))
    else:
        raise ValueError(f"expected {EXPECTED_DURATION}")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION:
        raise ValueError(f"expected {EXPECTED_DURATION}, from 0 to 366d")
    return seconds


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _error("duration", str(exc)) from None


def _positive_duration(value: object) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise _error("duration", "expected a duration greater than 0, like 500ms, 5s or 1m")
    return seconds


def _signed_duration(text: str) -> float:
    text = text.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    return sign * parse_duration(text.lstrip("+-"))


def _duration_spread(value: object, *, signed: bool = False) -> Spread:
    expected = (
        "expected a duration like 30s, or a range like 30s..2m drawn per device"
        if not signed
        else "expected a duration like 2s or -1s, or a range like -2s..2s drawn per device"
    )
    try:
        if isinstance(value, str) and ".." in value:
            first, _, second = value.partition("..")
            if signed:
                low, high = _signed_duration(first), _signed_duration(second)
            else:
                low, high = parse_duration(first), parse_duration(second)
        elif isinstance(value, str) and signed:
            low = high = _signed_duration(value)
        elif signed and not isinstance(value, str):
            low = high = _number(value)
        else:
            low = high = parse_duration(value)
    except ValueError:
        raise _error("duration_range", expected) from None
    if low > high:
        raise _error("duration_range", f"{expected}, with the lower end first")
    return Spread(low, high)


def _count_spread(value: object) -> Spread:
    expected = "expected a whole number of readings like 2, or a range like 1..3"
    spread = _spread(value) if not isinstance(value, bool) else None
    if spread is None or spread.low < 1 or spread.low != int(spread.low) or spread.high != int(spread.high):
        raise _error("count_range", expected)
    return spread


def _fraction(value: object) -> float:
    expected = "expected a fraction like 2% or 0.02, from 0 to 1"
    try:
        if isinstance(value, str) and value.strip().endswith("%"):
            fraction = float(value.strip()[:-1]) / 100.0
        else:
            fraction = _number(value)
    except ValueError:
        raise _error("fraction", expected) from None
    if not 0.0 <= fraction <= 1.0:
        raise _error("fraction", expected)
    return fraction


def _rate(value: object) -> float:
    expected = "expected a change per second like -0.5, or per unit like 2/h, -0.5/s, 1/d"
    if isinstance(value, str):
        match = _RATE_RE.match(value)
        if match is None:
            raise _error("rate", expected)
        return float(match.group(1)) / _RATE_UNITS[match.group(2)]
    try:
        return _number(value)
    except ValueError:
        raise _error("rate", expected) from None


def _time_of_day(value: object) -> float:
    expected = "expected a UTC time of day like 14:00 or 06:30:00"
    if isinstance(value, str):
        match = _TIME_OF_DAY_RE.match(value)
        if match is not None:
            hours, minutes, seconds = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
            if hours < 24 and minutes < 60 and seconds < 60:
                return hours * 3600.0 + minutes * 60.0 + seconds
    raise _error("time_of_day", expected)


FieldValue = bool | str | Spread


def _value(value: object) -> FieldValue:
    """A field value: true/false, text, or a number (or range `a..b`, drawn once per device)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _spread(value) if _RANGE_RE.match(value) else value
    try:
        return _spread(value)
    except PydanticCustomError:
        raise _error("field_value", "expected a number, true/false or text") from None


Number = Annotated[Spread, PlainValidator(_spread)]
Duration = Annotated[float, PlainValidator(_duration)]
PositiveDuration = Annotated[float, PlainValidator(_positive_duration)]
DurationSpread = Annotated[Spread, PlainValidator(_duration_spread)]
SignedDurationSpread = Annotated[Spread, PlainValidator(lambda v: _duration_spread(v, signed=True))]
CountSpread = Annotated[Spread, PlainValidator(_count_spread)]
Fraction = Annotated[float, PlainValidator(_fraction)]
Rate = Annotated[float, PlainValidator(_rate)]
TimeOfDay = Annotated[float, PlainValidator(_time_of_day)]
Value = Annotated[FieldValue, PlainValidator(_value)]
Tag = Annotated[str, Field(min_length=1, max_length=256)]


def kind_of(value: FieldValue) -> FieldKind:
    """Tell which kind of field a value belongs to."""
    if isinstance(value, bool):
        return "bool"
    return "string" if isinstance(value, str) else "number"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _exactly_one(model: BaseModel, names: Sequence[str], what: str) -> str:
    given = [name for name in names if getattr(model, name) is not None]
    if len(given) != 1:
        listed = ", ".join(f"`{name}`" for name in names)
        found = f"; got {', '.join(given)}" if given else ""
        raise ValueError(f"{what} needs exactly one of {listed}{found}")
    return given[0]


# -- signals -------------------------------------------------------------------------------------------


class SineSpec(_Strict):
    """`mean + amplitude * sin(2π (t + phase) / period)`, t counted from the start of the run."""

    mean: Number = Spread(0.0, 0.0)
    amplitude: Number
    period: DurationSpread
    phase: DurationSpread = Spread(0.0, 0.0)

    @model_validator(mode="after")
    def _period(self) -> SineSpec:
        if self.period.low <= 0:
            raise ValueError("period must be longer than 0s")
        return self


class DailySpec(_Strict):
    """A 24-hour cycle on the UTC clock: highest (`mean + amplitude`) at `peak`, lowest 12 h later."""

    mean: Number = Spread(0.0, 0.0)
    amplitude: Number
    peak: TimeOfDay = 14 * 3600.0


class RandomWalkSpec(_Strict):
    """A random walk from `start`: each second moves by a normal step of sd `step` (scaled by the square root of the seconds between readings)."""

    start: Number
    step: Number
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> RandomWalkSpec:
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"min {self.min:g} must be below max {self.max:g}")
        if self.step.low < 0:
            raise ValueError("step must not be negative")
        return self


class StepSpec(_Strict):
    """From `at` on: `add` shifts a number for good; `set` replaces the signal with a value."""

    at: Duration
    set: Value | None = None
    add: Number | None = None

    @model_validator(mode="after")
    def _one(self) -> StepSpec:
        _exactly_one(self, ("set", "add"), "a step")
        return self


class SpikeSpec(_Strict):
    """A temporary change: `add` to a number or `set` a value, for `for` (0: one reading).

    Scheduled with `at` (and `every` to repeat), or at random: each reading starts one with
    `probability` while none is running. A spike always shows in at least one reading.
    """

    at: Duration | None = None
    every: PositiveDuration | None = None
    probability: Fraction | None = None
    for_: DurationSpread = Field(Spread(0.0, 0.0), alias="for")
    set: Value | None = None
    add: Number | None = None

    @model_validator(mode="after")
    def _shape(self) -> SpikeSpec:
        _exactly_one(self, ("set", "add"), "a spike")
        _exactly_one(self, ("at", "probability"), "a spike")
        if self.every is not None and self.at is None:
            raise ValueError("`every` repeats a spike scheduled with `at`")
        return self


class FieldSpec(_Strict):
    """One telemetry field: a base signal (exactly one) and what is added to it."""

    constant: Value | None = None
    sine: SineSpec | None = None
    daily: DailySpec | None = None
    random_walk: RandomWalkSpec | None = None
    noise: Number = Spread(0.0, 0.0)
    drift: Rate = 0.0
    steps: list[StepSpec] = []
    spikes: list[SpikeSpec] = []
    initial: Number | None = None
    recovery: DurationSpread = Spread(300.0, 300.0)
    min: float | None = None
    max: float | None = None
    round: int = Field(2, ge=0, le=10)

    @property
    def kind(self) -> FieldKind:
        """`number`, `bool` or `string`, from the base signal."""
        return kind_of(self.constant) if self.constant is not None else "number"

    @model_validator(mode="after")
    def _consistent(self) -> FieldSpec:
        _exactly_one(self, ("constant", "sine", "daily", "random_walk"), "a field")
        kind = self.kind
        if kind != "number":
            numeric = [
                name
                for name in ("noise", "drift", "initial", "min", "max")
                if name in self.model_fields_set and getattr(self, name) not in (None, 0.0, Spread(0.0, 0.0))
            ]
            if numeric:
                raise ValueError(f"`{numeric[0]}` applies to number fields; this is a {kind} field")
        changes: list[tuple[str, int, StepSpec | SpikeSpec]] = [
            *(("steps", i, step) for i, step in enumerate(self.steps)),
            *(("spikes", i, spike) for i, spike in enumerate(self.spikes)),
        ]
        for what, i, item in changes:
            if item.add is not None and kind != "number":
                raise ValueError(f"{what}[{i}]: `add` applies to number fields; this is a {kind} field")
            if item.set is not None and kind_of(item.set) != kind:
                raise ValueError(
                    f"{what}[{i}]: set {item.set} is a {kind_of(item.set)}; this is a {kind} field"
                )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        if self.noise.low < 0:
            raise ValueError("noise must not be negative")
        return self


# -- commands ------------------------------------------------------------------------------------------


class EffectSpec(_Strict):
    """What a command does to one field, until `for` has passed or another command changes the field.

    `set` a value; change a number at `rate` per second; move it towards `target` with
    `time_constant`; or `release` it: a number then returns to its signal with the field's `recovery`.
    """

    set: Value | None = None
    rate: Rate | None = None
    target: Number | None = None
    time_constant: DurationSpread = Spread(60.0, 60.0)
    release: Literal[True] | None = None
    for_: DurationSpread | None = Field(None, alias="for")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"release": True} if data == "release" else data

    @model_validator(mode="after")
    def _one(self) -> EffectSpec:
        _exactly_one(self, ("set", "rate", "target", "release"), "an effect")
        return self


class CommandCase(_Strict):
    """One behaviour of a command: used when the command's params include all of `params`."""

    params: dict[str, Any] = {}
    effects: dict[str, EffectSpec] = {}
    ack: Literal["ok", "error"] = "ok"
    detail: str = Field("", max_length=1024)


def _cases(value: object) -> object:
    return [value] if isinstance(value, dict) else value


# One behaviour may be written without the list around it.
Cases = Annotated[list[CommandCase], BeforeValidator(_cases), Field(min_length=1)]


# -- faults --------------------------------------------------------------------------------------------


class DisconnectWindow(_Strict):
    """A scheduled disconnect: at `at` (then every `every`) for `for`."""

    at: Duration
    every: PositiveDuration | None = None
    for_: DurationSpread = Field(alias="for")


class DisconnectSpec(_Strict):
    """The device drops off the network and comes back, with what it read meanwhile.

    `probability`: each reading starts a disconnect of `for` with this chance; `schedule`: at times.
    `buffer`: readings kept while offline (the oldest are dropped beyond it, making seq gaps that the
    summary counts). `replay` on reconnect: `burst` (each reading its own message, back to back),
    `batch` (JSON arrays of readings), or `drop` (nothing kept).
    """

    probability: Fraction = 0.0
    for_: DurationSpread = Field(Spread(30.0, 30.0), alias="for")
    schedule: list[DisconnectWindow] = []
    buffer: int = Field(100, ge=0, le=100_000)
    replay: Literal["burst", "batch", "drop"] = "burst"


class LateSpec(_Strict):
    """`rate` of readings are held back `by` a while: they arrive with a ts that old, after newer ones."""

    rate: Fraction
    by: DurationSpread


class OutOfOrderSpec(_Strict):
    """`rate` of readings are sent after the next `by` readings (same seq and ts, later position)."""

    rate: Fraction
    by: CountSpread = Spread(1.0, 1.0)


class MalformedSpec(_Strict):
    """`rate` of readings are sent broken, each of one of `kinds` (the seq is used up all the same)."""

    rate: Fraction
    kinds: list[MalformedKind] = Field(list(DEFAULT_MALFORMED_KINDS), min_length=1)


class CommandFaultSpec(_Strict):
    """`error`: this share of commands is acked with status error; `ignore`: never acked at all."""

    error: Fraction = 0.0
    ignore: Fraction = 0.0


class FaultSpec(_Strict):
    """The ways a device misbehaves; each is off unless given."""

    disconnect: DisconnectSpec | None = None
    late: LateSpec | None = None
    out_of_order: OutOfOrderSpec | None = None
    malformed: MalformedSpec | None = None
    commands: CommandFaultSpec | None = None


# -- types and groups ----------------------------------------------------------------------------------


class DeviceTypeSpec(_Strict):
    """Everything a device of one type does; a group may override any of it."""

    interval: PositiveDuration = 1.0
    jitter: Fraction = 0.1
    clock_skew: SignedDurationSpread = Spread(0.0, 0.0)
    fields: dict[str, FieldSpec] = Field(min_length=1, max_length=MAX_FIELDS)
    commands: dict[str, Cases] = {}
    faults: FaultSpec = FaultSpec()

    @model_validator(mode="after")
    def _names(self) -> DeviceTypeSpec:
        for name in self.fields:
            if FIELD_NAME_RE.match(name) is None or name in ("ts", "seq"):
                raise ValueError(
                    f"field name {name!r} is not allowed (a letter or _, then letters, digits, _ . -; "
                    "at most 64; not ts or seq)"
                )
        for name in self.commands:
            if COMMAND_NAME_RE.match(name) is None:
                raise ValueError(f"command name {name!r} is not allowed (letters, digits, _ . -; at most 64)")
        return self


class GroupSpec(_Strict):
    """Devices of one type: ids (a pattern like `gh-{001..500}` or a list) or `count` with `prefix`."""

    type: str
    ids: str | list[str] | None = None
    count: int | None = Field(None, ge=1, le=MAX_DEVICES)
    prefix: str | None = None
    tags: dict[Tag, Tag] = {}
    interval: PositiveDuration | None = None
    jitter: Fraction | None = None
    clock_skew: SignedDurationSpread | None = None
    fields: dict[str, FieldSpec] = {}
    commands: dict[str, Cases] = {}
    faults: FaultSpec | None = None

    @model_validator(mode="after")
    def _ids(self) -> GroupSpec:
        if (self.ids is None) == (self.count is None):
            raise ValueError("a group needs either `ids` (a pattern or a list) or `count`")
        if self.prefix is not None and self.count is None:
            raise ValueError("`prefix` goes with `count`; with `ids` write the pattern itself")
        return self


class _FleetFile(_Strict):
    seed: int | None = None
    types: dict[str, DeviceTypeSpec] = Field(min_length=1)
    groups: list[GroupSpec] = Field(min_length=1)


# -- the parsed fleet ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Group:
    """Devices that behave alike: resolved ids, their type, tags, and the merged behaviour."""

    type: str
    ids: tuple[str, ...]
    tags: dict[str, str]
    spec: DeviceTypeSpec


@dataclass(frozen=True, slots=True)
class Fleet:
    """A parsed fleet file."""

    groups: tuple[Group, ...]
    seed: int | None = None
    file: str = "<fleet>"

    def __len__(self) -> int:
        return sum(len(group.ids) for group in self.groups)

    def devices(self) -> list[tuple[str, Group]]:
        """Return (device id, group) for every device, in file order."""
        return [(device_id, group) for group in self.groups for device_id in group.ids]


def expand_ids(pattern: str) -> list[str]:
    """Expand `gh-{001..500}` into gh-001 ... gh-500; several ranges make every combination.

    A range whose first or last number has a leading zero is zero-padded to the longer of the two.

    Raises:
        ValueError: a range runs backwards, or the pattern makes too many ids.
    """
    pieces = _ID_RANGE_RE.split(pattern)
    literals, ranges = pieces[0::3], list(zip(pieces[1::3], pieces[2::3], strict=True))
    options: list[list[str]] = []
    total = 1
    for first, last in ranges:
        low, high = int(first), int(last)
        if low > high:
            raise ValueError(f"range {{{first}..{last}}} runs backwards")
        padded = (len(first) > 1 and first.startswith("0")) or (len(last) > 1 and last.startswith("0"))
        width = max(len(first), len(last)) if padded else 0
        options.append([f"{n:0{width}d}" for n in range(low, high + 1)])
        total *= high - low + 1
        if total > MAX_DEVICES:
            raise ValueError(f"pattern {pattern!r} makes more than {MAX_DEVICES:,} ids")
    ids = []
    for combination in itertools.product(*options):
        parts = [literals[0]]
        for number, literal in zip(combination, literals[1:], strict=True):
            parts += [number, literal]
        ids.append("".join(parts))
    return ids


def count_ids(count: int, prefix: str) -> list[str]:
    """Return `{prefix}-0001` ... for `count` devices (at least 4 digits, more when needed)."""
    width = max(4, len(str(count)))
    return [f"{prefix}-{n:0{width}d}" for n in range(1, count + 1)]


def _merge(base: DeviceTypeSpec, group: GroupSpec) -> DeviceTypeSpec:
    update: dict[str, Any] = {
        "fields": {**base.fields, **group.fields},
        "commands": {**base.commands, **group.commands},
    }
    for name in ("interval", "jitter", "clock_skew", "faults"):
        value = getattr(group, name)
        if value is not None:
            update[name] = value
    return base.model_copy(update=update)


def _check_commands(spec: DeviceTypeSpec, where: list[PathItem], doc: LocatedDocument) -> list[Problem]:
    problems = []
    for name, cases in spec.commands.items():
        for i, case in enumerate(cases):
            for field_name, effect in case.effects.items():
                at: list[PathItem] = [*where, "commands", name, i, "effects", field_name]
                field = spec.fields.get(field_name)
                if field is None:
                    known = ", ".join(sorted(spec.fields))
                    problems.append(doc.problem(at, f"no field {field_name!r} to affect (fields: {known})"))
                    continue
                if (effect.rate is not None or effect.target is not None) and field.kind != "number":
                    message = f"rate and target apply to numbers; {field_name!r} is a {field.kind}"
                    problems.append(doc.problem(at, message))
                if effect.set is not None and kind_of(effect.set) != field.kind:
                    message = f"set {effect.set} is a {kind_of(effect.set)}; {field_name!r} is a {field.kind}"
                    problems.append(doc.problem(at, message))
    return problems


class _FleetLoader(yaml.SafeLoader):
    """A SafeLoader that reads scalars as YAML 1.2 does.

    YAML 1.1 would turn `on`/`off`/`yes`/`no` into booleans (`params: {on: true}` would match a
    parameter named True) and `14:00` into the base-60 number 840.
    """


_BOOL, _INT, _FLOAT = (f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float"))
_FleetLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_FleetLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_FleetLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789")
)
_FleetLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
    ),
    list("-+0123456789."),
)


def parse_fleet(text: str, file: str = "<fleet>") -> Fleet:
    """Parse and validate a fleet file, listing every problem with its file:line:column.

    Raises:
        SourceFileError: the file has problems; all are listed.
    """
    doc = LocatedDocument(text, file)  # for positions; the data is read again below, the YAML 1.2 way
    data = yaml.load(text, Loader=_FleetLoader) if doc.data is not None else None  # a SafeLoader
    if not isinstance(data, dict):
        raise SourceFileError([doc.problem([], "expected a mapping with `types` and `groups`")])
    try:
        parsed = _FleetFile.model_validate(data)
    except ValidationError as exc:
        raise SourceFileError(doc.problems_from(exc)) from None
    problems: list[Problem] = []
    groups: list[Group] = []
    owner: dict[str, int] = {}
    total = 0
    at: list[PathItem]
    for name, type_spec in parsed.types.items():
        if TYPE_NAME_RE.match(name) is None:
            problems.append(doc.problem(["types", name], f"type name {name!r} is not allowed"))
        problems += _check_commands(type_spec, ["types", name], doc)
    for i, group in enumerate(parsed.groups):
        base = parsed.types.get(group.type)
        if base is None:
            known = ", ".join(sorted(parsed.types))
            problems.append(
                doc.problem(["groups", i, "type"], f"unknown type {group.type!r} (types: {known})")
            )
            continue
        try:
            if group.count is not None:
                prefix = group.prefix if group.prefix is not None else group.type
                ids, at = count_ids(group.count, prefix), ["groups", i, "prefix" if group.prefix else "count"]
            elif isinstance(group.ids, str):
                ids, at = expand_ids(group.ids), ["groups", i, "ids"]
            else:
                ids, at = list(group.ids or []), ["groups", i, "ids"]
        except ValueError as exc:
            problems.append(doc.problem(["groups", i, "ids"], str(exc)))
            continue
        if not ids:
            problems.append(doc.problem(at, "the group has no devices"))
        total += len(ids)
        if total > MAX_DEVICES:
            problems.append(doc.problem(at, f"the fleet has more than {MAX_DEVICES:,} devices"))
            break
        for device_id in ids:
            if not is_valid_device_id(device_id):
                problems.append(
                    doc.problem(
                        at,
                        f"device id {device_id!r} is not allowed: 1-128 of A-Z a-z 0-9 _ . : -, "
                        "starting with a letter or digit",
                    )
                )
                break
            if device_id in owner:
                problems.append(
                    doc.problem(at, f"device id {device_id!r} is also in groups[{owner[device_id]}]")
                )
                break
            owner[device_id] = i
        spec = _merge(base, group)
        if len(spec.fields) > MAX_FIELDS:
            problems.append(doc.problem(["groups", i, "fields"], f"more than {MAX_FIELDS} fields"))
        problems += _check_commands(spec, ["groups", i], doc) if group.commands or group.fields else []
        groups.append(Group(group.type, tuple(ids), dict(group.tags), spec))
    if problems:
        raise SourceFileError(_unique(problems))
    return Fleet(tuple(groups), parsed.seed, file)


def _unique(problems: list[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for problem in problems:
        if str(problem) not in seen:
            seen.add(str(problem))
            out.append(problem)
    return out


def quick_fleet(devices: int, rate: float, id_prefix: str = "sim") -> Fleet:
    """Return the fleet of `--devices N --rate R`: greenhouses that heat up until told to run the fan.

    Each device's temperature starts at 22-28 °C and relaxes towards a hot level (38-42 °C) with a
    time constant of 12-18 s; `fan` with params `{"on": true}` turns the fan on and pulls the
    temperature towards 17-19 °C; `{"on": false}` turns it off again. Under the demo rule (fan on
    above 30 °C, off below 26 °C) a device raises within about 10 s and cycles every 8-20 s.

    Raises:
        ValueError: `devices` or `rate` out of range, or `id_prefix` makes invalid ids.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be positive, got {rate}")
    ids = count_ids(devices, id_prefix)
    if not is_valid_device_id(ids[-1]):
        raise ValueError(f"id_prefix {id_prefix!r} does not make valid device ids (e.g. {ids[-1]!r})")
    settle = "12s..18s"
    spec = DeviceTypeSpec.model_validate(
        {
            "interval": 1.0 / rate,
            "jitter": 0.1,
            "fields": {
                "temperature": {"constant": "38..42", "initial": "22..28", "recovery": settle, "noise": 0.15},
                "humidity": {
                    "random_walk": {"start": "45..55", "step": 0.3, "min": 30, "max": 70},
                    "round": 1,
                },
                "fan": {"constant": False},
            },
            "commands": {
                "fan": [
                    {
                        "params": {"on": True},
                        "effects": {
                            "fan": {"set": True},
                            "temperature": {"target": "17..19", "time_constant": settle},
                        },
                    },
                    {"params": {"on": False}, "effects": {"fan": {"set": False}, "temperature": "release"}},
                ]
            },
        }
    )
    return Fleet((Group("greenhouse", tuple(ids), {}, spec),), None, "<--devices/--rate>")
