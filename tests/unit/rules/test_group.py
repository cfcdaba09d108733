"""Group rules: windows over every device of a group (by a registry tag), one alarm per group."""

from __future__ import annotations

from textwrap import dedent

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.errors import SourceFileError
from devices.event import TelemetryEvent
from rules.action import Action, FailedAction, RecordAlert, SendCommand
from rules.engine import AlarmStatus, RuleEngine
from rules.parse import build_rule_set
from rules.selector import KnownDevice
from tests.unit.rules.test_window import close, in_time_window, reference

T0 = 1_764_000_000.0
DEVICES = {
    "gh-1": KnownDevice("greenhouse", {"site": "north"}),
    "gh-2": KnownDevice("greenhouse", {"site": "north"}),
    "gh-3": KnownDevice("greenhouse", {"site": "south"}),
    "gh-4": KnownDevice("greenhouse", {}),  # no site: in no group
    "fz-1": KnownDevice("freezer", {"site": "north"}),  # not selected
}
SITE_WARM = dedent(
    """\
    rules:
      - id: site-warm
        devices: {type: greenhouse}
        group_by: site
        when: avg(temperature, 5m) > 28
        clear: avg(temperature, 5m) < 26
        severity: critical
        on_raise:
          - alert
          - command: {name: vent, params: {open: true}, device: "{group}-controller"}
    """
)


def make_engine(text: str = SITE_WARM) -> RuleEngine:
    return RuleEngine(build_rule_set({"r.yaml": text}), known_devices=DEVICES)


def send(engine: RuleEngine, device: str, t: float, **fields: float) -> list[Action]:
    return engine.process(TelemetryEvent(device, T0 + t, fields), T0 + t)


def test_devices_of_a_group_share_windows_and_one_alarm() -> None:
    engine = make_engine()
    assert send(engine, "gh-1", 0, temperature=27) == []
    # gh-2 alone would be warm; with gh-1 the north average is 28: not above
    assert send(engine, "gh-2", 1, temperature=29) == []
    assert send(engine, "gh-3", 2, temperature=35) != []  # the south group on its own
    actions = send(engine, "gh-2", 3, temperature=31)  # north: (27 + 29 + 31) / 3 = 29
    assert actions == [
        RecordAlert(
            "site-warm",
            "site=north",
            "raised",
            "critical",
            T0 + 3,
            "avg(temperature, 5m) > 28",
            {"avg(temperature, 5m)": 29.0},  # the group's values, not one device's fields
            ("site", "north"),
        ),
        SendCommand("north-controller", "vent", {"open": True}, "site-warm"),
    ]
    assert send(engine, "gh-1", 4, temperature=40) == []  # raised once per group
    assert [(a.device_id, a.group) for a in engine.active_alarms()] == [
        ("site=north", ("site", "north")),
        ("site=south", ("site", "south")),
    ]
    assert engine.window_values("site-warm", "site=north") == {"avg(temperature, 5m)": 31.75}


def test_devices_outside_every_group_are_left_out() -> None:
    engine = make_engine()
    assert send(engine, "gh-4", 0, temperature=90) == []  # no site tag
    assert send(engine, "fz-1", 0, temperature=90) == []  # not a greenhouse
    assert send(engine, "stray", 0, temperature=90) == []  # not in the registry: no tags
    assert engine.active_alarms() == []
    assert engine.window_values("site-warm", "site=north") == {}


def test_hysteresis_and_for_work_per_group() -> None:
    text = SITE_WARM.replace("severity: critical", "severity: critical\n    for: 1m")
    engine = make_engine(text)
    send(engine, "gh-1", 0, temperature=30)
    assert engine.advance(T0 + 59) == []
    send(engine, "gh-2", 30, temperature=30)
    [raised, command] = engine.advance(T0 + 60)
    assert isinstance(raised, RecordAlert) and (raised.device_id, raised.ts) == ("site=north", T0 + 60)
    assert isinstance(command, SendCommand) and command.device_id == "north-controller"
    # between the thresholds: stays raised; below 26 on average: cleared
    assert send(engine, "gh-1", 70, temperature=20) == []  # (30 + 30 + 20) / 3 = 26.7
    [cleared] = send(engine, "gh-2", 80, temperature=10)  # 22.5
    assert (
        isinstance(cleared, RecordAlert) and cleared.state == "cleared" and cleared.group == ("site", "north")
    )


