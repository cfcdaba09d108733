"""The rule engine: alarm transitions per (rule, device), selectors, actions, counters."""

from __future__ import annotations

from textwrap import dedent

import pytest

from devices.event import FieldValue, TelemetryEvent
from rules import engine as engine_module
from rules.action import Action, RecordAlert, SendCommand
from rules.engine import AlarmStatus, RuleEngine
from rules.parse import build_rule_set

T0 = 1_764_000_000.0

OVERHEAT = dedent(
    """\
    rules:
      - id: overheat
        devices: ["greenhouse-*", "sim-?", "pump-7"]
        when: temperature > 30
        clear: temperature < 26
        severity: critical
        message: "temperature {temperature:.1f} above 30"
        on_raise:
          - alert
          - command: {name: fan, params: {on: true}}
        on_clear:
          - command: {name: fan, params: {on: false}}
          - alert
    """
)


def make_engine(text: str) -> RuleEngine:
    return RuleEngine(build_rule_set({"rules.yaml": text}))


def event(device: str, ts: float, **fields: FieldValue) -> TelemetryEvent:
    return TelemetryEvent(device, ts, fields)


def run(engine: RuleEngine, *events: TelemetryEvent) -> list[list[Action]]:
    return [engine.process(e, e.ts) for e in events]


def test_raise_once_then_clear_with_hysteresis() -> None:
    engine = make_engine(OVERHEAT)
    results = run(
        engine,
        event("greenhouse-1", T0, temperature=31.0, humidity=50),
        event("greenhouse-1", T0 + 1, temperature=35.0),  # still raised: no repeat
        event("greenhouse-1", T0 + 2, temperature=28.0),  # below `when`, above `clear`: stays raised
        event("greenhouse-1", T0 + 3, temperature=25.5),
        event("greenhouse-1", T0 + 4, temperature=25.0),  # already clear: nothing
        event("greenhouse-1", T0 + 5, temperature=30.5),  # raises again
    )
    assert results[0] == [
        RecordAlert(
            "overheat",
            "greenhouse-1",
            "raised",
            "critical",
            T0,
            "temperature 31.0 above 30",
            {"temperature": 31.0},
        ),
        SendCommand("greenhouse-1", "fan", {"on": True}, "overheat"),
    ]
    assert results[1:3] == [[], []]
    assert results[3] == [
        SendCommand("greenhouse-1", "fan", {"on": False}, "overheat"),
        RecordAlert(
            "overheat",
            "greenhouse-1",
            "cleared",
            "critical",
            T0 + 3,
            "temperature 25.5 above 30",
            {"temperature": 25.5},
        ),
    ]
    assert results[4] == []
    assert [type(a).__name__ for a in results[5]] == ["RecordAlert", "SendCommand"]
    assert engine.events == 6 and engine.evaluation_errors == 0


def test_default_clear_is_not_when() -> None:
    engine = make_engine("rules:\n  - id: dry\n    when: humidity < 35\n    severity: info\n")
    results = run(
        engine,
        event("d1", T0, humidity=30),
        event("d1", T0 + 1, humidity=34.9),
        event("d1", T0 + 2, temperature=20),  # no humidity: neither true nor false, so no clear
        event("d1", T0 + 3, humidity=35),
    )
    assert [[(a.state, a.ts) for a in r if isinstance(a, RecordAlert)] for r in results] == [
        [("raised", T0)],
        [],
        [],
        [("cleared", T0 + 3)],
    ]
    raised = results[0][0]
    assert isinstance(raised, RecordAlert)
    assert raised.message == "humidity < 35"  # no message and no description: the condition


@pytest.mark.parametrize(
    ("device", "matches"),
    [
        ("greenhouse-1", True),
        ("greenhouse-north-12", True),
        ("greenhouse", False),
        ("Greenhouse-1", False),  # ids are case-sensitive
        ("sim-3", True),
        ("sim-33", False),
        ("pump-7", True),
        ("pump-77", False),
        ("xgreenhouse-1", False),
    ],
)
def test_device_selector(device: str, matches: bool) -> None:
    engine = make_engine(OVERHEAT)
    # Twice: the second lookup comes from the per-device cache.
    results = run(engine, event(device, T0, temperature=40), event(device, T0 + 1, temperature=20))
    assert [bool(r) for r in results] == [matches, matches]


def test_no_device_selector_means_every_device() -> None:
    engine = make_engine("rules:\n  - id: hot\n    when: t > 1\n")
    assert all(run(engine, event("a", T0, t=2), event("zz-9", T0, t=2)))


