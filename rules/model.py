"""Rule definitions as written by users, validated into immutable values.

A rule file is YAML with a `rules` list and/or a `derived` list, and optionally `lateness`, `time`
and `tests`::

    lateness: 30s                          # optional; default 30s; see "Time" below
    time: event                            # optional: event (the payload's ts, default) or processing
    rules:
      - id: greenhouse-overheat            # required; unique across all files (derived ids too);
                                           #   [a-z0-9][a-z0-9_.-]*
        description: Too hot; run the fan  # optional text for people
        devices: ["greenhouse-*", "sim-*"] # optional; see "Selectors"; omitted means every device
        when: temperature > 30             # the condition that raises the alarm (or `absent`, below)
        clear: temperature < 26            # optional expression: clears it (hysteresis);
                                           #   omitted means `not (when)`
        for: 2m                            # optional: `when` must hold this long before raising,
                                           #   or `for: {count: 3, of: 5}`: in 3 of the last 5
        min_interval: 30s                  # optional: at least this long between raise and clear
        lateness: 10s                      # optional: overrides the file's `lateness`
        time: processing                   # optional: overrides the file's `time`
        severity: warning                  # info | warning | critical; default warning
        message: "temperature {temperature} above 30"
                                           # optional; {field} and {field:.1f} take the event's
                                           #   fields; a missing field shows as `?`; omitted means
                                           #   the description, or else the `when` text
        on_raise:                          # optional list of actions; default [alert]
          - alert
          - command: {name: fan, params: {on: true}, cooldown: 5m}
          - command: {name: open, device: "{device_id}-vent"}     # to another device
          - republish: {topic: "alerts/{tags.site}/{rule}", qos: 1, retain: false, cooldown: 5m}
          - webhook: {url: "https://ops.example.com/hook", cooldown: 5m}
        on_clear:                          # optional list of actions; default [alert]
          - alert
          - command: {name: fan, params: {on: false}}

      - id: freezer-silent                 # an absence (deadman) rule: `absent` instead of `when`
        devices: ["freezer-*"]
        absent: 5m                         # no event from the device for 5m raises; its next
                                           #   event clears (no `clear`, `for` or `group_by` here)

      - id: site-warm                      # a group rule: one alarm per value of a registry tag
        devices: {type: greenhouse}
        group_by: site                     # every greenhouse tagged site: north feeds one window
        when: avg(temperature, 10m) > 28   #   and one alarm, `site=north`; fields only inside
        clear: avg(temperature, 10m) < 25  #   windowed functions
        on_raise:
          - alert
          - command: {name: heating, params: {level: low}, device: "{group}-heating"}

    derived:                               # tumbling aggregates written to the store
      - id: greenhouse-1m                  # required; unique across all files
        devices: {type: greenhouse}        # optional, as for rules
        group_by: site                     # optional: one point per group instead of per device
        every: 1m                          # the interval, 1s to 1d, aligned on the epoch
        measurement: greenhouse_1m         # optional; default `derived`; not one of tidegate's own
        fields:                            # output field: aggregate of the interval's readings
          temperature_avg: avg(temperature)
          temperature_p95: "percentile(temperature, 95)"
          hot: count_if(temperature > 30)
        lateness: 1m                       # optional: overrides the file's `lateness`
        time: processing                   # optional: overrides the file's `time`

Durations are written `250ms`, `30s`, `5m`, `2h`, `1d`, combined like `1m30s`, or as a number of
seconds.

Selectors: `devices: [ids or globs]` (fnmatch `* ? [...]`), or a mapping of criteria that must all
hold: `{ids: [...], type: greenhouse, tags: {site: north}}`; `type` and each tag take one value or
a list of accepted values. Types and tags come from the device registry (`devices.file`), so a
device not in the registry is selected only by `ids` (or by no selector).

Semantics: each (rule, device) pair, or (rule, group) for a group rule, is an alarm that is either
ok or raised. An event from a matching device raises an ok alarm when `when` holds, running
`on_raise`; it clears a raised alarm when the clear condition holds, running `on_clear`. While
raised, `when` is not re-evaluated, so nothing repeats. `alert` records the transition (rule,
device or group, state, severity, time, message and the values of the fields and windowed
functions the deciding expression read, e.g. `{"temperature": 31, "avg(temperature, 5m)": 30.4}`;
a group alarm records only its windowed values).

Actions: `command` sends `name` with `params` (any JSON values) to the device the event came from,
or to the device its `device:` template names (required in a group rule). `republish` publishes
the alert as JSON (`{"rule", "device" or "group": {tag: value}, "state", "severity", "ts",
"message", "values"}`) to the `topic` template over the gateway's MQTT connection; `webhook` POSTs
the same JSON to `url`. Templates take `{device_id}`, `{type}`, `{tags.<tag>}` (from the registry),
`{rule}`, `{state}` and `{severity}`; a group rule's take `{group}` (the tag's value), `{tags.<its
group_by tag>}`, `{rule}`, `{state}` and `{severity}`. A template that cannot be filled (the device
has no such tag, the result is not a valid device id, a value would add a topic level) does not
run: the engine reports it (`FailedAction`) and the gateway logs and counts it.

Group rules (`group_by: <tag>`): every event of a selected device carrying that tag goes into the
windows of its group (`site=north`); devices without the tag are in no group. The conditions read
fields only inside windowed functions, evaluated on each member's event; `for`, `min_interval`,
hysteresis and cooldowns work per group as they do per device.

Expressions are described in `rules.expression`: field names, numbers, 'strings', True/False,
comparisons (chained too), and/or/not, + - * / %, abs/min/max/round, has(field), and windowed
functions. A comparison that reads a field the event lacks is neither true nor false, so it never
fires either way.

Windows (`rules.window`): `avg(temperature, 5m)` is over a sliding time window, `avg(temperature,
10 events)` over the last 10 readings; also min, max, sum, count, stddev, first, last, delta, rate
(per second), `percentile(value, 95, 5m)` and `count_if(condition, 5m)`. Each (rule, device or
group) has its own windows, one per distinct value and length, shared by `when` and `clear`. A time
window moves in steps of 1/20 of its length; an empty window is unknown, except count, count_if and
sum (0).

`for: D`: the alarm raises once `when` has held for D without a definite false in between (an event
that lacks the fields leaves the period running). The raise comes from the clock (the gateway calls
`advance` every second) or from the next event, whichever comes first, stamped with the time the
period ended. `for: {count: N, of: M}` (M at most 64): raises when N of the last M definite
evaluations of `when` held; the count starts over after each raise. `for` delays raising only;
clearing is immediate.

`min_interval: D`: a raise or clear that comes less than D after the previous transition is
postponed until D has passed, and then happens at that time, unless an event in between definitely
contradicted it (the condition that asked for it was definitely false). `cooldown: D` on a
command, republish or webhook: it does not run again for the same rule and device (or group)
within D (the alert is still recorded); `RuleEngine.suppressed_commands` counts the skipped ones.

`absent: D`: the alarm raises when no event came from the device for D, on the gateway clock, and is
stamped with the time the silence reached D; the next event clears it. Devices given to the engine
as known (the device registry) are covered even if they never report: their silence counts from
when the engine started (or from when they were added).

Derived metrics: for each device (or group) and interval `[k * every, (k + 1) * every)`, the
aggregates of the readings in it (avg, min, max, sum, count, stddev, first, last, delta, rate,
percentile(value, q), count_if(condition); a reading counts when its value is known) are written
as one point of `measurement`, tags `device` (or the group tag) and `rule` (the id), stamped with
the interval's start. An interval is written once its end plus the lateness has passed on the
gateway clock (see `rules.engine`); an interval without readings writes nothing; a reading for
an interval already written is late (counted, not added).

Time: windows, `for` and intervals use event time (the payload's `ts`); timers fire from the
gateway clock. The engine keeps each device's newest event time; an event older than that by more
than `lateness` is late for the rule: it is not added to the rule's windows and does not change
its alarm; it is counted (`RuleEngine.late_events`), and the gateway still stores it as telemetry. A
late event still proves a device alive for absence rules. An event within the lateness joins the
window bucket its time belongs to. With `time: processing` a rule or derived metric uses the time
the gateway received the event instead of its `ts`: nothing is late, and a device's clock does not
matter.

Tests: a file may carry test cases, run offline by `tidegate rules test DIR` (see `rules.testing`
for how the fake clock moves)::

    tests:
      - name: the fan runs above 30 °C
        known_devices:                     # optional: registry devices (absence, type, tags, groups)
          - greenhouse-9                   #   an id, or
          - {id: greenhouse-1, type: greenhouse, tags: {site: north}}
        events:                            # times from the start of the case
          - {at: 0s, device: greenhouse-1, temperature: 31}   # an event: at, device, fields
          - {advance: 10m}                 # the clock moves on, ticking every second
        expect:                            # exactly these, and nothing else
          - {at: 0s, rule: greenhouse-overheat, device: greenhouse-1, state: raised}
          - {at: 0s, rule: greenhouse-overheat, device: greenhouse-1, command: fan, params: {on: true}}
          - {at: 0s, rule: r, device: greenhouse-1, republish: alerts/north/r, state: raised}
          - {at: 0s, rule: r, device: greenhouse-1, webhook: "https://ops.example.com/hook", state: raised}
          - {at: 0s, rule: site-warm, group: site=north, state: raised}   # a group's alarm
          - {at: 0s, derived: greenhouse-1m, device: greenhouse-1, fields: {temperature_avg: 31}}

Each case runs only the rules and derived metrics of its own file, on a fresh engine.

YAML notes: unknown keys are errors; quote a value that starts with `{`, `[`, `"` or `'` or contains
`: ` or ` #` (messages usually need quotes), and an expression with a comma inside a `{...}` flow
mapping (`"percentile(t, 95)"`). Rule files are read with YAML 1.2 booleans: only true/false are
booleans, so `on`, `off`, `yes` and `no` stay text (`params: {on: true}` means the key "on").
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    PlainValidator,
    StringConstraints,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from devices.event import FieldValue
from devices.payload import FIELD_NAME_RE, RESERVED_KEYS
from rules.action import AlertState, Severity
from rules.duration import format_duration, parse_duration
from rules.expression import (
    Aggregate,
    Expression,
    ExpressionError,
    compile_aggregate,
    compile_expression,
)

RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}\Z")
# Device id characters (devices.topic) plus the fnmatch metacharacters.
DEVICE_PATTERN_RE = re.compile(r"[A-Za-z0-9_.:*?\[\]!-]{1,128}\Z")
COMMAND_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# Tag names a rule can group by or name in a template: field-name characters, so `{tags.site}` parses.
TAG_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}\Z")
MEASUREMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
# tidegate's own measurements (gateway.records); a derived metric must not write into one of them.
RESERVED_MEASUREMENTS = frozenset(
    {"telemetry", "alerts", "commands", "gateway_events", "device_status", "quarantine"}
)
DEFAULT_MEASUREMENT = "derived"
# The standard format-spec mini-language, with width and precision capped at three digits so a
# template cannot ask for a gigabyte of padding.
_FORMAT_SPEC_RE = re.compile(r"(?:.?[<>=^])?[+\- ]?z?#?0?\d{0,3}[,_]?(?:\.\d{1,3})?[bcdeEfFgGnosxX%]?\Z")
MISSING_FIELD_TEXT = "?"
DEFAULT_LATENESS = 30.0
# N-of-M keeps the last M outcomes as bits of an int; 64 keeps that int a machine word.
MAX_OF = 64
# A derived metric emits one point per device (or group) per interval; below a second that is a
# firehose, and a day is as coarse as downsampling at the edge makes sense.
MIN_EVERY = 1.0
MAX_EVERY = 86_400.0
MAX_DERIVED_FIELDS = 100

TimeMode = Literal["event", "processing"]

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


# Names an action template may use; `tags.<name>` reads one of the device's registry tags.
TEMPLATE_NAMES = ("device_id", "type", "rule", "group", "state", "severity")
_GROUP_TEMPLATE_NAMES = ("rule", "group", "state", "severity")


class ActionTemplate:
    """A target template for an action, e.g. `{tags.site}-controller` or `alerts/{rule}/{device_id}`.

    Names are `TEMPLATE_NAMES` or `tags.<tag>`; no format specs. Rendering from a context that
    lacks a name (a device without that tag) gives None and the missing name, never an exception.
    """

    __slots__ = ("_parts", "names", "source")

    def __init__(self, source: str) -> None:
        """Parse `source`, or raise `ValueError` saying what is wrong."""
        parts: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as exc:
            raise ValueError(f"{exc}; write {{{{ and }}}} for literal braces") from None
        for literal, name, spec, conversion in parsed:
            if name is not None:
                if conversion is not None or spec:
                    raise ValueError(f"{{{name}}}: a target template takes no conversion or format spec")
                known = name in TEMPLATE_NAMES or (
                    name.startswith("tags.") and TAG_NAME_RE.match(name[len("tags.") :]) is not None
                )
                if not known:
                    raise ValueError(
                        f"{{{name}}} is not a template name; expected one of "
                        + ", ".join(f"{{{n}}}" for n in TEMPLATE_NAMES)
                        + " or {tags.<tag>}"
                    )
            parts.append((literal, name))
        self.source = source
        self.names = tuple(dict.fromkeys(name for _, name in parts if name is not None))
        self._parts = tuple(parts)

    def render(self, context: Mapping[str, str]) -> tuple[str | None, str]:
        """Return (text, "") or, when `context` lacks a name, (None, that name)."""
        out: list[str] = []
        for literal, name in self._parts:
            out.append(literal)
            if name is not None:
                value = context.get(name)
                if value is None:
                    return None, name
                out.append(value)
        return "".join(out), ""

    def __repr__(self) -> str:
        return f"ActionTemplate({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActionTemplate) and other.source == self.source

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


_ACTION_KINDS = ("command", "republish", "webhook")


def _action_kind(value: Any) -> str | None:
    if value == "alert":
        return "alert"
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _ACTION_KINDS:
        return str(next(iter(value)))
    return None


def _unwrap(kind: str) -> BeforeValidator:
    # `{command: {...}}` in YAML; the union tag has the same name, so error locations read
    # `on_raise[1].command.name` exactly like the YAML path.
    return BeforeValidator(lambda value: value[kind])


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
TagName = Annotated[
    str,
    _text_matching(
        TAG_NAME_RE,
        "tag_name",
        "expected a tag name of letters, digits, '_' and '-', starting with a letter or '_'",
    ),
]
MetricName = Annotated[
    str,
    _text_matching(
        FIELD_NAME_RE,
        "field_name",
        "expected a field name: a letter or '_', then letters, digits, '_', '.' or '-', at most 64",
    ),
]
Measurement = Annotated[
    str,
    _text_matching(
        MEASUREMENT_RE,
        "measurement",
        "expected a measurement name: a letter or '_', then letters, digits, '_', '.' or '-', at most 64",
    ),
]
# Registry type names and tag values are free text (devices.registry); 256 matches its limit.
TagText = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _text_or_list(value: object) -> str | list[str]:
    def text(item: object) -> bool:
        return isinstance(item, str) and 1 <= len(item) <= 256

    if text(value) or (isinstance(value, list) and value and all(text(item) for item in value)):
        return value  # type: ignore[return-value]
    raise PydanticCustomError("text_or_list", "expected text (1 to 256 characters) or a list of such texts")


TextOrList = Annotated[str | list[str], PlainValidator(_text_or_list)]


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise PydanticCustomError("duration", str(exc)) from None


def _template(value: object) -> ActionTemplate:
    if not isinstance(value, str) or not value:
        raise PydanticCustomError("template_type", "expected text, like '{device_id}-valve'")
    try:
        return ActionTemplate(value)
    except ValueError as exc:
        raise PydanticCustomError("template", "invalid template: {reason}", {"reason": str(exc)}) from None


def _aggregate(value: object) -> Aggregate:
    if not isinstance(value, str):
        raise PydanticCustomError("aggregate_type", "expected an aggregate as text, like avg(temperature)")
    try:
        return compile_aggregate(value)
    except ExpressionError as exc:
        raise PydanticCustomError(
            "aggregate",
            "invalid aggregate at column {column}: {reason}",
            {"column": exc.column, "reason": exc.reason},
        ) from None


Condition = Annotated[Expression, PlainValidator(_condition)]
Message = Annotated[MessageTemplate, PlainValidator(_message)]
Duration = Annotated[float, PlainValidator(_duration)]
Template = Annotated[ActionTemplate, PlainValidator(_template)]
AggregateExpr = Annotated[Aggregate, PlainValidator(_aggregate)]


class DeviceSelector(BaseModel):
    """Which devices a rule applies to: all of the given criteria must match.

    `ids`: device ids or fnmatch globs, any of which may match. `type`: a registry device type, or a
    list of them. `tags`: registry tags, each `name: value` or `name: [value, ...]`. A device outside
    the registry has no type and no tags, so only `ids` can select it.
    """

    model_config = _STRICT

    ids: list[DevicePattern] | None = Field(default=None, min_length=1)
    type: TextOrList | None = None
    tags: dict[TagName, TextOrList] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _something(self) -> DeviceSelector:
        if self.ids is None and self.type is None and self.tags is None:
            raise PydanticCustomError(
                "selector",
                "expected at least one of `ids`, `type` and `tags` (omit `devices` for all devices)",
            )
        return self

    @property
    def types(self) -> tuple[str, ...] | None:
        """Return the selected device types, or None for any."""
        if self.type is None:
            return None
        return (self.type,) if isinstance(self.type, str) else tuple(self.type)

    @property
    def tag_values(self) -> dict[str, tuple[str, ...]]:
        """Return each selected tag with its allowed values."""
        return {
            name: (value,) if isinstance(value, str) else tuple(value)
            for name, value in (self.tags or {}).items()
        }


def _selector_shorthand(value: Any) -> Any:
    # `devices: [a, b*]` is short for `devices: {ids: [a, b*]}`.
    return {"ids": value} if isinstance(value, list) else value


Selector = Annotated[DeviceSelector, BeforeValidator(_selector_shorthand)]


class CommandSpec(BaseModel):
    """A command a rule sends: to the device whose event triggered it, or to the `device` template's."""

    model_config = _STRICT

    name: CommandName
    params: dict[str, JsonValue] = {}
    device: Template | None = None  # e.g. "{device_id}-valve" or "{tags.site}-controller"
    cooldown: Duration = 0.0  # seconds; 0 sends on every transition


