"""Evaluate rules against telemetry events and decide what should happen; time is passed in, never read.

Each (rule, device) pair is an alarm, ok or raised. Raised alarms are stored per rule, so a later
reload can keep the state of rules that did not change. Rules that need more than the current event
(windows, `for`, `min_interval`) also keep a small state object per device they have seen.

Two clocks meet here. Event time (`event.ts`) places readings in windows, starts `for` periods and
stamps alerts raised or cleared by an event. The gateway clock (`now`, passed to `process` and
`advance`) runs the timers: a `for` period that completes, an absence, a transition postponed by
`min_interval`, and command cooldowns. A timer scheduled while processing an event is due at that
event's `now` plus the duration, and the alert it raises is stamped with its due time.

Late events: the engine keeps each device's newest event time. An event older than that by more than
the rule file's `lateness` is late for the rule: it is not added to the rule's windows and does not
change its alarm, and the engine counts it once in `late_events` (the gateway still stores it as
telemetry). Absence rules are the exception: any event, late or not, shows the device is alive.

Reload (`replace_rules`): a rule whose id and definition are unchanged keeps its compiled object, and
so its windows, pending timers, postponements, cooldowns and raised alarms. A changed rule (same id,
any difference in its definition, including the file's `lateness` it inherits) and a removed rule
drop all of that; each of their raised alarms is closed with a `cleared` alert, message "rule
changed" or "rule removed", stamped with the reload time and with no values, so every `raised`
record in the store keeps a matching `cleared` one. Only the alert is recorded: `on_clear` commands
are not sent, because no condition cleared the alarm. A changed rule raises again, fresh, as soon
as its new condition holds. Absence rules that are new or changed count each device's silence from
the reload.

Restart (`checkpoint` / `restore`, format in `rules.checkpoint`): the same policy as a reload, with
the rule definitions compared by fingerprint. A rule whose definition is unchanged gets back its
windows, `for` and N-of-M progress, postponements, cooldowns, absence timers (including registry
devices never heard from) and raised alarms; the state of a changed or vanished rule is dropped and
its raised alarms are closed with "rule changed" / "rule removed" alerts stamped with the restore
time. Timers keep their due times on the gateway clock: one that came due while the gateway was
down fires on the first `advance` after `restore`, and its alert is stamped as it would have been
had the gateway kept running (a `for` period with its end, an absence with the time the silence
reached its limit). Events processed before that first `advance` (messages the broker held while
the gateway was down) count first: a device heard from by then does not raise its absence alarm.
"""

from __future__ import annotations

import fnmatch
import heapq
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from devices.event import FieldValue, TelemetryEvent
from rules.action import Action, AlertState, RecordAlert, SendCommand, Severity
from rules.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    as_fields,
    as_float,
    as_str,
    check_header,
    rule_fingerprint,
    times,
)
from rules.expression import EVALUATION_ERRORS, Expression, Extractor, Predicate, WindowSpec
from rules.model import DEFAULT_LATENESS, CommandSpec, NOfM, Rule, RuleSet
from rules.window import CountWindow, SlidingWindow, TimeWindow, needs_of

# Per-device rule lists are cached; past this many device ids the cache starts over, so ids that
# come and go cannot grow it without bound. Rebuilding an entry costs one selector match per rule.
PLAN_CACHE_LIMIT = 100_000
_GLOB_CHARS = re.compile(r"[*?\[]")

# How a compiled rule is run: inline on the hot path, through its per-device state, or by the clock.
_PLAIN: Final = 0
_STATEFUL: Final = 1
_ABSENT: Final = 2
# Timer kinds.
_HOLD_DONE: Final = 0  # a `for` period has run out
_SILENT: Final = 1  # an absence period may have run out
_POSTPONED: Final = 2  # a transition held back by `min_interval` may now happen


@dataclass(frozen=True, slots=True)
class AlarmStatus:
    """A raised alarm: since when, and the values that raised it."""

    rule_id: str
    device_id: str
    severity: Severity
    since: float
    values: Mapping[str, FieldValue]


