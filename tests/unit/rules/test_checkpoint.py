"""Engine checkpoints: a restored engine carries on as if it had never stopped.

Every test passes the time in explicitly; nothing sleeps. Checkpoints go through `json` both ways,
as the gateway writes them.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.event import TelemetryEvent
from rules.action import Action, RecordAlert, WriteDerived
from rules.checkpoint import CHECKPOINT_VERSION, CheckpointError, rule_fingerprint
from rules.engine import RULE_CHANGED_MESSAGE, RULE_REMOVED_MESSAGE, RuleEngine
from rules.model import RuleSet
from rules.parse import build_rule_set
from rules.selector import KnownDevice

T0 = 1_764_000_000.0

RULES = """\
  - id: hot
    when: temperature > 30
    clear: temperature < 26
    for: 5s
    on_raise: [alert, {command: {name: fan, params: {on: true}, cooldown: 30s}}]
  - id: warm-avg
    when: avg(temperature, 1m) > 27
    min_interval: 10s
  - id: often
    when: temperature > 28
    for: {count: 2, of: 3}
  - id: spread
    when: max(temperature, 3 events) - min(temperature, 3 events) > 6
  - id: rising
    when: rate(temperature, 30s) > 0.5 or percentile(temperature, 90, 30s) > 33
  - id: quiet
    absent: 20s
  - id: site-warm
    group_by: site
    when: avg(temperature, 30s) > 29
    clear: avg(temperature, 30s) < 27
    for: 3s
  - id: site-swing
    group_by: site
    when: max(temperature, 20s) - min(temperature, 20s) > 8 or percentile(temperature, 90, 20s) > 34
"""
DERIVED = """\
derived:
  - id: per-device
    every: 10s
    fields: {t: avg(temperature), p50: "percentile(temperature, 50)", n: count(temperature)}
  - id: per-site
    group_by: site
    every: 15s
    time: processing
    fields: {top: max(temperature)}