class RepublishSpec(BaseModel):
    """Publish the alert as JSON to an MQTT topic (a template, e.g. `alerts/{tags.site}/{rule}`)."""

    model_config = _STRICT

    topic: Template
    qos: Literal[0, 1] = 1
    retain: bool = False
    cooldown: Duration = 0.0

    @model_validator(mode="after")
    def _topic(self) -> RepublishSpec:
        literal = self.topic.source
        if any(c in literal for c in "+#\0"):
            raise PydanticCustomError("topic", "a topic must not contain the MQTT wildcards + and # (or NUL)")
        if len(literal.encode()) > 32_767:
            raise PydanticCustomError("topic", "the topic template is too long")
        return self


class WebhookSpec(BaseModel):
    """POST the alert as JSON to an HTTP(S) URL."""

    model_config = _STRICT

    url: str
    cooldown: Duration = 0.0

    @model_validator(mode="after")
    def _url(self) -> WebhookSpec:
        try:
            parts = urlsplit(self.url)
        except ValueError as exc:
            raise PydanticCustomError("url", "invalid URL: {reason}", {"reason": str(exc)}) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PydanticCustomError("url", "expected an http:// or https:// URL with a host")
        if any(ord(c) < 0x21 for c in self.url):
            raise PydanticCustomError("url", "a URL must not contain spaces or control characters")
        return self


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
    | Annotated[CommandSpec, _unwrap("command"), Tag("command")]
    | Annotated[RepublishSpec, _unwrap("republish"), Tag("republish")]
    | Annotated[WebhookSpec, _unwrap("webhook"), Tag("webhook")],
    Discriminator(
        _action_kind,
        custom_error_type="action",
        custom_error_message="expected `alert`, `command: {name: <command>, params: {...}}`, "
        "`republish: {topic: <topic>}` or `webhook: {url: <url>}`",
    ),
]
SendStep = CommandSpec | RepublishSpec | WebhookSpec


