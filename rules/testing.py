"""Run the test cases that rule files carry (`tests:`), offline, with a fake clock.

Each case runs on a fresh engine holding only the rules of its own file. Times are seconds from the
start of the case (event time 0 is the moment the engine starts). The clock moves the way the
gateway moves it: an event step at `at` first ticks `advance` every whole second up to (not
including) `at`, then processes the event with `now = at` (an event whose `at` is behind the clock
is a late arrival: it is processed at the current clock); an `advance: D` step ticks every whole
second up to the clock plus D. An alert is reported at its own time (`ts`); a command, republish
or webhook at the clock time of the call that returned it; a derived point at its own time (the
start of its interval). `known_devices` entries are ids, or `{id, type, tags}` for type and tag
selectors and group rules.

A case passes when what happened is exactly what it expects: same time (to the millisecond), rule,
device (or group, `<tag>=<value>`) and state, command name and params, republish topic, webhook
URL, derived fields (numbers to 3 decimal places); the order among entries with the same time does
not matter, and any entry that is not expected fails the case. An action that could not be built
(e.g. a command to `{tags.site}-controller` for a device without that tag) shows as a `failed`
line, which no case can expect: it always fails the case.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

from devices.event import TelemetryEvent
from rules.action import (
    Action,
    FailedAction,
    RecordAlert,
    Republish,
    SendCommand,
    Webhook,
    WriteDerived,
)
from rules.duration import format_duration
from rules.engine import RuleEngine
from rules.model import (
    AdvanceStep,
    ExpectedAlert,
    ExpectedCommand,
    ExpectedDerived,
    ExpectedRepublish,
    ExpectedWebhook,
    RuleSet,
    RuleTest,
)

TICK = 1.0  # the gateway's engine tick (gateway.app.ENGINE_TICK)


@dataclass(frozen=True, slots=True)
class CaseResult:
    """The outcome of one test case: the expected and actual lines, and their diff when they differ."""

    file: str
    name: str
    expected: tuple[str, ...]
    actual: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """Return whether the actual alerts and commands are exactly the expected ones."""
        return self.expected == self.actual

    @property
    def diff(self) -> str:
        """Return a unified diff of expected against actual ("" when the case passed)."""
        if self.passed:
            return ""
        context = max(len(self.expected), len(self.actual))
        lines = difflib.unified_diff(self.expected, self.actual, "expected", "actual", lineterm="", n=context)
        return "\n".join(lines)


def run_rule_tests(rule_set: RuleSet) -> list[CaseResult]:
    """Run every test case of every file in `rule_set`, in file order."""
    results = []
    for file in sorted(rule_set.tests):
        rules = tuple(rule for rule in rule_set if rule_set.files.get(rule.id) == file)
        derived = tuple(metric for metric in rule_set.derived if rule_set.files.get(metric.id) == file)
        files = {rule.id: file for rule in rules} | {metric.id: file for metric in derived}
        own = RuleSet(rules, files, derived=derived)
        results += [run_case(own, case, file) for case in rule_set.tests[file]]
    return results


def run_case(rule_set: RuleSet, case: RuleTest, file: str = "") -> CaseResult:
    """Run one case against `rule_set` and compare what happened with what it expects."""
    engine = RuleEngine(rule_set, known_devices={device.id: device for device in case.known_devices})
    happened: list[tuple[float, str]] = []

    def record(actions: list[Action], now: float) -> None:
        happened.extend(_happened(action, now) for action in actions)

    clock = 0.0
    record(engine.advance(clock), clock)
    for step in case.events:
        if isinstance(step, AdvanceStep):
            target = clock + step.by
            for tick in _ticks(clock, target, inclusive=True):
                record(engine.advance(tick), tick)
            clock = target
            continue
        if step.at > clock:
            for tick in _ticks(clock, step.at, inclusive=False):
                record(engine.advance(tick), tick)
            clock = step.at
        record(engine.process(TelemetryEvent(step.device, step.at, step.fields), clock), clock)
    return CaseResult(
        file, case.name, _in_order([_expected(item) for item in case.expect]), _in_order(happened)
    )


def _happened(action: Action, now: float) -> tuple[float, str]:
    if isinstance(action, RecordAlert):
        return action.ts, _alert_line(action.ts, action.rule_id, action.device_id, action.state)
    if isinstance(action, SendCommand):
        return now, _command_line(now, action.rule_id, action.device_id, action.name, action.params)
    if isinstance(action, Republish | Webhook):
        payload = action.payload if isinstance(action, Republish) else action.body
        subject = _subject_of(payload)
        kind, target = (
            ("republish", action.topic) if isinstance(action, Republish) else ("webhook", action.url)
        )
        return now, _sent_line(now, action.rule_id, subject, kind, target, str(payload["state"]))
    if isinstance(action, WriteDerived):
        tags = dict(action.tags)
        subject = tags.get("device") or next(f"{k}={v}" for k, v in action.tags if k != "rule")
        return action.ts, _derived_line(action.ts, action.rule_id, subject, action.fields)
    assert isinstance(action, FailedAction)
    return now, (
        f"{{at: {format_duration(now)}, rule: {action.rule_id}, {_subject_key(action.device_id)}, "
        f"failed: {action.step}: {action.reason}}}"
    )


def _expected(
    item: ExpectedAlert | ExpectedCommand | ExpectedRepublish | ExpectedWebhook | ExpectedDerived,
) -> tuple[float, str]:
    if isinstance(item, ExpectedAlert):
        return item.at, _alert_line(item.at, item.rule, item.subject, item.state)
    if isinstance(item, ExpectedCommand):
        return item.at, _command_line(item.at, item.rule, item.device, item.command, item.params)
    if isinstance(item, ExpectedRepublish):
        return item.at, _sent_line(item.at, item.rule, item.subject, "republish", item.republish, item.state)
    if isinstance(item, ExpectedWebhook):
        return item.at, _sent_line(item.at, item.rule, item.subject, "webhook", item.webhook, item.state)
    return item.at, _derived_line(item.at, item.derived, item.subject, item.fields)


def _subject_of(payload: object) -> str:
    assert isinstance(payload, dict)
    group = payload.get("group")
    if isinstance(group, dict):
        [(name, value)] = group.items()
        return f"{name}={value}"
    return str(payload.get("device"))


def _subject_key(subject: str) -> str:
    return f"group: {subject}" if "=" in subject else f"device: {subject}"


def _ticks(start: float, end: float, *, inclusive: bool) -> Iterator[float]:
    tick = math.floor(start / TICK) * TICK + TICK
    while tick < end or (inclusive and tick <= end):
        yield tick
        tick += TICK
    if inclusive and end != tick - TICK and end > start:
        yield end  # a fractional end: the last call lands exactly on it


def _in_order(entries: list[tuple[float, str]]) -> tuple[str, ...]:
    # By time, then alerts before the rest, then by text: a stable order that ignores engine order.
    return tuple(
        line for _, line in sorted(entries, key=lambda e: (round(e[0], 3), not _is_alert(e[1]), e[1]))
    )


def _is_alert(line: str) -> bool:
    return not any(f" {kind}: " in line for kind in ("command", "republish", "webhook", "derived", "failed"))


def _alert_line(at: float, rule: str, subject: str, state: str) -> str:
    return f"{{at: {format_duration(at)}, rule: {rule}, {_subject_key(subject)}, state: {state}}}"


def _sent_line(at: float, rule: str, subject: str, kind: str, target: str, state: str) -> str:
    return f"{{at: {format_duration(at)}, rule: {rule}, {_subject_key(subject)}, {kind}: {target}, state: {state}}}"


def _derived_line(at: float, derived: str, subject: str, fields: object) -> str:
    assert isinstance(fields, dict)
    shown = json.dumps({name: round(float(value), 3) for name, value in fields.items()}, sort_keys=True)
    return f"{{at: {format_duration(at)}, derived: {derived}, {_subject_key(subject)}, fields: {shown}}}"


def _command_line(at: float, rule: str, device: str, name: str, params: object) -> str:
    shown = json.dumps(params, sort_keys=True, separators=(", ", ": "))
    return f"{{at: {format_duration(at)}, rule: {rule}, device: {device}, command: {name}, params: {shown}}}"