def test_a_group_value_that_cannot_name_a_device_fails_the_command() -> None:
    devices = {"gh-1": KnownDevice("greenhouse", {"site": "north side"})}
    engine = RuleEngine(build_rule_set({"r.yaml": SITE_WARM}), known_devices=devices)
    actions = send(engine, "gh-1", 0, temperature=30)
    assert [type(a) for a in actions] == [RecordAlert, FailedAction]
    failed = actions[1]
    assert isinstance(failed, FailedAction)
    assert (failed.rule_id, failed.device_id, failed.step) == ("site-warm", "site=north side", "on_raise[1]")
    assert "'north side-controller', which is not a valid device id" in failed.reason


def test_active_alarm_status_names_the_group() -> None:
    engine = make_engine()
    send(engine, "gh-3", 0, temperature=40)
    assert engine.active_alarms() == [
        AlarmStatus(
            "site-warm", "site=south", "critical", T0, {"avg(temperature, 5m)": 40.0}, ("site", "south")
        )
    ]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "group_by: site\n    when: temperature > 30",
            "when: a group rule reads fields only inside windowed functions over the group, like "
            "avg(temperature, 5m); `temperature` is read on its own",
        ),
        (
            "group_by: site\n    when: avg(t, 5m) > 1\n    clear: t < 3",
            "clear: a group rule reads fields only inside windowed functions",
        ),
        (
            "group_by: site\n    when: avg(t, 5m) > 1\n    on_raise: [{command: {name: x}}]",
            "on_raise[0]: a group rule's command needs `device:`",
        ),
        (
            "group_by: site\n    when: avg(t, 5m) > 1\n    on_raise: [{command: {name: x, device: '{device_id}-x'}}]",
            "on_raise[0]: {device_id} is not known in a group rule",
        ),
        (
            "group_by: site\n    when: avg(t, 5m) > 1\n    on_clear: [{republish: {topic: 'a/{tags.zone}'}}]",
            "on_clear[0]: {tags.zone} is not known in a group rule; expected {rule}, {group}, {state}, "
            "{severity} or {tags.site}",
        ),
        ("group_by: site\n    absent: 5m", "`group_by` does not apply to an absent rule"),
        ("group_by: 'site name'\n    when: avg(t, 5m) > 1", "expected a tag name"),
    ],
)
def test_group_rule_errors(rule: str, message: str) -> None:
    with pytest.raises(SourceFileError) as caught:
        build_rule_set({"a.yaml": f"rules:\n  - id: g\n    {rule}\n"})
    [problem] = caught.value.problems
    assert message in problem.message and problem.message.startswith("rule 'g': ")


# -- group windows against a naive reference ---------------------------------------------------------

WATCH = dedent(
    """\
    lateness: 20s
    rules:
      - id: watch
        devices: {tags: {site: [north, south]}}
        group_by: site
        when: avg(x, 1m) > 1e9 or min(x, 1m) > 1e9 or max(x, 1m) > 1e9 or sum(x, 1m) > 1e12 or count(x, 1m) > 1e9
    """
)
FUNCTIONS = ("avg", "min", "max", "sum", "count")
MEMBERS = {
    "a": KnownDevice(None, {"site": "north"}),
    "b": KnownDevice(None, {"site": "north"}),
    "c": KnownDevice(None, {"site": "south"}),
    "d": KnownDevice(None, {}),
}
events = st.lists(
    st.tuples(
        st.sampled_from(sorted(MEMBERS)),
        st.one_of(st.floats(min_value=0, max_value=10), st.floats(min_value=-40, max_value=0)),
        st.floats(min_value=-1e4, max_value=1e4, allow_nan=False).map(lambda v: round(v, 3)),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=100, deadline=None)
@given(events=events)
def test_group_windows_match_a_reference(events: list[tuple[str, float, float]]) -> None:
    engine = RuleEngine(build_rule_set({"r.yaml": WATCH}), known_devices=MEMBERS)
    clock = T0
    newest: dict[str, float] = {}
    streams: dict[str, list[tuple[float, float | None]]] = {"site=north": [], "site=south": []}
    for device, step, value in events:
        clock += max(step, 0.0)
        ts = clock + min(step, 0.0)  # a negative step: the reading is that much behind the clock
        engine.process(TelemetryEvent(device, ts, {"x": value}), clock)
        lag = newest.get(device, ts) - ts
        newest[device] = max(newest.get(device, ts), ts)
        site = MEMBERS[device].tags.get("site")
        if site is None or lag > 20:  # in no group, or late for the rule: not added
            continue
        subject = f"site={site}"
        streams[subject].append((ts, value))
        held = in_time_window(streams[subject], 60.0)
        got = engine.window_values("watch", subject)
        for function in FUNCTIONS:
            expected = reference(held, function)
            assert close(got[f"{function}(x, 1m)"], expected, 1e4 * max(len(held), 1)), (function, held)