def _templates(step: SendStep) -> list[ActionTemplate]:
    if isinstance(step, CommandSpec):
        return [step.device] if step.device is not None else []
    if isinstance(step, RepublishSpec):
        return [step.topic]
    return []


def _check_actions(group_by: str | None, steps: list[Any], where: str) -> None:
    # Braces cannot be escaped in pydantic's error templates, so names in braces go in as values.
    for index, step in enumerate(steps):
        if step == "alert":
            continue
        if group_by is not None and isinstance(step, CommandSpec) and step.device is None:
            raise PydanticCustomError(
                "group_command",
                "{where}[{index}]: a group rule's command needs `device:`, a template naming the device "
                "to command (e.g. '{example}-controller'): its alarm belongs to a group, not a device",
                {"where": where, "index": index, "example": "{group}", "at": [where, index]},
            )
        for template in _templates(step):
            for name in template.names:
                if group_by is None and name == "group":
                    raise PydanticCustomError(
                        "template_name",
                        "{where}[{index}]: {name} is only known in a group rule (`group_by`)",
                        {"where": where, "index": index, "name": "{group}", "at": [where, index]},
                    )
                if group_by is not None and name not in _GROUP_TEMPLATE_NAMES and name != f"tags.{group_by}":
                    known = ", ".join(f"{{{n}}}" for n in _GROUP_TEMPLATE_NAMES)
                    raise PydanticCustomError(
                        "template_name",
                        "{where}[{index}]: {name} is not known in a group rule; expected {known} or {tag}",
                        {
                            "where": where,
                            "index": index,
                            "name": f"{{{name}}}",
                            "known": known,
                            "tag": f"{{tags.{group_by}}}",
                            "at": [where, index],
                        },
                    )


