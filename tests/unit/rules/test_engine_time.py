"""The engine over time: windows, lateness, `for`, N-of-M, min_interval, cooldown and absence.

Every test drives a fake clock: `now` is passed in, and timers fire only from `advance(now)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from devices.errors import SourceFileError
from devices.event import FieldValue, TelemetryEvent
from rules.action import Action, RecordAlert, SendCommand
from rules.engine import RuleEngine, _CompiledRule
from rules.parse import build_rule_set

T0 = 1_764_000_000.0  # a multiple of every bucket width used here, so windows align with T0


def make_engine(rules: str, *, lateness: str = "30s", known: Sequence[str] = ()) -> RuleEngine:
    text = f"lateness: {lateness}\nrules:\n{rules}"
    return RuleEngine(build_rule_set({"r.yaml": text}), known_devices=known)


def rule(when: str, *extra: str, rule_id: str = "r") -> str:
    return "\n".join([f"  - id: {rule_id}", f"    when: {when}", *(f"    {line}" for line in extra), ""])


def summary(actions: Sequence[Action]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for action in actions:
        if isinstance(action, RecordAlert):
            out.append((action.state, action.device_id, action.ts - T0))
        else:
            assert isinstance(action, SendCommand)
            out.append(("command", action.name, dict(action.params)))
    return out


Step = tuple[float, Mapping[str, FieldValue]] | tuple[float, str]


def drive(
    engine: RuleEngine, steps: Sequence[Step], device: str = "d"
) -> list[tuple[float, list[tuple[object, ...]]]]:
    """Feed events (t, fields) or clock ticks (t, "tick") at T0 + t; return what happened when."""
    happened = []
    for t, what in steps:
        if what == "tick":
            actions = engine.advance(T0 + t)
        else:
            assert isinstance(what, dict)
            actions = engine.process(TelemetryEvent(device, T0 + t, what), T0 + t)
        if actions:
            happened.append((t, summary(actions)))
    return happened


# -- windowed conditions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "clear", "steps", "expected"),
    [
        pytest.param(
            "avg(t, 1m) > 30",
            "avg(t, 1m) < 25",
            # at 70s the average is (35 + 20) / 2, above 25; at 90s the 20s reading has left the window
            [(0, {"t": 28}), (10, {"t": 33}), (20, {"t": 35}), (70, {"t": 20}), (90, {"t": 20})],
            [(10, [("raised", "d", 10)]), (90, [("cleared", "d", 90)])],
            id="avg-time",
        ),
        pytest.param(
            "avg(t, 3 events) > 30",
            None,
            [(0, {"t": 40}), (1, {"t": 20}), (2, {"t": 20}), (3, {"t": 60}), (4, {"t": 20})],
            [(0, [("raised", "d", 0)]), (1, [("cleared", "d", 1)]), (3, [("raised", "d", 3)])],
            id="avg-count",
        ),
        pytest.param(
            "count_if(status == 'fault', 5m) >= 3",
            "count_if(status == 'fault', 5m) == 0",
            [
                (0, {"status": "fault"}),
                (60, {"status": "ok"}),
                (90, {"status": "fault"}),
                (120, {"status": "fault"}),
                (200, {"status": "ok"}),
                (450, {"status": "ok"}),
            ],
            [(120, [("raised", "d", 120)]), (450, [("cleared", "d", 450)])],
            id="count-if",
        ),
        pytest.param(
            "rate(counter, 1m) > 2",
            None,
            [(0, {"counter": 0}), (10, {"counter": 10}), (20, {"counter": 50}), (30, {"counter": 55})],
            [(20, [("raised", "d", 20)]), (30, [("cleared", "d", 30)])],
            id="rate-per-second",
        ),
        pytest.param(
            "percentile(latency, 90, 10 events) > 100",
            None,
            [(i, {"latency": 50}) for i in range(9)] + [(9, {"latency": 500}), (10, {"latency": 500})],
            [(10, [("raised", "d", 10)])],
            id="percentile",
        ),
        pytest.param(
            "max(t, 1m) - min(t, 1m) > 10 and has(t)",
            None,
            [(0, {"t": 20}), (30, {"t": 25}), (45, {"t": 31}), (100, {"t": 31})],
            [(45, [("raised", "d", 45)]), (100, [("cleared", "d", 100)])],
            id="spread",
        ),
    ],
)
def test_windowed_rules(
    when: str, clear: str | None, steps: list[Step], expected: list[tuple[float, list[tuple[object, ...]]]]
) -> None:
    engine = make_engine(rule(when, *([f"clear: {clear}"] if clear else [])))
    assert drive(engine, steps) == expected


def test_windows_are_per_device_and_shared_by_when_and_clear() -> None:
    engine = make_engine(rule("avg(t, 1m) > 30", "clear: avg(t, 1m) < 30"))
    engine.process(TelemetryEvent("a", T0, {"t": 40}), T0)
    engine.process(TelemetryEvent("b", T0, {"t": 10}), T0)
    [compiled] = engine._rules
    assert isinstance(compiled, _CompiledRule) and len(compiled.specs) == 1  # one window serves both
    assert [a.device_id for a in engine.active_alarms()] == ["a"]
    [alarm] = engine.active_alarms()
    assert alarm.values == {"t": 40, "avg(t, 1m)": 40.0}


def test_window_value_errors_are_counted() -> None:
    engine = make_engine(rule("avg(t, 1m) > 30"))
    assert engine.process(TelemetryEvent("d", T0, {"t": "hot"}), T0) == []
    assert engine.evaluation_errors == 1


# -- lateness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lateness", "late_t", "late", "average"),
    [
        ("30s", 100, False, 20.0),  # 20s behind the newest: within lateness, added to its bucket
        ("30s", 80, True, 30.0),  # 40s behind: late, not added, counted
        ("0s", 119, True, 30.0),
        ("2m", 10, False, 20.0),
    ],
)
def test_late_events_are_counted_and_not_added(
    lateness: str, late_t: float, late: bool, average: float
) -> None:
    engine = make_engine(rule("avg(t, 5m) > 100"), lateness=lateness)
    engine.process(TelemetryEvent("d", T0 + 120, {"t": 30}), T0 + 120)
    engine.process(TelemetryEvent("d", T0 + late_t, {"t": 10}), T0 + 121)
    assert engine.late_events == int(late)
    assert engine.window_values("r", "d") == {"avg(t, 5m)": average}


def test_a_late_event_does_not_change_an_alarm() -> None:
    engine = make_engine(rule("t > 30"))
    assert drive(engine, [(100, {"t": 35}), (10, {"t": 20})]) == [(100, [("raised", "d", 100)])]
    assert engine.late_events == 1


# -- for: duration and N-of-M -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(
            [(0, {"t": 31}), (60, {"t": 32}), (119, "tick"), (120, "tick")],
            [(120, [("raised", "d", 120)])],
            id="raised-by-the-clock",
        ),
        pytest.param(
            [(0, {"t": 31}), (130, {"t": 32})],
            [(130, [("raised", "d", 120)])],
            id="raised-by-the-next-event-stamped-when-due",
        ),
        pytest.param(
            [(0, {"t": 31}), (60, {"t": 29}), (120, "tick"), (150, {"t": 31}), (269, "tick"), (270, "tick")],
            [(270, [("raised", "d", 270)])],
            id="a-false-reading-restarts-the-period",
        ),
        pytest.param(
            [(0, {"t": 31}), (60, {"h": 50}), (120, "tick")],
            [(120, [("raised", "d", 120)])],
            id="an-event-without-the-field-does-not-break-it",
        ),
        pytest.param(
            [(0, {"t": 31}), (200, "tick"), (210, {"t": 20})],
            [(200, [("raised", "d", 120)]), (210, [("cleared", "d", 210)])],
            id="clears-at-once",
        ),
    ],
)
def test_for_duration(steps: list[Step], expected: list[tuple[float, list[tuple[object, ...]]]]) -> None:
    engine = make_engine(rule("t > 30", "for: 2m"))
    assert drive(engine, steps) == expected


@pytest.mark.parametrize(
    ("readings", "raised_at"),
    [
        ([31, 31, 31], 2),
        ([31, 20, 31, 20, 31], 4),
        ([31, 20, 20, 20, 31, 31], None),  # only 2 of the last 5 by then... until the next one
        ([31, 20, 20, 20, 31, 31, 31], 6),
        ([31, None, 31, None, 31], 4),  # readings without the field are not evaluations
    ],
)
def test_n_of_m(readings: list[int | None], raised_at: int | None) -> None:
    engine = make_engine(rule("t > 30", "for: {count: 3, of: 5}"))
    steps: list[Step] = [(i, {"t": r} if r is not None else {"x": 1}) for i, r in enumerate(readings)]
    happened = drive(engine, steps)
    assert happened == ([] if raised_at is None else [(raised_at, [("raised", "d", raised_at)])])


def test_n_of_m_starts_over_after_a_clear() -> None:
    engine = make_engine(rule("t > 30", "for: {count: 2, of: 3}"))
    steps: list[Step] = [(0, {"t": 31}), (1, {"t": 31}), (2, {"t": 20}), (3, {"t": 31}), (4, {"t": 31})]
    assert drive(engine, steps) == [
        (1, [("raised", "d", 1)]),
        (2, [("cleared", "d", 2)]),
        (4, [("raised", "d", 4)]),
    ]


# -- anti-flap ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(
            [(0, {"t": 35}), (10, {"t": 20}), (29, "tick"), (30, "tick")],
            [(0, [("raised", "d", 0)]), (30, [("cleared", "d", 30)])],
            id="a-clear-waits-for-the-interval",
        ),
        pytest.param(
            [(0, {"t": 35}), (10, {"t": 20}), (20, {"t": 35}), (30, "tick"), (40, "tick")],
            [(0, [("raised", "d", 0)])],
            id="a-contradicting-event-cancels-it",
        ),
        pytest.param(
            [(0, {"t": 35}), (10, {"t": 20}), (20, {"h": 1}), (30, "tick")],
            [(0, [("raised", "d", 0)]), (30, [("cleared", "d", 30)])],
            id="an-unknown-does-not",
        ),
        pytest.param(
            [(0, {"t": 35}), (40, {"t": 20}), (50, {"t": 35}), (70, "tick")],
            [(0, [("raised", "d", 0)]), (40, [("cleared", "d", 40)]), (70, [("raised", "d", 70)])],
            id="raises-are-held-back-too",
        ),
    ],
)
def test_min_interval(steps: list[Step], expected: list[tuple[float, list[tuple[object, ...]]]]) -> None:
    engine = make_engine(rule("t > 30", "clear: t < 25", "min_interval: 30s"))
    assert drive(engine, steps) == expected


def test_command_cooldown_per_device() -> None:
    engine = make_engine(
        rule(
            "t > 30",
            "on_raise: [alert, {command: {name: fan, params: {on: true}, cooldown: 5m}}]",
            "on_clear: []",
        )
    )
    steps: list[Step] = [(0, {"t": 35}), (10, {"t": 20}), (20, {"t": 35}), (30, {"t": 20}), (300, {"t": 35})]
    assert drive(engine, steps) == [
        (0, [("raised", "d", 0), ("command", "fan", {"on": True})]),
        (20, [("raised", "d", 20)]),  # within 5m of the last "on": alert only
        (300, [("raised", "d", 300), ("command", "fan", {"on": True})]),
    ]
    assert engine.suppressed_commands == 1
    # another device has its own cooldown
    actions = engine.process(TelemetryEvent("e", T0 + 30, {"t": 35}), T0 + 30)
    assert summary(actions) == [("raised", "e", 30), ("command", "fan", {"on": True})]


# -- absence ----------------------------------------------------------------------------------------

ABSENT = "  - id: silent\n    devices: ['d', 'n*']\n    absent: 5m\n    severity: critical\n"


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(
            [(0, {"t": 1}), (299, "tick"), (300, "tick"), (400, {"t": 1})],
            [(300, [("raised", "d", 300)]), (400, [("cleared", "d", 400)])],
            id="silence-raises-next-event-clears",
        ),
        pytest.param(
            [(0, {"t": 1}), (200, {"t": 1}), (300, "tick"), (499, "tick"), (500, "tick")],
            [(500, [("raised", "d", 500)])],
            id="each-event-restarts-the-period",
        ),
        pytest.param(
            [(0, {"t": 1}), (300, "tick"), (400, {"t": 1}), (700, "tick")],
            [(300, [("raised", "d", 300)]), (400, [("cleared", "d", 400)]), (700, [("raised", "d", 700)])],
            id="re-armed-after-a-clear",
        ),
        pytest.param(
            [(0, {"t": 1}), (3600, "tick")],
            [(3600, [("raised", "d", 300)])],
            id="stamped-when-due-however-late-the-clock",
        ),
    ],
)
def test_absence(steps: list[Step], expected: list[tuple[float, list[tuple[object, ...]]]]) -> None:
    engine = make_engine(ABSENT)
    assert drive(engine, steps) == expected


def test_never_seen_known_devices_raise_from_engine_start() -> None:
    engine = make_engine(ABSENT, known=["n1", "n2", "other"])  # `other` is not selected by the rule
    assert engine.advance(T0) == []
    assert engine.advance(T0 + 299) == []
    engine.process(TelemetryEvent("n2", T0 + 100, {"t": 1}), T0 + 100)
    assert summary(engine.advance(T0 + 300)) == [("raised", "n1", 300)]
    assert summary(engine.advance(T0 + 400)) == [("raised", "n2", 400)]
    assert [a.device_id for a in engine.active_alarms()] == ["n1", "n2"]


def test_devices_added_later_are_counted_from_then() -> None:
    engine = make_engine(ABSENT)
    engine.advance(T0)
    engine.add_known_devices(["n7"], T0 + 100)
    assert engine.advance(T0 + 399) == []
    assert summary(engine.advance(T0 + 400)) == [("raised", "n7", 400)]


def test_a_late_event_still_counts_as_alive() -> None:
    engine = make_engine(ABSENT)
    engine.process(TelemetryEvent("d", T0 + 100, {"t": 1}), T0 + 100)
    engine.process(TelemetryEvent("d", T0, {"t": 1}), T0 + 250)  # old event time, received at 250
    assert engine.advance(T0 + 549) == []
    assert summary(engine.advance(T0 + 550)) == [("raised", "d", 550)]


# -- processing time --------------------------------------------------------------------------------


def test_processing_time_rules_use_the_receive_time() -> None:
    engine = make_engine(
        rule("t > 30", "time: processing", rule_id="hot")
        + rule("count(t, 1m) >= 2", "time: processing", rule_id="twice")
        + rule("t > 30", rule_id="hot-event")
    )
    engine.process(TelemetryEvent("d", T0 + 100, {"t": 20}), T0 + 100)
    # an old payload ts: late on event time, but on processing time it is simply "now"
    actions = engine.process(TelemetryEvent("d", T0 + 10, {"t": 35}), T0 + 101)
    assert [(a.rule_id, a.ts - T0) for a in actions if isinstance(a, RecordAlert)] == [
        ("hot", 101),
        ("twice", 101),  # both readings fell in the window on the gateway clock
    ]
    assert engine.late_events == 1  # for hot-event, which is on event time


def test_the_file_can_set_processing_time_for_every_rule() -> None:
    text = (
        "time: processing\nrules:\n"
        + rule("t > 30", rule_id="a")
        + rule("t > 30", "time: event", rule_id="b")
    )
    rules_ = build_rule_set({"r.yaml": text}).rules
    assert [(r.id, r.time) for r in rules_] == [("a", "processing"), ("b", "event")]
    engine = RuleEngine(build_rule_set({"r.yaml": text}))
    [alert] = engine.process(TelemetryEvent("d", T0, {"t": 35}), T0 + 5)[:1]
    assert isinstance(alert, RecordAlert) and (alert.rule_id, alert.ts) == ("a", T0 + 5)


def test_a_for_period_on_processing_time_starts_at_the_receive_time() -> None:
    engine = make_engine(rule("t > 30", "for: 1m", "time: processing"))
    engine.process(TelemetryEvent("d", T0 - 500, {"t": 35}), T0)
    assert engine.advance(T0 + 59) == []
    [alert] = engine.advance(T0 + 60)
    assert isinstance(alert, RecordAlert) and alert.ts == T0 + 60


def test_an_unknown_time_mode_is_an_error() -> None:
    with pytest.raises(SourceFileError) as caught:
        build_rule_set({"r.yaml": "time: wall\nrules:\n" + rule("t > 1")})
    [problem] = caught.value.problems
    assert (problem.line, problem.message) == (1, "time: expected `event` or `processing` (got 'wall')")
