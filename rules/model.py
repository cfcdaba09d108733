"""Rule definitions as written by users, validated into immutable values.

A rule file is YAML with one top-level key, `rules`, holding a list of rules::

    rules:
      - id: greenhouse-overheat            # required; unique across all files; [a-z0-9][a-z0-9_.-]*
        description: Too hot; run the fan  # optional text for people
        devices: ["greenhouse-*", "sim-*"] # optional; device ids or fnmatch globs (* ? [...]);
                                           #   omitted means every device
        when: temperature > 30             # required expression: raises the alarm
        clear: temperature < 26            # optional expression: clears it (hysteresis);
                                           #   omitted means `not (when)`
        severity: warning                  # info | warning | critical; default warning
        message: "temperature {temperature} above 30"
                                           # optional; {field} and {field:.1f} take the event's
                                           #   fields; a missing field shows as `?`; omitted means
                                           #   the description, or else the `when` text
        on_raise:                          # optional list of actions; default [alert]
          - alert
          - command: {name: fan, params: {on: true}}
        on_clear:                          # optional list of actions; default [alert]
          - alert
          - command: {name: fan, params: {on: false}}

Semantics: each (rule, device) pair is an alarm that is either ok or raised. An event from a matching
device raises an ok alarm when `when` holds, running `on_raise`; it clears a raised alarm when the
clear condition holds, running `on_clear`. While raised, `when` is not re-evaluated, so nothing
repeats. `alert` records the transition (rule, device, state, severity, event time, message and the
values of the fields the deciding expression read); `command` sends `name` with `params` (any JSON
values) to the device the event came from.

Expressions are described in `rules.expression`: field names, numbers, 'strings', True/False,
comparisons (chained too), and/or/not, + - * / %, abs/min/max/round, and has(field). A comparison
that reads a field the event lacks is neither true nor false, so it never fires either way.

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
)
from pydantic_core import PydanticCustomError

from devices.event import FieldValue
from devices.payload import FIELD_NAME_RE
from rules.action import Severity
from rules.expression import Expression, ExpressionError, compile_expression

RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}\Z")
# Device id characters (devices.topic) plus the fnmatch metacharacters.
DEVICE_PATTERN_RE = re.compile(r"[A-Za-z0-9_.:*?\[\]!-]{1,128}\Z")
COMMAND_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# The standard format-spec mini-language, with width and precision capped at three digits so a
# template cannot ask for a gigabyte of padding.
_FORMAT_SPEC_RE = re.compile(r"(?:.?[<>=^])?[+\- ]?z?#?0?\d{0,3}[,_]?(?:\.\d{1,3})?[bcdeEfFgGnosxX%]?\Z")
MISSING_FIELD_TEXT = "?"

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
Condition = Annotated[Expression, PlainValidator(_condition)]
Message = Annotated[MessageTemplate, PlainValidator(_message)]


class CommandSpec(BaseModel):
    """A command a rule sends to the device whose event triggered it."""

    model_config = _STRICT

    name: CommandName
    params: dict[str, JsonValue] = {}


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

    model_config = _STRICT

    id: RuleId
    description: str = ""
    devices: list[DevicePattern] | None = Field(default=None, min_length=1)
    when: Condition
    clear: Condition | None = None
    severity: Severity = "warning"
    message: Message | None = None
    on_raise: list[ActionStep] = ["alert"]
    on_clear: list[ActionStep] = ["alert"]

    @property
    def clear_condition(self) -> Expression:
        """Return the condition that clears a raised alarm: `clear`, or else `not (when)`."""
        return self.clear if self.clear is not None else self.when.negated()

    def render_message(self, fields: Mapping[str, FieldValue]) -> str:
        """Return the alert text for an event with `fields`."""
        if self.message is not None:
            return self.message.render(fields)
        return self.description or self.when.source


@dataclass(frozen=True, slots=True)
class RuleSet:
    """All rules of a deployment, in file-name order, each id unique; `files` maps rule id to file."""

    rules: tuple[Rule, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)

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