class Rule(BaseModel):
    """One rule: when to raise and clear an alarm per device (or group), and what to do then."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: RuleId
    description: str = ""
    devices: Selector | None = None
    group_by: TagName | None = None
    when: Condition | None = None
    absent: Duration | None = None
    clear: Condition | None = None
    hold: HoldSpec | None = Field(default=None, alias="for")
    min_interval: Duration = 0.0
    lateness: Duration | None = None  # None: the rule file's `lateness`, else DEFAULT_LATENESS
    time: TimeMode | None = None  # None: the rule file's `time`, else "event"
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
            extra = [name for name in ("clear", "hold", "group_by") if getattr(self, name) is not None]
            if extra:
                shown = "for" if extra[0] == "hold" else extra[0]
                raise PydanticCustomError(
                    "absent_extra",
                    "`{key}` does not apply to an absent rule: the next event from the device clears it",
                    {"key": shown},
                )
        if self.group_by is not None:
            for key, expression in (("when", self.when), ("clear", self.clear)):
                if expression is not None and expression.direct_fields:
                    raise PydanticCustomError(
                        "group_fields",
                        "{key}: a group rule reads fields only inside windowed functions over the group, "
                        "like avg({field}, 5m); `{field}` is read on its own",
                        {"key": key, "field": expression.direct_fields[0], "at": [key]},
                    )
        _check_actions(self.group_by, self.on_raise, "on_raise")
        _check_actions(self.group_by, self.on_clear, "on_clear")
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

    @property
    def processing_time(self) -> bool:
        """Tell whether the rule runs on the gateway's receive time rather than the payload's `ts`."""
        return self.time == "processing"

    def render_message(self, fields: Mapping[str, FieldValue]) -> str:
        """Return the alert text for an event with `fields`."""
        if self.message is not None:
            return self.message.render(fields)
        if self.description:
            return self.description
        if self.when is None:
            return f"no data for {format_duration(self.absent or 0.0)}"
        return self.when.source


class DerivedMetric(BaseModel):
    """A tumbling aggregate written to the store: `fields` per device (or group) every `every`."""

    model_config = _STRICT

    id: RuleId
    description: str = ""
    devices: Selector | None = None
    group_by: TagName | None = None
    every: Duration
    measurement: Measurement = DEFAULT_MEASUREMENT
    fields: dict[MetricName, AggregateExpr] = Field(min_length=1, max_length=MAX_DERIVED_FIELDS)
    lateness: Duration | None = None  # None: the rule file's `lateness`, else DEFAULT_LATENESS
    time: TimeMode | None = None  # None: the rule file's `time`, else "event"

    @model_validator(mode="after")
    def _check(self) -> DerivedMetric:
        if not MIN_EVERY <= self.every <= MAX_EVERY:
            raise PydanticCustomError("every", "every: expected a duration from 1s to 1d, like 1m")
        if self.measurement in RESERVED_MEASUREMENTS:
            raise PydanticCustomError(
                "measurement",
                "measurement: '{name}' is one of tidegate's own measurements; choose another name",
                {"name": self.measurement},
            )
        taken = {"time", "rule", "device", *([self.group_by] if self.group_by else [])}
        for name in self.fields:
            if name in taken:
                raise PydanticCustomError(
                    "field_name",
                    "fields: '{name}' is a tag or reserved name of the derived point; choose another",
                    {"name": name},
                )
        if self.group_by in ("rule", "device"):
            raise PydanticCustomError(
                "group_by", "group_by: '{name}' would clash with the point's own tag", {"name": self.group_by}
            )
        return self

    @property
    def processing_time(self) -> bool:
        """Tell whether intervals follow the gateway's receive time rather than the payload's `ts`."""
        return self.time == "processing"


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


class _Subject(BaseModel):
    """An expectation about one alarm subject: a device, or a group written `<tag>=<value>`."""

    model_config = _STRICT

    at: Duration
    device: str | None = None
    group: str | None = None

    @model_validator(mode="after")
    def _one_subject(self) -> _Subject:
        if (self.device is None) == (self.group is None):
            raise PydanticCustomError(
                "subject",
                "expected exactly one of `device: <id>` or `group: <tag>=<value>` (e.g. site=north)",
            )
        if self.group is not None and "=" not in self.group:
            raise PydanticCustomError("subject", "group: expected <tag>=<value>, like site=north")
        return self

    @property
    def subject(self) -> str:
        """Return the device id or the group."""
        return self.device if self.device is not None else str(self.group)


class ExpectedAlert(_Subject):
    """An alert a test case expects: rule, device (or group) and state at a time."""

    rule: RuleId
    state: AlertState


class ExpectedCommand(BaseModel):
    """A command a test case expects: sent on behalf of `rule` to `device` at a time."""

    model_config = _STRICT

    at: Duration
    rule: RuleId
    device: str
    command: CommandName
    params: dict[str, JsonValue] = {}


class ExpectedRepublish(_Subject):
    """An MQTT republish a test case expects: the alarm's rule, subject and state, and the topic."""

    rule: RuleId
    republish: str
    state: AlertState