"""
KNOWN = {
    "a": KnownDevice("sensor", {"site": "north"}),
    "b": KnownDevice("sensor", {"site": "north"}),
    "never": KnownDevice("sensor", {"site": "south"}),
}


@functools.cache  # a rule set is immutable; parsing it for every example would dominate the run time
def rule_set(text: str = RULES, derived: str = DERIVED) -> RuleSet:
    return build_rule_set({"r.yaml": f"lateness: 5s\nrules:\n{text}{derived}"})


def through_json(data: dict[str, Any]) -> Any:
    return json.loads(json.dumps(data))


def restored(data: Any, now: float, text: str = RULES) -> tuple[RuleEngine, list[Action]]:
    engine = RuleEngine(rule_set(text), known_devices=KNOWN)
    actions = engine.restore(through_json(data), now)
    return engine, actions


# A step: ("event", seconds on, device, temperature or None, lateness of the event) or ("tick", seconds on).
event_steps = st.tuples(
    st.just("event"),
    st.floats(0, 8, allow_nan=False).map(lambda x: round(x, 1)),
    st.sampled_from(["a", "b", "c"]),
    st.one_of(st.none(), st.integers(20, 36)),
    st.sampled_from([0.0, 0.0, 0.0, 3.0, 12.0]),
)
tick_steps = st.tuples(st.just("tick"), st.floats(0, 30, allow_nan=False).map(lambda x: round(x, 1)))
steps = st.lists(st.one_of(event_steps, tick_steps), min_size=1, max_size=60)


def run(engine: RuleEngine, step: tuple[Any, ...], now: float) -> list[Action]:
    if step[0] == "tick":
        return engine.advance(now)
    _, _, device, temperature, lag = step
    fields = {} if temperature is None else {"temperature": temperature}
    return engine.process(TelemetryEvent(device, now - lag, fields), now)


@settings(max_examples=150, deadline=None)
@given(steps=steps, split=st.integers(0, 60))
def test_a_restored_engine_acts_as_one_that_never_stopped(steps: list[tuple[Any, ...]], split: int) -> None:
    split = min(split, len(steps))
    never_stopped = RuleEngine(rule_set(), known_devices=KNOWN)
    now = T0
    expected: list[Action] = []
    actual: list[Action] = []
    second: RuleEngine | None = None
    for index, step in enumerate(steps):
        if index == split:
            second, closing = restored(never_stopped.checkpoint(), now)
            assert closing == []
        now += step[1]
        actions = run(never_stopped, step, now)
        if second is not None:
            expected.extend(actions)
            actual.extend(run(second, step, now))
    if second is None:
        second, _ = restored(never_stopped.checkpoint(), now)
    now += 120
    expected.extend(never_stopped.advance(now))
    actual.extend(second.advance(now))
    assert actual == expected
    assert second.active_alarms() == never_stopped.active_alarms()


def test_a_checkpoint_is_plain_json_with_a_version_and_fingerprints() -> None:
    engine = RuleEngine(rule_set(), known_devices=KNOWN)
    engine.process(TelemetryEvent("a", T0, {"temperature": 31}), T0)
    data = engine.checkpoint()
    assert json.loads(json.dumps(data)) == data
    assert data["version"] == CHECKPOINT_VERSION
    hot = rule_set().get("hot")
    assert hot is not None
    assert data["rules"]["hot"]["fingerprint"] == rule_fingerprint(hot)


def test_a_pending_for_period_completes_at_its_original_time_after_a_restart() -> None:
    engine = RuleEngine(rule_set(), known_devices=KNOWN)
    engine.process(TelemetryEvent("a", T0, {"temperature": 31}), T0)
    data = engine.checkpoint()
    # stopped at T0 + 1, started again at T0 + 30: the 5 s period ran out while it was down
    second, _ = restored(data, T0 + 30)
    raised = [a for a in second.advance(T0 + 30) if isinstance(a, RecordAlert) and a.rule_id == "hot"]
    assert [(a.state, a.ts - T0) for a in raised] == [("raised", 5.0)]


def test_a_raised_alarm_stays_raised_and_does_not_raise_again() -> None:
    engine = RuleEngine(rule_set(), known_devices=KNOWN)
    engine.process(TelemetryEvent("a", T0, {"temperature": 31}), T0)
    engine.advance(T0 + 5)
    second, _ = restored(engine.checkpoint(), T0 + 6)
    assert [(a.rule_id, a.since - T0) for a in second.active_alarms() if a.rule_id == "hot"] == [("hot", 5.0)]
    actions = second.process(TelemetryEvent("a", T0 + 7, {"temperature": 32}), T0 + 7)
    assert [a for a in actions if isinstance(a, RecordAlert) and a.rule_id == "hot"] == []


def test_a_never_seen_registry_device_keeps_its_absence_timer() -> None:
    engine = RuleEngine(rule_set(), known_devices=KNOWN)
    engine.advance(T0)
    second, _ = restored(engine.checkpoint(), T0 + 10)
    actions = second.advance(T0 + 40)
    quiet = [(a.device_id, a.ts - T0) for a in actions if isinstance(a, RecordAlert) and a.rule_id == "quiet"]
    assert quiet == [("a", 20.0), ("b", 20.0), ("never", 20.0)]


def test_changed_and_vanished_rules_lose_their_state_and_close_their_alarms() -> None:
    engine = RuleEngine(rule_set(), known_devices=KNOWN)
    engine.process(TelemetryEvent("a", T0, {"temperature": 35}), T0)
    engine.advance(T0 + 5)
    assert "hot" in {a.rule_id for a in engine.active_alarms()}
    changed = RULES.replace("temperature > 30", "temperature > 31")
    second = RuleEngine(rule_set(changed), known_devices=KNOWN)
    actions = second.restore(through_json(engine.checkpoint()), T0 + 10)
    assert [
        (a.rule_id, a.device_id, a.state, a.ts - T0, a.message) for a in actions if isinstance(a, RecordAlert)
    ] == [("hot", "a", "cleared", 10.0, RULE_CHANGED_MESSAGE)]
    assert "hot" not in {a.rule_id for a in second.active_alarms()}
    # the changed rule starts fresh: a new `for` period
    second.process(TelemetryEvent("a", T0 + 11, {"temperature": 35}), T0 + 11)
    raised = [a for a in second.advance(T0 + 16) if isinstance(a, RecordAlert) and a.rule_id == "hot"]
    assert [(a.state, a.ts - T0) for a in raised] == [("raised", 16.0)]


def test_a_vanished_rule_closes_its_alarms() -> None:
    engine = RuleEngine(rule_set("  - id: hot\n    when: temperature > 30\n"))
    engine.process(TelemetryEvent("a", T0, {"temperature": 35}), T0)
    second = RuleEngine(rule_set("  - id: wet\n    when: humidity > 90\n"))
    actions = second.restore(through_json(engine.checkpoint()), T0 + 3)
    assert [(a.rule_id, a.message, a.ts - T0) for a in actions if isinstance(a, RecordAlert)] == [
        ("hot", RULE_REMOVED_MESSAGE, 3.0)
    ]
    assert second.active_alarms() == []


def _corrupt(data: dict[str, Any]) -> dict[str, Any]:
    data["rules"]["hot"]["alarms"] = {"a": {"since": "yesterday", "values": {}}}
    return data


def _corrupt_window(data: dict[str, Any]) -> dict[str, Any]:
    data["rules"]["warm-avg"]["states"]["a"]["data"][0] = float("nan")  # a window's head bucket
    return data


def _short_window(data: dict[str, Any]) -> dict[str, Any]:
    data["rules"]["warm-avg"]["states"]["a"]["data"].pop()
    return data


def _corrupt_interval(data: dict[str, Any]) -> dict[str, Any]:
    data["rules"]["per-device"]["open"]["a"][0][2] = []
    return data


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda data: [1, 2], "expected a JSON object"),
        (lambda data: {**data, "format": "other"}, "not a tidegate rule state file"),
        (lambda data: {**data, "version": 99}, "version 99 is not the supported version"),
        (lambda data: {k: v for k, v in data.items() if k != "rules"}, "missing"),
        (_corrupt, "corrupt checkpoint"),
        (_corrupt_window, "time window state out of range"),
        (_short_window, "does not fit the rule's windows"),
        (_corrupt_interval, "interval state does not fit"),
        (lambda data: {**data, "engine": {**data["engine"], "timers": [[1, 7, "hot", "a"]]}}, "corrupt"),
    ],
)
def test_a_bad_checkpoint_is_refused_and_the_engine_is_left_alone(mangle: Any, reason: str) -> None:
    engine = RuleEngine(rule_set(), known_devices=KNOWN)
    engine.process(TelemetryEvent("a", T0, {"temperature": 31}), T0)
    data = mangle(through_json(engine.checkpoint()))
    second = RuleEngine(rule_set(), known_devices=KNOWN)
    with pytest.raises(CheckpointError, match=reason):
        second.restore(data, T0 + 1)
    assert second.active_alarms() == []
    # still usable, and still a fresh engine
    started = second.process(TelemetryEvent("a", T0 + 2, {"temperature": 31}), T0 + 2)
    assert [a for a in started if isinstance(a, RecordAlert) and a.rule_id == "hot"] == []
    raised = second.advance(T0 + 7)
    assert [a.ts - T0 for a in raised if isinstance(a, RecordAlert) and a.rule_id == "hot"] == [7.0]


def test_restore_is_refused_once_the_engine_runs() -> None:
    engine = RuleEngine(rule_set())
    engine.advance(T0)
    with pytest.raises(RuntimeError):
        engine.restore(engine.checkpoint(), T0)


def test_group_windows_and_unfinished_intervals_survive_a_restart() -> None:
    engine = RuleEngine(rule_set(), known_devices=KNOWN)
    for i, (device, temperature) in enumerate([("a", 31), ("b", 33), ("a", 20)]):
        engine.process(TelemetryEvent(device, T0 + i, {"temperature": temperature}), T0 + i)
    before = engine.window_values("site-swing", "site=north"), engine.window_values("per-device", "a")
    second, closing = restored(engine.checkpoint(), T0 + 4)
    assert closing == []
    assert (
        second.window_values("site-swing", "site=north"),
        second.window_values("per-device", "a"),
    ) == before
    assert before[0] == {
        "max(temperature, 20s)": 33.0,
        "min(temperature, 20s)": 20.0,
        "percentile(temperature, 90, 20s)": 32.6,
    }
    assert before[1] == {"t": 25.5, "p50": 25.5, "n": 2.0}
    # the interval [T0, T0 + 10) is written once, by the restored engine, whole
    points = [a for a in second.advance(T0 + 30) if isinstance(a, WriteDerived) and a.rule_id == "per-device"]
    assert [(dict(p.tags)["device"], p.fields["n"]) for p in points] == [("a", 2.0), ("b", 1.0)]


def test_a_version_1_file_closes_its_alarms_and_starts_fresh() -> None:
    legacy = {
        "format": "tidegate-rules-state",
        "version": 1,
        "engine": {"start": T0, "newest": {"a": T0}, "seen": {"a": T0}, "timers": [[T0 + 5, 0, "hot", "a"]]},
        "rules": {
            "hot": {
                "fingerprint": "f" * 64,
                "alerts": True,
                "severity": "warning",
                "alarms": {"a": {"since": T0, "values": {"temperature": 31}}},
                "states": {"a": {"windows": [], "holding": None}},
            },
            "quiet": {"fingerprint": "0" * 64, "alerts": True, "severity": "critical", "alarms": {}},
        },
    }
    engine = RuleEngine(rule_set(), known_devices=KNOWN)
    actions = engine.restore(legacy, T0 + 10)
    assert [(a.rule_id, a.device_id, a.state, a.message) for a in actions if isinstance(a, RecordAlert)] == [
        ("hot", "a", "cleared", RULE_CHANGED_MESSAGE)
    ]
    assert engine.active_alarms() == []
    assert engine.advance(T0 + 10) == []  # its timers are gone with the rest of its state