def test_alarms_are_per_device_and_per_rule() -> None:
    engine = make_engine(OVERHEAT + "  - id: warm\n    when: temperature > 20\n    on_clear: []\n")
    run(
        engine,
        event("greenhouse-1", T0, temperature=31),
        event("greenhouse-2", T0 + 1, temperature=22),
        event("other", T0 + 2, temperature=40),
    )
    assert engine.active_alarms() == [
        AlarmStatus("overheat", "greenhouse-1", "critical", T0, {"temperature": 31}),
        AlarmStatus("warm", "greenhouse-1", "warning", T0, {"temperature": 31}),
        AlarmStatus("warm", "greenhouse-2", "warning", T0 + 1, {"temperature": 22}),
        AlarmStatus("warm", "other", "warning", T0 + 2, {"temperature": 40}),
    ]
    assert run(engine, event("greenhouse-2", T0 + 3, temperature=10)) == [[]]  # on_clear: [] runs nothing
    assert [(a.rule_id, a.device_id) for a in engine.active_alarms()] == [
        ("overheat", "greenhouse-1"),
        ("warm", "greenhouse-1"),
        ("warm", "other"),
    ]


@pytest.mark.parametrize(
    ("rule", "fields", "message", "values"),
    [
        ("when: t > 1", {"t": 2}, "t > 1", {"t": 2}),
        ("when: t > 1\n    description: Hot", {"t": 2}, "Hot", {"t": 2}),
        ("when: t > 1\n    message: 't={t:.2f} h={h}'", {"t": 2, "x": 1}, "t=2.00 h=?", {"t": 2}),
        ("when: t > 1 or h > 90\n    message: '{h}'", {"t": 2, "x": 1}, "?", {"t": 2}),
        ("when: t > 1 and has(h)\n    message: '{h!r}'", {"t": 2, "h": "x"}, "'x'", {"t": 2, "h": "x"}),
    ],
)
def test_message_and_values(
    rule: str, fields: dict[str, FieldValue], message: str, values: dict[str, FieldValue]
) -> None:
    engine = make_engine(f"rules:\n  - id: r\n    {rule}\n")
    [alert] = engine.process(TelemetryEvent("d", T0, fields), T0)
    assert isinstance(alert, RecordAlert)
    assert (alert.message, alert.values) == (message, values)


def test_missing_fields_are_unknown_not_false() -> None:
    engine = make_engine(
        "rules:\n  - id: both\n    when: t > 30 and h > 80\n  - id: either\n    when: t > 30 or h > 80\n"
    )

    def transitions(**fields: FieldValue) -> list[tuple[str, str, str]]:
        actions = engine.process(TelemetryEvent(str(fields.pop("device", "d")), T0, fields), T0)
        return [(a.rule_id, a.device_id, a.state) for a in actions if isinstance(a, RecordAlert)]

    assert transitions(t=35, h=90) == [("both", "d", "raised"), ("either", "d", "raised")]
    assert transitions(x=1) == []  # neither field: nothing is decided
    assert transitions(t=20) == [
        ("both", "d", "cleared")
    ]  # false and unknown is false; false or unknown is not
    assert transitions(t=20, h=50) == [("either", "d", "cleared")]
    assert transitions(device="e", t=35) == [("either", "e", "raised")]  # true or unknown is true


def test_absence_rules_are_not_skipped_for_lacking_their_field() -> None:
    engine = make_engine("rules:\n  - id: no-gps\n    when: not has(gps)\n")
    [alert] = engine.process(event("d", T0, t=1), T0)
    assert isinstance(alert, RecordAlert) and alert.values == {}
    [cleared] = engine.process(event("d", T0 + 1, gps="x"), T0 + 1)
    assert isinstance(cleared, RecordAlert) and cleared.state == "cleared" and cleared.values == {"gps": "x"}


def test_evaluation_errors_are_counted_and_do_not_fire() -> None:
    engine = make_engine("rules:\n  - id: hot\n    when: t > 30\n  - id: ratio\n    when: a / b > 2\n")
    results = run(engine, event("d", T0, t="warm", a=1, b=0), event("d", T0 + 1, t=31, a=5, b=1))
    assert results[0] == []
    assert [a.rule_id for a in results[1] if isinstance(a, RecordAlert)] == ["hot", "ratio"]
    assert (engine.events, engine.evaluation_errors) == (2, 2)


def test_commands_get_their_own_params() -> None:
    engine = make_engine(OVERHEAT)
    command = engine.process(event("greenhouse-1", T0, temperature=40), T0)[1]
    assert isinstance(command, SendCommand)
    command.params["extra"] = 1  # type: ignore[index]  # a careless consumer
    engine.process(event("greenhouse-1", T0 + 1, temperature=20), T0 + 1)
    again = engine.process(event("greenhouse-1", T0 + 2, temperature=40), T0 + 2)[1]
    assert isinstance(again, SendCommand) and again.params == {"on": True}


def test_advance_has_nothing_to_do_yet() -> None:
    engine = make_engine(OVERHEAT)
    engine.process(event("greenhouse-1", T0, temperature=40), T0)
    assert engine.advance(T0 + 3600) == []
    assert len(engine.active_alarms()) == 1


def test_device_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "PLAN_CACHE_LIMIT", 3)
    engine = make_engine(OVERHEAT)
    devices = [f"greenhouse-{i}" for i in range(10)] + ["other"]
    for i, device in enumerate(devices):
        engine.process(event(device, T0 + i, temperature=40), T0 + i)
        assert len(engine._plans) <= 3
    assert [a.device_id for a in engine.active_alarms()] == sorted(devices[:-1])
