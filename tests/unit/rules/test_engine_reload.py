"""Reloading rules: unchanged rules keep their state, changed and removed ones close their alarms.

Every test passes the time in explicitly; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from devices.event import FieldValue, TelemetryEvent
from rules.action import Action, RecordAlert, SendCommand, WriteDerived
from rules.engine import RULE_CHANGED_MESSAGE, RULE_REMOVED_MESSAGE, RuleEngine
from rules.model import RuleSet
from rules.parse import build_rule_set
from rules.selector import KnownDevice

T0 = 1_764_000_000.0

HOT = "  - id: hot\n    when: temperature > 30\n    clear: temperature < 26\n"
HOT_25 = "  - id: hot\n    when: temperature > 25\n    clear: temperature < 20\n"
WET = "  - id: wet\n    when: humidity > 90\n"
WARM_AVG = "  - id: warm\n    when: avg(temperature, 1m) > 20\n    for: 30s\n"


def rules(*texts: str, lateness: str = "30s") -> RuleSet:
    return build_rule_set({"r.yaml": f"lateness: {lateness}\nrules:\n" + "".join(texts)})


def at(engine: RuleEngine, t: float, device: str = "d", **fields: FieldValue) -> list[Action]:
    return engine.process(TelemetryEvent(device, T0 + t, fields), T0 + t)


def alerts(actions: Sequence[Action]) -> list[tuple[str, str, str, float, str]]:
    return [
        (a.rule_id, a.device_id, a.state, a.ts - T0, a.message) for a in actions if isinstance(a, RecordAlert)
    ]


def test_an_unchanged_rule_keeps_its_raised_alarm_and_does_not_raise_again() -> None:
    engine = RuleEngine(rules(HOT))
    assert alerts(at(engine, 0, temperature=31))[0][2] == "raised"
    reload = engine.replace_rules(rules(HOT, WET), T0 + 5)
    assert (reload.unchanged, reload.changed, reload.added, reload.removed) == (("hot",), (), ("wet",), ())
    assert reload.actions == []
    assert reload.summary() == "2 rules (1 unchanged, 0 changed, 1 added, 0 removed)"
    assert at(engine, 10, temperature=32) == []  # still raised: nothing repeats
    assert [(a.rule_id, a.since - T0) for a in engine.active_alarms()] == [("hot", 0)]
    assert alerts(at(engine, 20, temperature=25)) == [("hot", "d", "cleared", 20, "temperature > 30")]


def test_a_changed_rule_clears_its_alarms_with_a_record_and_starts_fresh() -> None:
    engine = RuleEngine(rules(HOT, WET))
    at(engine, 0, "a", temperature=31)
    at(engine, 0, "b", temperature=35, humidity=95)
    reload = engine.replace_rules(rules(HOT_25, WET), T0 + 5)
    assert reload.changed == ("hot",) and reload.unchanged == ("wet",)
    assert alerts(reload.actions) == [
        ("hot", "a", "cleared", 5, RULE_CHANGED_MESSAGE),
        ("hot", "b", "cleared", 5, RULE_CHANGED_MESSAGE),
    ]
    assert all(isinstance(a, RecordAlert) and a.values == {} for a in reload.actions)
    assert [(a.rule_id, a.device_id) for a in engine.active_alarms()] == [("wet", "b")]
    # the new definition applies at once: 27 is above the new threshold
    assert alerts(at(engine, 6, "a", temperature=27)) == [("hot", "a", "raised", 6, "temperature > 25")]


def test_a_removed_rule_clears_its_alarms() -> None:
    engine = RuleEngine(rules(HOT, WET))
    at(engine, 0, temperature=31, humidity=95)
    reload = engine.replace_rules(rules(WET), T0 + 1)
    assert reload.removed == ("hot",)
    assert alerts(reload.actions) == [("hot", "d", "cleared", 1, RULE_REMOVED_MESSAGE)]
    assert at(engine, 2, temperature=40) == []


def test_no_clear_record_when_the_rule_recorded_no_raise() -> None:
    quiet = "  - id: hot\n    when: temperature > 30\n    on_raise: [{command: {name: fan}}]\n"
    engine = RuleEngine(rules(quiet))
    assert [type(a) for a in at(engine, 0, temperature=31)] == [SendCommand]
    reload = engine.replace_rules(build_rule_set({}), T0 + 1)  # every file deleted
    assert reload.actions == [] and reload.removed == ("hot",)


def test_an_unchanged_rule_keeps_its_window_and_its_for_timer() -> None:
    engine = RuleEngine(rules(WARM_AVG))
    at(engine, 0, temperature=25)  # the `for` period starts at 0 and is due at 30
    reload = engine.replace_rules(rules(WARM_AVG, WET), T0 + 10)
    assert reload.unchanged == ("warm",)
    assert engine.advance(T0 + 29) == []
    assert alerts(engine.advance(T0 + 30)) == [("warm", "d", "raised", 30, "avg(temperature, 1m) > 20")]


def test_a_changed_rule_drops_its_window_and_its_pending_timer() -> None:
    engine = RuleEngine(rules(WARM_AVG))
    at(engine, 0, temperature=25)
    changed = WARM_AVG.replace("> 20", "> 21")
    assert engine.replace_rules(rules(changed), T0 + 10).changed == ("warm",)
    assert engine.advance(T0 + 60) == []  # the old period's timer is gone
    # a fresh window: only the new reading counts, and the `for` period starts over
    at(engine, 61, temperature=22)
    assert engine.advance(T0 + 90) == []
    assert alerts(engine.advance(T0 + 91)) == [("warm", "d", "raised", 91, "avg(temperature, 1m) > 21")]


def test_a_change_of_the_inherited_lateness_counts_as_a_change() -> None:
    engine = RuleEngine(rules(HOT))
    assert engine.replace_rules(rules(HOT, lateness="1m"), T0).changed == ("hot",)


@pytest.mark.parametrize(
    ("old", "new", "raised_at"),
    [
        pytest.param("", "", 300, id="unchanged: the timer keeps running from the last event"),
        pytest.param("", "    severity: critical\n", 400, id="changed: silence counts from the reload"),
    ],
)
def test_absence_rules_across_a_reload(old: str, new: str, raised_at: float) -> None:
    silent = "  - id: silent\n    absent: 5m\n"
    engine = RuleEngine(rules(silent + old), known_devices=["k"])
    at(engine, 0, "d", temperature=1)  # `k` counts from 0 too: the engine started then
    engine.replace_rules(rules(silent + new), T0 + 100)
    assert engine.advance(T0 + raised_at - 1) == []
    raised = alerts(engine.advance(T0 + raised_at))
    assert sorted((r[1], r[2], r[3]) for r in raised) == [
        ("d", "raised", raised_at),
        ("k", "raised", raised_at),
    ]


def test_a_new_absence_rule_covers_devices_heard_before_it_existed() -> None:
    engine = RuleEngine(rules(HOT))
    at(engine, 0, "d", temperature=1)
    engine.replace_rules(rules(HOT, "  - id: silent\n    absent: 1m\n"), T0 + 30)
    assert alerts(engine.advance(T0 + 89)) == []
    assert alerts(engine.advance(T0 + 90)) == [("silent", "d", "raised", 90, "no data for 1m")]


def test_a_reload_before_the_engine_started_arms_absence_rules_once() -> None:
    engine = RuleEngine(rules(HOT), known_devices=["k"])
    engine.replace_rules(rules("  - id: silent\n    absent: 1m\n"), T0)
    engine.advance(T0)  # starts the engine: the registry's devices are armed here, once
    assert len(alerts(engine.advance(T0 + 60))) == 1


def test_unchanged_rules_keep_their_command_cooldown() -> None:
    fan = (
        "  - id: hot\n    when: temperature > 30\n"
        "    on_raise: [alert, {command: {name: fan, cooldown: 10m}}]\n"
    )
    engine = RuleEngine(rules(fan))
    at(engine, 0, temperature=31)
    at(engine, 1, temperature=20)
    engine.replace_rules(rules(fan), T0 + 2)
    assert [type(a) for a in at(engine, 3, temperature=31)] == [RecordAlert]
    assert engine.suppressed_commands == 1


GROUP = "  - id: site\n    group_by: site\n    when: avg(temperature, 1m) > 30\n"
SITES = {"a": KnownDevice(None, {"site": "north"}), "b": KnownDevice(None, {"site": "north"})}
PER_MINUTE = "derived:\n  - id: per-minute\n    every: 1m\n    fields: {t: avg(temperature)}\n"


def test_a_group_rule_keeps_its_windows_and_alarm_over_a_reload_and_closes_them_when_changed() -> None:
    engine = RuleEngine(rules(GROUP), known_devices=SITES)
    [raised] = at(engine, 0, "a", temperature=40)
    assert isinstance(raised, RecordAlert) and raised.group == ("site", "north")
    assert engine.replace_rules(rules(GROUP, WET), T0 + 1).actions == []
    assert at(engine, 2, "b", temperature=30) == []  # still raised; the window held 40 from before
    assert engine.window_values("site", "site=north") == {"avg(temperature, 1m)": 35.0}
    reload = engine.replace_rules(rules(GROUP.replace("> 30", "> 50")), T0 + 3)
    [closed] = reload.actions
    assert isinstance(closed, RecordAlert)
    assert (closed.device_id, closed.group, closed.message) == (
        "site=north",
        ("site", "north"),
        RULE_CHANGED_MESSAGE,
    )
    assert engine.window_values("site", "site=north") == {}  # started fresh


def test_an_unchanged_derived_metric_keeps_its_unfinished_interval() -> None:
    with_metric = build_rule_set({"r.yaml": f"rules:\n{HOT}{PER_MINUTE}"})
    engine = RuleEngine(with_metric)
    at(engine, 0, temperature=20)
    reload = engine.replace_rules(build_rule_set({"r.yaml": f"rules:\n{HOT}{WET}{PER_MINUTE}"}), T0 + 1)
    assert reload.unchanged == ("hot", "per-minute") and reload.actions == []
    at(engine, 30, temperature=30)
    [point] = [a for a in engine.advance(T0 + 120) if isinstance(a, WriteDerived)]
    assert point.fields == {"t": 25.0}
