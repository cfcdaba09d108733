"""Rule definitions as written by users, validated into immutable values.

A rule file is YAML with a `rules` list, and optionally `lateness` and `tests`::

    lateness: 30s                          # optional; default 30s; see "Time" below
    rules:
      - id: greenhouse-overheat            # required; unique across all files; [a-z0-9][a-z0-9_.-]*
        description: Too hot; run the fan  # optional text for people
        devices: ["greenhouse-*", "sim-*"] # optional; device ids or fnmatch globs (* ? [...]);
                                           #   omitted means every device
        when: temperature > 30             # the condition that raises the alarm (or `absent`, below)
        clear: temperature < 26            # optional expression: clears it (hysteresis);
                                           #   omitted means `not (when)`
        for: 2m                            # optional: `when` must hold this long before raising,
                                           #   or `for: {count: 3, of: 5}`: in 3 of the last 5
        min_interval: 30s                  # optional: at least this long between raise and clear
        lateness: 10s                      # optional: overrides the file's `lateness`
        severity: warning                  # info | warning | critical; default warning
        message: "temperature {temperature} above 30"
                                           # optional; {field} and {field:.1f} take the event's
                                           #   fields; a missing field shows as `?`; omitted means
                                           #   the description, or else the `when` text
        on_raise:                          # optional list of actions; default [alert]
          - alert
          - command: {name: fan, params: {on: true}, cooldown: 5m}
        on_clear:                          # optional list of actions; default [alert]
          - alert
          - command: {name: fan, params: {on: false}}

      - id: freezer-silent                 # an absence (deadman) rule: `absent` instead of `when`
        devices: ["freezer-*"]
        absent: 5m                         # no event from the device for 5m raises; its next
                                           #   event clears (no `clear` or `for` here)

Durations are written `250ms`, `30s`, `5m`, `2h`, `1d`, combined like `1m30s`, or as a number of
seconds.

Semantics: each (rule, device) pair is an alarm that is either ok or raised. An event from a matching
device raises an ok alarm when `when` holds, running `on_raise`; it clears a raised alarm when the
clear condition holds, running `on_clear`. While raised, `when` is not re-evaluated, so nothing
repeats. `alert` records the transition (rule, device, state, severity, time, message and the
values of the fields and windowed functions the deciding expression read, e.g.
`{"temperature": 31, "avg(temperature, 5m)": 30.4}`); `command` sends `name` with `params` (any
JSON values) to the device the event came from.

Expressions are described in `rules.expression`: field names, numbers, 'strings', True/False,
comparisons (chained too), and/or/not, + - * / %, abs/min/max/round, has(field), and windowed
functions. A comparison that reads a field the event lacks is neither true nor false, so it never
fires either way.

Windows (`rules.window`): `avg(temperature, 5m)` is over a sliding time window, `avg(temperature,
10 events)` over the last 10 readings; also min, max, sum, count, stddev, first, last, delta, rate
(per second), `percentile(value, 95, 5m)` and `count_if(condition, 5m)`. Each (rule, device) has
its own windows, one per distinct value and length, shared by `when` and `clear`. A time window moves
in steps of 1/20 of its length; an empty window is unknown, except count, count_if and sum (0).

`for: D`: the alarm raises once `when` has held for D without a definite false in between (an event
that lacks the fields leaves the period running). The raise comes from the clock (the gateway calls
`advance` every second) or from the next event, whichever comes first, stamped with the time the
period ended. `for: {count: N, of: M}` (M at most 64): raises when N of the last M definite
evaluations of `when` held; the count starts over after each raise. `for` delays raising only;
clearing is immediate.

`min_interval: D`: a raise or clear that comes less than D after the previous transition is
postponed until D has passed, and then happens at that time, unless an event in between definitely
contradicted it (the condition that asked for it was definitely false). `cooldown: D` on a command:
the command is not sent again for the same rule and device within D (the alert is still recorded);
`RuleEngine.suppressed_commands` counts the skipped ones.

`absent: D`: the alarm raises when no event came from the device for D, on the gateway clock, and is
stamped with the time the silence reached D; the next event clears it. Devices given to the engine
as known (the device registry) are covered even if they never report: their silence counts from
when the engine started (or from when they were added).

Time: windows and `for` use event time (the payload's `ts`); timers fire from the gateway clock.
The engine keeps each device's newest event time; an event older than that by more than `lateness`
is late for the rule: it is not added to the rule's windows and does not change its alarm; it is
counted (`RuleEngine.late_events`), and the gateway still stores it as telemetry. A late event
still proves a device alive for absence rules. An event within the lateness joins the window
bucket its time belongs to.

Tests: a file may carry test cases, run offline by `tidegate rules test DIR` (see `rules.testing`
for how the fake clock moves)::

    tests:
      - name: the fan runs above 30 °C
        known_devices: [greenhouse-9]      # optional: registry devices, for absence rules
        events:                            # times from the start of the case
          - {at: 0s, device: greenhouse-1, temperature: 31}   # an event: at, device, fields
          - {advance: 10m}                 # the clock moves on, ticking every second
        expect:                            # exactly these, and nothing else
          - {at: 0s, rule: greenhouse-overheat, device: greenhouse-1, state: raised}
          - {at: 0s, rule: greenhouse-overheat, device: greenhouse-1, command: fan, params: {on: true}}

Each case runs only the rules of its own file, on a fresh engine.

YAML notes: unknown keys are errors; quote a value that starts with `{`, `[`, `"` or `'` or contains
`: ` or ` #` (messages usually need quotes). Rule files are read with YAML 1.2 booleans: only
true/false are booleans, so `on`, `off`, `yes` and `no` stay text (`params: {on: true}` means the
key "on").
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    PlainValidator,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from devices.event import FieldValue
from devices.payload import FIELD_NAME_RE, RESERVED_KEYS
from rules.action import AlertState, Severity
from rules.duration import format_duration, parse_duration
from rules.expression import Expression, ExpressionError, compile_expression

RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}\Z")
# Device id characters (devices.topic) plus the fnmatch metacharacters.
DEVICE_PATTERN_RE = re.compile(r"[A-Za-z0-9_.:*?\[\]!-]{1,128}\Z")
COMMAND_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# The standard format-spec mini-language, with width and precision capped at three digits so a
# template cannot ask for a gigabyte of padding.
_FORMAT_SPEC_RE = re.compile(r"(?:.?[<>=^])?[+\- ]?z?#?0?\d{0,3}[,_]?(?:\.\d{1,3})?[bcdeEfFgGnosxX%]?\Z")
MISSING_FIELD_TEXT = "?"
DEFAULT_LATENESS = 30.0
# N-of-M keeps the last M outcomes as bits of an int; 64 keeps that int a machine word.
MAX_OF = 64

_STRICT = ConfigDict(extra="forbid", frozen=True)


class MessageTemplate:
    """A checked `str.format`-style template whose fields are event fields; compare by source."""

    __slots__ = ("_parts", "fields", "source")

    def __init__(self, source: str) -> None:
        """Parse `source`, or raise `ValueError` saying what is wrong."""
        parts: list[tuple[str, str | None, str | None, str]] = []
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as exc:
            raise ValueError(f"{exc}; write {{{{ and }}}} for literal braces") from None
        for literal, name, spec, conversion in parsed:
            if name is None:
                parts.append((literal, None, None, ""))
                continue
            if FIELD_NAME_RE.match(name) is None:
                raise ValueError(f"{{{name}}} is not a field name; expected {{field}} or {{field:.1f}}")
            if conversion not in (None, "r", "s"):
                raise ValueError(f"{{{name}!{conversion}}}: expected no conversion, !r or !s")
            if spec and _FORMAT_SPEC_RE.match(spec) is None:
                raise ValueError(f"{{{name}:{spec}}}: expected a format spec like .1f or >8")
            parts.append((literal, name, conversion, spec or ""))
        self.source = source
        self.fields = tuple(dict.fromkeys(name for _, name, _, _ in parts if name is not None))
        self._parts = tuple(parts)

    def render(self, fields: Mapping[str, FieldValue]) -> str:
        """Fill the template from `fields`; a missing field or an unusable format never raises."""
        out: list[str] = []
        for literal, name, conversion, spec in self._parts:
            out.append(literal)
            if name is None:
                continue
            value = fields.get(name)
            if value is None:
                out.append(MISSING_FIELD_TEXT)
                continue
            shown: object = repr(value) if conversion == "r" else value
            try:
                out.append(format(shown, spec))
            except (ValueError, TypeError):  # e.g. {temperature:.1f} when a device sent text
                out.append(str(shown))
        return "".join(out)

    def __repr__(self) -> str:
        return f"MessageTemplate({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MessageTemplate) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


def _text_matching(pattern: re.Pattern[str], error_type: str, expected: str) -> PlainValidator:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise PydanticCustomError(
                "string_type", "expected text, got {kind}", {"kind": type(value).__name__}
            )
        if pattern.match(value) is None:
            raise PydanticCustomError(error_type, expected)
        return value

    return PlainValidator(check)


def _condition(value: object) -> Expression:
    if not isinstance(value, str):
        raise PydanticCustomError("condition_type", "expected an expression as text, like `temperature > 30`")
    try:
        return compile_expression(value)
    except ExpressionError as exc:
        raise PydanticCustomError(
            "condition",
            "invalid expression at column {column}: {reason}",
            {"column": exc.column, "reason": exc.reason},
        ) from None


def _message(value: object) -> MessageTemplate:
    if not isinstance(value, str):
        raise PydanticCustomError("message_type", "expected text, like 'temperature {temperature} above 30'")
    try:
        return MessageTemplate(value)
    except ValueError as exc:
        raise PydanticCustomError(
            "message", "invalid message template: {reason}", {"reason": str(exc)}
        ) from None


def _action_kind(value: Any) -> str | None:
    if value == "alert":
        return "alert"
    if isinstance(value, dict) and list(value) == ["command"]:
        return "command"
    return None


def _unwrap_command(value: Any) -> Any:
    # `{command: {...}}` in YAML; the union tag is also named "command", so error locations read
    # `on_raise[1].command.name` exactly like the YAML path.
    return value["command"]


RuleId = Annotated[
    str,
    _text_matching(
        RULE_ID_RE,
        "rule_id",
        "expected a rule id of lowercase letters, digits, '_', '.' and '-', starting with a letter or digit, "
        "at most 128 characters",
    ),
]
DevicePattern = Annotated[
    str,
    _text_matching(
        DEVICE_PATTERN_RE,
        "device_pattern",
        "expected a device id or glob: letters, digits, '_', '.', ':', '-' and * ? [ ] !",
    ),
]
CommandName = Annotated[
    str,
    _text_matching(
        COMMAND_NAME_RE,
        "command_name",
        "expected a command name of letters, digits, '_', '.' and '-', at most 64 characters",
    ),
]


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise PydanticCustomError("duration", str(exc)) from None


Condition = Annotated[Expression, PlainValidator(_condition)]
Message = Annotated[MessageTemplate, PlainValidator(_message)]
Duration = Annotated[float, PlainValidator(_duration)]


class CommandSpec(BaseModel):
    """A command a rule sends to the device whose event triggered it."""

    model_config = _STRICT

    name: CommandName
    params: dict[str, JsonValue] = {}
    cooldown: Duration = 0.0  # seconds; 0 sends on every transition


class NOfM(BaseModel):
    """`for: {count: N, of: M}`: raise when N of the last M evaluations of `when` held."""

    model_config = _STRICT

    count: int = Field(ge=1, le=MAX_OF)
    of: int = Field(ge=1, le=MAX_OF)

    @model_validator(mode="after")
    def _count_within_of(self) -> NOfM:
        if self.count > self.of:
            raise PydanticCustomError(
                "n_of_m", "count ({count}) must be at most of ({of})", {"count": self.count, "of": self.of}
            )
        return self


def _hold_kind(value: Any) -> str:
    return "n_of_m" if isinstance(value, dict) else "duration"


HoldSpec = Annotated[
    Annotated[Duration, Tag("duration")] | Annotated[NOfM, Tag("n_of_m")],
    Discriminator(_hold_kind),
]


AlertStep = Literal["alert"]
ActionStep = Annotated[
    Annotated[AlertStep, Tag("alert")]
    | Annotated[CommandSpec, BeforeValidator(_unwrap_command), Tag("command")],
    Discriminator(
        _action_kind,
        custom_error_type="action",
        custom_error_message="expected `alert` or `command: {name: <command>, params: {...}}`",
    ),
]


class Rule(BaseModel):
    """One rule: when to raise and clear an alarm per device, and what to do then."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: RuleId
    description: str = ""
    devices: list[DevicePattern] | None = Field(default=None, min_length=1)
    when: Condition | None = None
    absent: Duration | None = None
    clear: Condition | None = None
    hold: HoldSpec | None = Field(default=None, alias="for")
    min_interval: Duration = 0.0
    lateness: Duration | None = None  # None: the rule file's `lateness`, else DEFAULT_LATENESS
    severity: Severity = "warning"
    message: Message | None = None
    on_raise: list[ActionStep] = ["alert"]
    on_clear: list[ActionStep] = ["alert"]

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        if (self.when is None) == (self.absent is None):
            raise PydanticCustomError(
                "rule_kind", "expected exactly one of `when: <condition>` or `absent: <duration>`"
            )
        if self.absent is not None:
            if self.absent <= 0:
                raise PydanticCustomError("absent", "absent: expected a duration longer than 0, like 5m")
            extra = [name for name in ("clear", "hold") if getattr(self, name) is not None]
            if extra:
                shown = "for" if extra[0] == "hold" else extra[0]
                raise PydanticCustomError(
                    "absent_extra",
                    "`{key}` does not apply to an absent rule: the next event from the device clears it",
                    {"key": shown},
                )
        return self

    @property
    def condition(self) -> Expression:
        """Return `when`; only absent rules have none."""
        if self.when is None:
            raise ValueError(f"rule {self.id!r} is an absent rule and has no `when`")
        return self.when

    @property
    def clear_condition(self) -> Expression:
        """Return the condition that clears a raised alarm: `clear`, or else `not (when)`."""
        return self.clear if self.clear is not None else self.condition.negated()

    def render_message(self, fields: Mapping[str, FieldValue]) -> str:
        """Return the alert text for an event with `fields`."""
        if self.message is not None:
            return self.message.render(fields)
        if self.description:
            return self.description
        if self.when is None:
            return f"no data for {format_duration(self.absent or 0.0)}"
        return self.when.source