@dataclass(frozen=True, slots=True)
class RuleReload:
    """What `RuleEngine.replace_rules` did: rule ids by outcome, and the alerts that close alarms."""

    unchanged: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    actions: list[Action] = field(default_factory=list)

    def summary(self) -> str:
        """Describe the reload in one line, e.g. `3 rules (1 unchanged, 1 changed, 1 added, 0 removed)`."""
        total = len(self.unchanged) + len(self.changed) + len(self.added)
        return (
            f"{total} rules ({len(self.unchanged)} unchanged, {len(self.changed)} changed, "
            f"{len(self.added)} added, {len(self.removed)} removed)"
        )


RULE_CHANGED_MESSAGE = "rule changed"
RULE_REMOVED_MESSAGE = "rule removed"


@dataclass(frozen=True, slots=True)
class _Alarm:
    since: float
    values: Mapping[str, FieldValue]


@dataclass(frozen=True, slots=True)
class _Postponed:
    raise_: bool
    values: dict[str, FieldValue]
    fields: Mapping[str, FieldValue]


class _Check:
    """One compiled condition, plus the field whose absence lets the hot path skip it."""

    __slots__ = ("negative", "skip_unless", "test")

    def __init__(self, expression: Expression) -> None:
        self.test: Predicate = expression.is_true
        self.negative: Predicate = expression.is_false
        # The predicate reads only `expression.fields`, so on an event carrying none of them it
        # answers as on an empty event; when that answer is "no", the event can go unevaluated.
        # Measured (10 rules, 1-2 fields per event): a dict `in` test costs ~15 ns against ~60 ns for
        # the call, while a set-disjointness test costs ~45 ns, about what the predicate's own
        # early exit costs; so only single-field conditions, the common case, get a skip test.
        # Windowed conditions change as windows move, so they are never skipped.
        skippable = len(expression.fields) == 1 and not expression.windows and not expression.is_true({})
        self.skip_unless = expression.fields[0] if skippable else None


class _DeviceState:
    """What a stateful rule remembers about one device."""

    __slots__ = ("clear_windows", "held_fields", "history", "hold_due", "holding", "when_windows", "windows")

    def __init__(
        self, windows: list[SlidingWindow], when_slots: Sequence[int], clear_slots: Sequence[int]
    ) -> None:
        self.windows = tuple(windows)
        self.when_windows = tuple(windows[i] for i in when_slots)
        self.clear_windows = tuple(windows[i] for i in clear_slots)
        self.holding: float | None = None  # event time since which `when` has held (for `for:`)
        self.hold_due = 0.0  # gateway time that period's timer is due; older timers are stale
        self.held_fields: Mapping[str, FieldValue] = {}  # the last event `when` held on
        self.history = 0  # N-of-M: the last outcomes of `when` as bits, newest lowest


def _merge_windows(expressions: Iterable[Expression]) -> list[WindowSpec]:
    merged: dict[tuple[str, bool, float, str], WindowSpec] = {}
    for expression in expressions:
        for spec in expression.windows:
            seen = merged.get(spec.key)
            functions = spec.functions | (seen.functions if seen is not None else frozenset())
            merged[spec.key] = WindowSpec(spec.key, spec.by_count, spec.size, spec.extract, functions)
    return list(merged.values())


def _new_window(spec: WindowSpec) -> SlidingWindow:
    needs = needs_of(spec.functions)
    if spec.by_count:
        return CountWindow(int(spec.size), needs)
    return TimeWindow(spec.size, needs)