class ExpectedWebhook(_Subject):
    """A webhook POST a test case expects: the alarm's rule, subject and state, and the URL."""

    rule: RuleId
    webhook: str
    state: AlertState


class ExpectedDerived(_Subject):
    """A derived point a test case expects, at its interval's start (`at`), with these fields."""

    derived: RuleId
    fields: dict[str, float]


_EXPECTED_KEYS = ("command", "republish", "webhook", "derived")


def _expected_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in _EXPECTED_KEYS:
            if key in value:
                return key
        if "state" in value:
            return "alert"
    return None


Expected = Annotated[
    Annotated[ExpectedAlert, Tag("alert")]
    | Annotated[ExpectedCommand, Tag("command")]
    | Annotated[ExpectedRepublish, Tag("republish")]
    | Annotated[ExpectedWebhook, Tag("webhook")]
    | Annotated[ExpectedDerived, Tag("derived")],
    Discriminator(
        _expected_kind,
        custom_error_type="expected_action",
        custom_error_message="expected an alert `{at, rule, device, state}`, a command "
        "`{at, rule, device, command, params}`, `{at, rule, device, republish: <topic>, state}`, "
        "`{at, rule, device, webhook: <url>, state}` or `{at, derived, device, fields}` "
        "(group: <tag>=<value> instead of device for group rules)",
    ),
]