# -- test cases inside rule files -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventStep:
    """A test step: the device sends `fields` with event time `at` (seconds from the test start)."""

    at: float
    device: str
    fields: Mapping[str, FieldValue]


@dataclass(frozen=True, slots=True)
class AdvanceStep:
    """A test step: the gateway clock moves forward by `by` seconds, ticking every second."""

    by: float


_STEP_EXPECTED = "expected an event `{at: 0s, device: <id>, <field>: <value>, ...}` or `{advance: 5m}`"


def _test_step(value: object) -> EventStep | AdvanceStep:
    if not isinstance(value, dict):
        raise PydanticCustomError("test_step", _STEP_EXPECTED)
    if "advance" in value:
        if len(value) != 1:
            raise PydanticCustomError("test_step", "an `advance` step takes no other keys")
        return AdvanceStep(_duration(value["advance"]))
    missing = [key for key in ("at", "device") if key not in value]
    if missing:
        raise PydanticCustomError("test_step", f"{_STEP_EXPECTED}; missing {missing[0]!r}")
    device = value["device"]
    if not isinstance(device, str) or DEVICE_PATTERN_RE.match(device) is None:
        raise PydanticCustomError("test_step", "device: expected a device id")
    fields: dict[str, FieldValue] = {}
    for key, field_value in value.items():
        if key in ("at", "device"):
            continue
        if not isinstance(key, str) or FIELD_NAME_RE.match(key) is None or key in RESERVED_KEYS:
            raise PydanticCustomError("test_step", f"{key!r} is not a metric field name")
        if not isinstance(field_value, int | float | str | bool):
            raise PydanticCustomError(
                "test_step", f"{key}: expected a number, true/false or text, got {type(field_value).__name__}"
            )
        fields[key] = field_value
    if not fields:
        raise PydanticCustomError("test_step", "an event needs at least one field, like temperature: 31")
    return EventStep(_duration(value["at"]), device, fields)