class _CompiledRule:
    """A rule ready for the hot path, plus its alarms and per-device state."""

    __slots__ = (
        "absent",
        "alarms",
        "armed",
        "changed",
        "clear",
        "clear_expression",
        "clear_fields",
        "clear_slots",
        "extractors",
        "fingerprint",
        "hold",
        "kind",
        "lateness",
        "matches",
        "min_interval",
        "n_of_m",
        "postponed",
        "raise_",
        "raise_fields",
        "rule",
        "sent",
        "silent_from",
        "specs",
        "states",
        "when_expression",
        "when_slots",
    )

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.fingerprint = rule_fingerprint(rule)
        self.matches = _device_matcher(rule.devices)
        self.alarms: dict[str, _Alarm] = {}
        self.lateness = rule.lateness if rule.lateness is not None else DEFAULT_LATENESS
        self.min_interval = rule.min_interval
        self.changed: dict[str, float] = {}  # gateway time of each device's last transition
        self.postponed: dict[str, _Postponed] = {}
        self.sent: dict[tuple[str, bool, int], float] = {}  # (device, on raise, step) -> last send
        self.states: dict[str, _DeviceState] = {}
        self.armed: set[str] = set()  # absence: devices with a pending silence timer
        self.absent = rule.absent
        # Absence: silence counts from no earlier than this (gateway time); a rule added by a reload
        # must not raise at once for a device that was quiet before the rule existed.
        self.silent_from = float("-inf")
        self.hold = rule.hold if isinstance(rule.hold, float) else None
        self.n_of_m = rule.hold if isinstance(rule.hold, NOfM) else None
        if rule.when is None:
            self.kind = _ABSENT
            self.specs: list[WindowSpec] = []
            self.extractors: tuple[Extractor, ...] = ()
            self.when_slots: tuple[int, ...] = ()
            self.clear_slots: tuple[int, ...] = ()
            return
        clear = rule.clear_condition
        self.when_expression = rule.when
        self.clear_expression = clear
        self.raise_ = _Check(rule.when)
        self.clear = _Check(clear)
        self.raise_fields = rule.when.fields
        self.clear_fields = clear.fields
        self.specs = _merge_windows((rule.when, clear))
        keys = [spec.key for spec in self.specs]
        self.extractors = tuple(spec.extract for spec in self.specs)
        self.when_slots = tuple(keys.index(spec.key) for spec in rule.when.windows)
        self.clear_slots = tuple(keys.index(spec.key) for spec in clear.windows)
        stateful = self.specs or rule.hold is not None or rule.min_interval > 0
        self.kind = _STATEFUL if stateful else _PLAIN

    # -- events ------------------------------------------------------------------------------------

    def on_event(self, engine: RuleEngine, event: TelemetryEvent, now: float, actions: list[Action]) -> None:
        """Update this rule's windows and alarm for one event (the non-plain rules)."""
        device_id = event.device_id
        fields = event.fields
        ts = event.ts
        state = self.states.get(device_id)
        if state is None:
            state = self.states[device_id] = _DeviceState(
                [_new_window(spec) for spec in self.specs], self.when_slots, self.clear_slots
            )
        for window, extract in zip(state.windows, self.extractors, strict=True):
            try:
                value = extract(fields)
            except EVALUATION_ERRORS:
                engine.evaluation_errors += 1
                value = None
            window.update(ts, value)
        raised = device_id in self.alarms
        hold = self.hold
        if not raised and hold is not None and state.holding is not None and ts - state.holding >= hold:
            # `when` held from `holding` up to this event, which is past the period: the raise was due
            # before this event arrived (the clock had not ticked yet), so it comes first.
            due = state.holding + hold
            self.transition(engine, device_id, True, due, now, state.held_fields, actions, state)
            raised = device_id in self.alarms
        if raised:
            check, windows = self.clear, state.clear_windows
        else:
            check, windows = self.raise_, state.when_windows
        try:
            holds = check.test(fields, windows)
            # "Definitely not" matters only to undo something: a running `for`, N-of-M, a postponement.
            denied = not holds and (
                self.n_of_m is not None
                or (state.holding is not None and not raised)
                or device_id in self.postponed
            )
            if denied:
                denied = check.negative(fields, windows)
        except EVALUATION_ERRORS:
            engine.evaluation_errors += 1
            return
        if denied and self.postponed.pop(device_id, None) is not None:
            return  # the condition that asked for the postponed transition no longer holds
        if raised:
            if holds:
                self.transition(engine, device_id, False, ts, now, fields, actions, state)
            return
        if self.n_of_m is not None:
            if holds or denied:
                mask = (1 << self.n_of_m.of) - 1
                state.history = ((state.history << 1) | holds) & mask
                if state.history.bit_count() >= self.n_of_m.count:
                    self.transition(engine, device_id, True, ts, now, fields, actions, state)
            return
        if hold is None:
            if holds:
                self.transition(engine, device_id, True, ts, now, fields, actions, state)
            return
        if holds:
            state.held_fields = fields
            if state.holding is None:
                state.holding = ts
                if hold == 0:
                    self.transition(engine, device_id, True, ts, now, fields, actions, state)
                else:
                    state.hold_due = now + hold
                    engine.schedule(state.hold_due, _HOLD_DONE, self, device_id)
        elif denied:
            state.holding = None

    def on_absent_event(
        self, engine: RuleEngine, event: TelemetryEvent, now: float, actions: list[Action]
    ) -> None:
        """Clear the device's absence alarm, if raised, and make sure a silence timer is running."""
        device_id = event.device_id
        if device_id in self.alarms:
            self.transition(engine, device_id, False, event.ts, now, event.fields, actions, None)
        if device_id not in self.armed:
            self.armed.add(device_id)
            assert self.absent is not None
            engine.schedule(now + self.absent, _SILENT, self, device_id)

    # -- timers ------------------------------------------------------------------------------------

    def on_timer(
        self, engine: RuleEngine, kind: int, due: float, device_id: str, actions: list[Action]
    ) -> None:
        """Act on a timer that has come due (it may have been overtaken by events since)."""
        if kind == _SILENT:
            assert self.absent is not None
            if device_id in self.alarms:
                self.armed.discard(device_id)
                return
            seen = max(engine.last_seen(device_id), self.silent_from)
            silent_until = seen + self.absent
            if silent_until > due:
                engine.schedule(silent_until, _SILENT, self, device_id)
                return
            self.armed.discard(device_id)
            self.transition(engine, device_id, True, silent_until, silent_until, {}, actions, None)
        elif kind == _HOLD_DONE:
            state = self.states.get(device_id)
            if state is None or state.holding is None or state.hold_due != due or self.hold is None:
                return  # the period was broken (a newer one has its own timer) or already raised
            if device_id in self.alarms:
                return
            event_due = state.holding + self.hold
            self.transition(engine, device_id, True, event_due, due, state.held_fields, actions, state)
        else:
            postponed = self.postponed.pop(device_id, None)
            if postponed is None or postponed.raise_ == (device_id in self.alarms):
                return
            state = self.states.get(device_id)
            self._apply(
                engine,
                device_id,
                postponed.raise_,
                due,
                due,
                postponed.values,
                postponed.fields,
                actions,
                state,
            )

    # -- transitions -------------------------------------------------------------------------------

    def transition(
        self,
        engine: RuleEngine,
        device_id: str,
        raise_: bool,
        ts: float,
        now: float,
        fields: Mapping[str, FieldValue],
        actions: list[Action],
        state: _DeviceState | None,
    ) -> None:
        """Raise or clear the alarm of `device_id`, unless `min_interval` postpones it."""
        values = self.values(raise_, fields, state)
        if self.min_interval:
            last = self.changed.get(device_id)
            if last is not None and now - last < self.min_interval:
                if device_id not in self.postponed:
                    engine.schedule(last + self.min_interval, _POSTPONED, self, device_id)
                self.postponed[device_id] = _Postponed(raise_, values, fields)
                return
        self._apply(engine, device_id, raise_, ts, now, values, fields, actions, state)

    def _apply(
        self,
        engine: RuleEngine,
        device_id: str,
        raise_: bool,
        ts: float,
        now: float,
        values: dict[str, FieldValue],
        fields: Mapping[str, FieldValue],
        actions: list[Action],
        state: _DeviceState | None,
    ) -> None:
        rule = self.rule
        self.postponed.pop(device_id, None)
        if self.min_interval:
            self.changed[device_id] = now
        if raise_:
            self.alarms[device_id] = _Alarm(ts, values)
            if state is not None:
                state.holding = None
                state.history = 0
        else:
            del self.alarms[device_id]
        state_name: AlertState = "raised" if raise_ else "cleared"
        steps = rule.on_raise if raise_ else rule.on_clear
        for index, step in enumerate(steps):
            if isinstance(step, CommandSpec):
                if step.cooldown:
                    key = (device_id, raise_, index)
                    last = self.sent.get(key)
                    if last is not None and now - last < step.cooldown:
                        engine.suppressed_commands += 1
                        continue
                    self.sent[key] = now
                # A copy per command: whoever sends it may add to it without changing the rule.
                actions.append(SendCommand(device_id, step.name, dict(step.params), rule.id))
            else:
                message = rule.render_message(fields)
                # Its own copy of the values, safe from consumers.
                actions.append(
                    RecordAlert(rule.id, device_id, state_name, rule.severity, ts, message, dict(values))
                )

    def close_alarms(self, message: str, now: float, actions: list[Action]) -> None:
        """Record a `cleared` alert for every raised alarm, because the rule is being replaced."""
        rule = self.rule
        if "alert" not in rule.on_raise:
            return  # no `raised` record was written, so none needs closing
        for device_id in sorted(self.alarms):
            actions.append(RecordAlert(rule.id, device_id, "cleared", rule.severity, now, message, {}))

    def values(
        self, raise_: bool, fields: Mapping[str, FieldValue], state: _DeviceState | None
    ) -> dict[str, FieldValue]:
        """Return the values behind a transition: the fields and windowed results its condition read."""
        if self.kind == _ABSENT:
            return {}
        read = self.raise_fields if raise_ else self.clear_fields
        values = {name: fields[name] for name in read if name in fields}
        if state is not None:
            expression = self.when_expression if raise_ else self.clear_expression
            windows = state.when_windows if raise_ else state.clear_windows
            for use in expression.uses:
                result = use.value(windows)
                if result is not None:
                    values[use.source] = result
        return values

    # -- checkpoints -------------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Return this rule's alarms and per-device state as plain data (timers are the engine's)."""
        rule = self.rule
        return {
            "fingerprint": self.fingerprint,
            "alerts": "alert" in rule.on_raise,
            "severity": rule.severity,
            "alarms": {
                device_id: {"since": alarm.since, "values": dict(alarm.values)}
                for device_id, alarm in self.alarms.items()
            },
            "changed": dict(self.changed),
            "postponed": {
                device_id: {"raise": p.raise_, "values": dict(p.values), "fields": dict(p.fields)}
                for device_id, p in self.postponed.items()
            },
            "sent": [[device_id, raise_, index, t] for (device_id, raise_, index), t in self.sent.items()],
            "armed": sorted(self.armed),
            "silent_from": None if self.silent_from == float("-inf") else self.silent_from,
            "states": {
                device_id: {
                    "holding": state.holding,
                    "hold_due": state.hold_due,
                    "held_fields": dict(state.held_fields),
                    "history": state.history,
                    "windows": [window.export_state() for window in state.windows],
                }
                for device_id, state in self.states.items()
            },
        }

    def import_state(self, data: Mapping[str, Any]) -> None:
        """Load what `export_state` returned into this fresh copy of the same rule.

        Raises:
            KeyError, TypeError, ValueError: the data is not such a state.
        """
        self.alarms = {
            as_str(device_id): _Alarm(as_float(alarm["since"]), as_fields(alarm["values"]))
            for device_id, alarm in data["alarms"].items()
        }
        self.changed = times(data["changed"])
        self.postponed = {
            as_str(device_id): _Postponed(bool(p["raise"]), as_fields(p["values"]), as_fields(p["fields"]))
            for device_id, p in data["postponed"].items()
        }
        sent: dict[tuple[str, bool, int], float] = {}
        for device_id, raise_, index, t in data["sent"]:
            if not isinstance(index, int):
                raise TypeError(f"expected a step index, got {index!r}")
            sent[(as_str(device_id), bool(raise_), index)] = as_float(t)
        self.sent = sent
        self.armed = {as_str(device_id) for device_id in data["armed"]}
        silent_from = data["silent_from"]
        self.silent_from = float("-inf") if silent_from is None else as_float(silent_from)
        states: dict[str, _DeviceState] = {}
        for device_id, saved in data["states"].items():
            windows = [_new_window(spec) for spec in self.specs]
            saved_windows = saved["windows"]
            if len(saved_windows) != len(windows):
                raise ValueError(f"expected {len(windows)} windows, got {len(saved_windows)}")
            for window, window_data in zip(windows, saved_windows, strict=True):
                window.restore_state(window_data)
            state = _DeviceState(windows, self.when_slots, self.clear_slots)
            holding = saved["holding"]
            state.holding = None if holding is None else as_float(holding)
            state.hold_due = as_float(saved["hold_due"])
            state.held_fields = as_fields(saved["held_fields"])
            history = saved["history"]
            if not isinstance(history, int) or history < 0:
                raise TypeError(f"expected N-of-M history bits, got {history!r}")
            state.history = history
            states[as_str(device_id)] = state
        self.states = states