class KnownDeviceSpec(BaseModel):
    """A registry device for a test case: its id, and the type and tags selectors may ask for."""

    model_config = _STRICT

    id: DevicePattern
    type: TagText | None = None
    tags: dict[TagText, TagText] = {}


def _known_shorthand(value: Any) -> Any:
    return {"id": value} if isinstance(value, str) else value


class RuleTest(BaseModel):
    """A test case in a rule file: events and clock steps in, exactly these actions out."""

    model_config = _STRICT

    name: str = Field(min_length=1)
    known_devices: list[Annotated[KnownDeviceSpec, BeforeValidator(_known_shorthand)]] = []
    events: list[Step] = Field(min_length=1)
    expect: list[Expected]


@dataclass(frozen=True, slots=True)
class RuleSet:
    """All rules and derived metrics of a deployment, in file-name order, each id unique.

    `files` maps a rule or derived-metric id to its file; `tests` maps a file name to the test
    cases it carries (files without tests are left out).
    """

    rules: tuple[Rule, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    tests: Mapping[str, tuple[RuleTest, ...]] = field(default_factory=dict)
    derived: tuple[DerivedMetric, ...] = ()

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules) + len(self.derived)

    def get(self, rule_id: str) -> Rule | None:
        """Return the rule with `rule_id`, if there is one."""
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        return None