Step = Annotated[EventStep | AdvanceStep, PlainValidator(_test_step)]


class ExpectedAlert(BaseModel):
    """An alert a test case expects: rule, device and state at a time."""

    model_config = _STRICT

    at: Duration
    rule: RuleId
    device: str
    state: AlertState


class ExpectedCommand(BaseModel):
    """A command a test case expects: sent on behalf of `rule` to `device` at a time."""

    model_config = _STRICT

    at: Duration
    rule: RuleId
    device: str
    command: CommandName
    params: dict[str, JsonValue] = {}


def _expected_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        if "command" in value:
            return "command"
        if "state" in value:
            return "alert"
    return None


Expected = Annotated[
    Annotated[ExpectedAlert, Tag("alert")] | Annotated[ExpectedCommand, Tag("command")],
    Discriminator(
        _expected_kind,
        custom_error_type="expected_action",
        custom_error_message="expected an alert `{at, rule, device, state}` or a command "
        "`{at, rule, device, command, params}`",
    ),
]


class RuleTest(BaseModel):
    """A test case in a rule file: events and clock steps in, exactly these alerts and commands out."""

    model_config = _STRICT

    name: str = Field(min_length=1)
    known_devices: list[DevicePattern] = []
    events: list[Step] = Field(min_length=1)
    expect: list[Expected]


@dataclass(frozen=True, slots=True)
class RuleSet:
    """All rules of a deployment, in file-name order, each id unique; `files` maps rule id to file.

    `tests` maps a file name to the test cases it carries (files without tests are left out).
    """

    rules: tuple[Rule, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    tests: Mapping[str, tuple[RuleTest, ...]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, rule_id: str) -> Rule | None:
        """Return the rule with `rule_id`, if there is one."""
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        return None