def _device_matcher(patterns: Sequence[str] | None) -> Callable[[str], bool]:
    if patterns is None:
        return lambda device_id: True
    exact = frozenset(p for p in patterns if _GLOB_CHARS.search(p) is None)
    globs = [p for p in patterns if _GLOB_CHARS.search(p) is not None]
    if not globs:
        return exact.__contains__
    # fnmatch.translate gives `(?s:...)\Z`; one alternation means one regex call per device id.
    glob_match = re.compile("|".join(fnmatch.translate(g) for g in globs)).match
    return lambda device_id: device_id in exact or glob_match(device_id) is not None


class RuleEngine:
    """Run a rule set over events: `process` each event, call `advance` as time passes.

    Args:
        rule_set: the rules to run.
        known_devices: device ids from the registry; absence rules cover them even if they never
            report, counting from the first time the engine is given (`process` or `advance`).

    Attributes:
        events: events processed.
        evaluation_errors: evaluations that failed on the event's data (a string compared with a
            number, a division by zero) and so counted as not firing.
        late_events: events older than a rule's allowed lateness, so skipped by that rule.
        suppressed_commands: commands not sent because their `cooldown` had not passed.
    """

    def __init__(self, rule_set: RuleSet, *, known_devices: Iterable[str] = ()) -> None:
        self.rule_set = rule_set
        self.events = 0
        self.evaluation_errors = 0
        self.late_events = 0
        self.suppressed_commands = 0
        self._rules = tuple(_CompiledRule(rule) for rule in rule_set)
        self._absence = tuple(compiled for compiled in self._rules if compiled.kind == _ABSENT)
        self._plans: dict[str, tuple[_CompiledRule, ...]] = {}
        self._newest: dict[str, float] = {}  # newest event time per device, for lateness
        self._seen: dict[str, float] = {}  # gateway time of each device's last event (absence rules)
        self._known = tuple(known_devices)
        self._start: float | None = None
        self._timers: list[tuple[float, int, int, _CompiledRule, str]] = []
        self._sequence = itertools.count()  # breaks ties between timers due at the same time

    def process(self, event: TelemetryEvent, now: float) -> list[Action]:
        """Evaluate the event against the rules for its device and return the resulting actions."""
        self.events += 1
        if self._start is None:
            self._begin(now)
        device_id = event.device_id
        plan = self._plans.get(device_id)
        if plan is None:
            plan = self._plan(device_id)
        ts = event.ts
        newest = self._newest.get(device_id)
        lag = 0.0
        if newest is None or ts > newest:
            self._newest[device_id] = ts
        else:
            lag = newest - ts
        if self._absence:
            self._seen[device_id] = now
        fields = event.fields
        actions: list[Action] = []
        late = False
        for compiled in plan:
            kind = compiled.kind
            if kind == _ABSENT:
                compiled.on_absent_event(self, event, now, actions)
                continue
            if lag and lag > compiled.lateness:
                late = True
                continue
            if kind == _STATEFUL:
                compiled.on_event(self, event, now, actions)
                continue
            raised = device_id in compiled.alarms
            check = compiled.clear if raised else compiled.raise_
            key = check.skip_unless
            if key is not None and key not in fields:
                continue
            try:
                fires = check.test(fields)
            except EVALUATION_ERRORS:
                self.evaluation_errors += 1
                continue
            if fires:
                compiled.transition(self, device_id, not raised, ts, now, fields, actions, None)
        if late:
            self.late_events += 1
        return actions

    def advance(self, now: float) -> list[Action]:
        """Fire the timers due by `now` (`for` periods, absences, postponed transitions), in due order."""
        if self._start is None:
            self._begin(now)
        timers = self._timers
        if not timers or timers[0][0] > now:
            return []
        actions: list[Action] = []
        while timers and timers[0][0] <= now:
            due, _, kind, compiled, device_id = heapq.heappop(timers)
            compiled.on_timer(self, kind, due, device_id, actions)
        return actions

    def add_known_devices(self, device_ids: Iterable[str], now: float) -> None:
        """Cover more registry devices with the absence rules, counting their silence from `now`."""
        if self._start is None:
            self._begin(now)
        for compiled in self._absence:
            for device_id in device_ids:
                if (
                    device_id not in compiled.armed
                    and device_id not in compiled.alarms
                    and compiled.matches(device_id)
                ):
                    self._seen.setdefault(device_id, now)
                    compiled.armed.add(device_id)
                    assert compiled.absent is not None
                    self.schedule(now + compiled.absent, _SILENT, compiled, device_id)

    def replace_rules(self, rule_set: RuleSet, now: float) -> RuleReload:
        """Run `rule_set` from now on, keeping the state of the rules that did not change.

        Returns which rules were unchanged, changed, added and removed, and the `cleared` alerts
        that close the raised alarms of changed and removed rules (see the module docstring).
        """
        old = {compiled.rule.id: compiled for compiled in self._rules}
        actions: list[Action] = []
        unchanged: list[str] = []
        changed: list[str] = []
        added: list[str] = []
        compiled_rules: list[_CompiledRule] = []
        fresh: list[_CompiledRule] = []
        for rule in rule_set:
            previous = old.pop(rule.id, None)
            if previous is not None and previous.rule == rule:
                unchanged.append(rule.id)
                compiled_rules.append(previous)
                continue
            if previous is None:
                added.append(rule.id)
            else:
                changed.append(rule.id)
                previous.close_alarms(RULE_CHANGED_MESSAGE, now, actions)
            compiled = _CompiledRule(rule)
            compiled.silent_from = now
            compiled_rules.append(compiled)
            fresh.append(compiled)
        for previous in old.values():
            previous.close_alarms(RULE_REMOVED_MESSAGE, now, actions)
        kept = {id(compiled) for compiled in compiled_rules}
        timers = [timer for timer in self._timers if id(timer[3]) in kept]
        heapq.heapify(timers)
        self._timers = timers
        self.rule_set = rule_set
        self._rules = tuple(compiled_rules)
        self._absence = tuple(compiled for compiled in self._rules if compiled.kind == _ABSENT)
        self._plans.clear()
        if self._start is not None:
            # Before the first event or tick, `_begin` arms every absence rule; after it, new ones
            # cover the devices heard from so far and the registry's.
            self._arm_fresh(fresh, now)
        return RuleReload(tuple(unchanged), tuple(changed), tuple(added), tuple(old), actions)

    def active_alarms(self) -> list[AlarmStatus]:
        """List the raised alarms, in rule order and then by device id."""
        return [
            AlarmStatus(compiled.rule.id, device_id, compiled.rule.severity, alarm.since, dict(alarm.values))
            for compiled in self._rules
            for device_id, alarm in sorted(compiled.alarms.items())
        ]

    def schedule(self, due: float, kind: int, compiled: _CompiledRule, device_id: str) -> None:
        """Have `advance` call back `compiled` for `device_id` once the clock reaches `due`."""
        heapq.heappush(self._timers, (due, next(self._sequence), kind, compiled, device_id))

    def last_seen(self, device_id: str) -> float:
        """Return the gateway time of the device's last event (or when the engine started)."""
        seen = self._seen.get(device_id)
        if seen is not None:
            return seen
        assert self._start is not None
        return self._start

    def _arm_fresh(self, fresh: Iterable[_CompiledRule], now: float) -> None:
        devices = dict.fromkeys((*self._known, *self._newest, *self._seen))
        for compiled in fresh:
            if compiled.kind != _ABSENT:
                continue
            assert compiled.absent is not None
            for device_id in devices:
                if compiled.matches(device_id):
                    compiled.armed.add(device_id)
                    self.schedule(now + compiled.absent, _SILENT, compiled, device_id)

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Return the engine's state as plain JSON-able data, for `restore` after a restart.

        The data shares nothing mutable with the engine, so it can be serialised in another thread
        while the engine runs on. Counters (`events`, `late_events`, ...) are not part of it.
        """
        ordered = sorted(self._timers, key=lambda timer: (timer[0], timer[1]))
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "engine": {
                "start": self._start,
                "newest": dict(self._newest),
                "seen": dict(self._seen),
                "timers": [
                    [due, kind, compiled.rule.id, device_id] for due, _, kind, compiled, device_id in ordered
                ],
            },
            "rules": {compiled.rule.id: compiled.export_state() for compiled in self._rules},
        }

    def restore(self, data: object, now: float) -> list[Action]:
        """Take back the state `checkpoint` returned, on a fresh engine, before its first event or tick.

        Rules whose definition is unchanged get their state back; changed and vanished rules are
        treated as by `replace_rules` at `now` (see the module docstring). Timers that came due
        while the engine was stopped fire on the first `advance`, stamped with their own due time.

        Returns the `cleared` alerts that close the alarms of changed and vanished rules.

        Raises:
            CheckpointError: the data is corrupt or of another format or version; the engine is
                left as it was.
        """
        if self._start is not None:
            raise RuntimeError("restore() must come before the engine's first event or tick")
        try:
            return self._restore(data, now)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise CheckpointError(f"corrupt checkpoint ({type(exc).__name__}: {exc})") from exc

    def _restore(self, data: object, now: float) -> list[Action]:
        saved_rules = check_header(data)
        assert isinstance(data, Mapping)
        saved_engine = data["engine"]
        start = saved_engine["start"]
        current = {compiled.rule.id: compiled for compiled in self._rules}
        restored: dict[str, _CompiledRule] = {}
        actions: list[Action] = []
        for rule_id, saved in saved_rules.items():
            compiled = current.get(rule_id)
            if compiled is not None and saved["fingerprint"] == compiled.fingerprint:
                fresh = _CompiledRule(compiled.rule)
                fresh.import_state(saved)
                restored[rule_id] = fresh
                continue
            message = RULE_REMOVED_MESSAGE if compiled is None else RULE_CHANGED_MESSAGE
            severity = saved["severity"]
            if severity not in ("info", "warning", "critical"):
                raise ValueError(f"rule {rule_id!r}: severity {severity!r}")
            if saved["alerts"] is True:
                for device_id in sorted(saved["alarms"]):
                    actions.append(
                        RecordAlert(as_str(rule_id), as_str(device_id), "cleared", severity, now, message, {})
                    )
        timers: list[tuple[float, int, _CompiledRule, str]] = []
        for due, kind, rule_id, device_id in saved_engine["timers"]:
            if kind not in (_HOLD_DONE, _SILENT, _POSTPONED):
                raise ValueError(f"timer kind {kind!r}")
            timer_rule = restored.get(rule_id)
            if timer_rule is not None:
                timers.append((as_float(due), kind, timer_rule, as_str(device_id)))
        newest, seen = times(saved_engine["newest"]), times(saved_engine["seen"])
        # Decoded without error: from here on nothing can fail halfway.
        fresh_rules: list[_CompiledRule] = []
        compiled_rules: list[_CompiledRule] = []
        for compiled in self._rules:
            kept = restored.get(compiled.rule.id)
            if kept is None:
                compiled.silent_from = now
                fresh_rules.append(compiled)
                kept = compiled
            compiled_rules.append(kept)
        self._rules = tuple(compiled_rules)
        self._absence = tuple(compiled for compiled in self._rules if compiled.kind == _ABSENT)
        self._plans.clear()
        self._newest, self._seen = newest, seen
        self._timers = []
        for due, kind, compiled, device_id in timers:
            self.schedule(due, kind, compiled, device_id)
        if start is None:
            return actions  # the saved engine had not started: `_begin` arms the absence rules
        self._start = as_float(start)
        self._arm_fresh(fresh_rules, now)
        # Registry devices the saved engine did not cover yet (the registry may have grown).
        self.add_known_devices(self._known, now)
        return actions

    def _begin(self, now: float) -> None:
        self._start = now
        if self._known:
            self.add_known_devices(self._known, now)

    def _plan(self, device_id: str) -> tuple[_CompiledRule, ...]:
        if len(self._plans) >= PLAN_CACHE_LIMIT:
            self._plans.clear()
        plan = tuple(compiled for compiled in self._rules if compiled.matches(device_id))
        self._plans[device_id] = plan
        return plan
