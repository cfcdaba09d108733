"""Run the test cases that rule files carry (`tests:`), offline, with a fake clock.

Each case runs on a fresh engine holding only the rules of its own file. Times are seconds from the
start of the case (event time 0 is the moment the engine starts). The clock moves the way the
gateway moves it: an event step at `at` first ticks `advance` every whole second up to (not
including) `at`, then processes the event with `now = at` (an event whose `at` is behind the clock
is a late arrival: it is processed at the current clock); an `advance: D` step ticks every whole
second up to the clock plus D. An alert is reported at its own time (`ts`), a command at the clock
time of the call that returned it.

A case passes when its alerts and commands are exactly the expected ones: same time (to the
millisecond), rule, device and state, or command name and params; the order among entries with the
same time does not matter, and any entry that is not expected fails the case.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

from devices.event import TelemetryEvent
from rules.action import Action, RecordAlert
from rules.duration import format_duration
from rules.engine import RuleEngine
from rules.model import AdvanceStep, ExpectedAlert, RuleSet, RuleTest

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
        own = RuleSet(rules, {rule.id: file for rule in rules})
        results += [run_case(own, case, file) for case in rule_set.tests[file]]
    return results


def run_case(rule_set: RuleSet, case: RuleTest, file: str = "") -> CaseResult:
    """Run one case against `rule_set` and compare what happened with what it expects."""
    engine = RuleEngine(rule_set, known_devices=case.known_devices)
    happened: list[tuple[float, str]] = []

    def record(actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, RecordAlert):
                happened.append(
                    (action.ts, _alert_line(action.ts, action.rule_id, action.device_id, action.state))
                )
            else:
                line = _command_line(now, action.rule_id, action.device_id, action.name, action.params)
                happened.append((now, line))

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
    expected = [
        (item.at, _alert_line(item.at, item.rule, item.device, item.state))
        if isinstance(item, ExpectedAlert)
        else (item.at, _command_line(item.at, item.rule, item.device, item.command, item.params))
        for item in case.expect
    ]
    return CaseResult(file, case.name, _in_order(expected), _in_order(happened))


def _ticks(start: float, end: float, *, inclusive: bool) -> Iterator[float]:
    tick = math.floor(start / TICK) * TICK + TICK
    while tick < end or (inclusive and tick <= end):
        yield tick
        tick += TICK
    if inclusive and end != tick - TICK and end > start:
        yield end  # a fractional end: the last call lands exactly on it


def _in_order(entries: list[tuple[float, str]]) -> tuple[str, ...]:
    # By time, then alerts before commands, then by text: a stable order that ignores engine order.
    return tuple(
        line for _, line in sorted(entries, key=lambda e: (round(e[0], 3), "command: " in e[1], e[1]))
    )


def _alert_line(at: float, rule: str, device: str, state: str) -> str:
    return f"{{at: {format_duration(at)}, rule: {rule}, device: {device}, state: {state}}}"


def _command_line(at: float, rule: str, device: str, name: str, params: object) -> str:
    shown = json.dumps(params, sort_keys=True, separators=(", ", ": "))
    return f"{{at: {format_duration(at)}, rule: {rule}, device: {device}, command: {name}, params: {shown}}}"
