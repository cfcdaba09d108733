"""Actions on raise and clear: commands to templated devices, republish, webhooks, cooldowns, failures."""

from __future__ import annotations

from textwrap import dedent

import pytest

from devices.errors import SourceFileError
from devices.event import TelemetryEvent
from rules.action import Action, FailedAction, RecordAlert, Republish, SendCommand, Webhook, alert_payload
from rules.engine import RuleEngine
from rules.parse import build_rule_set
from rules.selector import KnownDevice

T0 = 1_764_000_000.0
KNOWN = {
    "gh-1": KnownDevice("greenhouse", {"site": "north", "zone": "z7"}),
    "gh-2": KnownDevice("greenhouse", {"site": "south/annex"}),
}
RULES = dedent(
    """\
    rules:
      - id: dry
        when: moisture < 20
        clear: moisture > 30
        severity: warning
        message: "moisture {moisture}"
        on_raise:
          - alert
          - command: {name: open, params: {minutes: 5}, device: "{device_id}-valve", cooldown: 10m}
          - command: {name: pump, device: "{tags.zone}-pump"}
          - republish: {topic: "alerts/{tags.site}/{rule}/{state}", retain: true, cooldown: 10m}
          - webhook: {url: "https://hooks.example/alarm?token=s3cret", cooldown: 10m}
        on_clear:
          - alert
          - republish: {topic: "alerts/{device_id}/{type}", qos: 0}
          - command: {name: close, device: "{device_id}-valve"}
    """
)


def make_engine() -> RuleEngine:
    return RuleEngine(build_rule_set({"r.yaml": RULES}), known_devices=KNOWN)


def send(engine: RuleEngine, device: str, t: float, moisture: float) -> list[Action]:
    return engine.process(TelemetryEvent(device, T0 + t, {"moisture": moisture}), T0 + t)


def test_every_kind_of_action_on_raise_and_clear() -> None:
    engine = make_engine()
    actions = send(engine, "gh-1", 0, 10)
    alert = RecordAlert("dry", "gh-1", "raised", "warning", T0, "moisture 10", {"moisture": 10})
    payload = {
        "rule": "dry",
        "device": "gh-1",
        "state": "raised",
        "severity": "warning",
        "ts": T0,
        "message": "moisture 10",
        "values": {"moisture": 10},
    }
    assert alert_payload(alert) == payload
    assert actions == [
        alert,
        SendCommand("gh-1-valve", "open", {"minutes": 5}, "dry"),
        SendCommand("z7-pump", "pump", {}, "dry"),
        Republish("alerts/north/dry/raised", payload, 1, True, "dry"),
        Webhook("https://hooks.example/alarm?token=s3cret", payload, "dry"),
    ]
    cleared = send(engine, "gh-1", 60, 35)
    assert [type(a) for a in cleared] == [RecordAlert, Republish, SendCommand]
    republish = cleared[1]
    assert isinstance(republish, Republish)
    assert (republish.topic, republish.qos, republish.retain) == ("alerts/gh-1/greenhouse", 0, False)
    assert republish.payload["state"] == "cleared" and republish.payload["values"] == {"moisture": 35}
    assert cleared[2] == SendCommand("gh-1-valve", "close", {}, "dry")


def test_cooldowns_apply_to_every_kind_per_rule_and_device() -> None:
    engine = make_engine()
    send(engine, "gh-1", 0, 10)
    send(engine, "gh-1", 60, 35)
    again = send(engine, "gh-1", 120, 10)  # within 10m: only the step without a cooldown runs
    assert [type(a) for a in again] == [RecordAlert, SendCommand]
    assert isinstance(again[1], SendCommand) and again[1].device_id == "z7-pump"
    assert engine.suppressed_commands == 3
    send(engine, "gh-1", 180, 35)
    later = send(engine, "gh-1", 660, 10)  # 11 minutes after the first raise
    assert [type(a) for a in later] == [RecordAlert, SendCommand, SendCommand, Republish, Webhook]


def test_actions_that_cannot_be_built_are_reported_not_dropped() -> None:
    engine = make_engine()
    actions = send(engine, "gh-2", 0, 10)  # no zone tag; a site with a slash cannot go in a topic
    failed = [a for a in actions if isinstance(a, FailedAction)]
    assert [(f.rule_id, f.device_id, f.step) for f in failed] == [
        ("dry", "gh-2", "on_raise[2]"),
        ("dry", "gh-2", "on_raise[3]"),
    ]
    assert "{tags.zone} is not known here" in failed[0].reason
    assert "{tags.site} is 'south/annex', which cannot go into a topic" in failed[1].reason
    assert [type(a) for a in actions if not isinstance(a, FailedAction)] == [
        RecordAlert,
        SendCommand,
        Webhook,
    ]
    # a device outside the registry has no type or tags
    unknown = send(engine, "gh-9", 0, 10)
    assert sum(isinstance(a, FailedAction) for a in unknown) == 2


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("{webhook: {url: 'ftp://x/y'}}", "expected an http:// or https:// URL with a host"),
        ("{webhook: {url: 'http://'}}", "expected an http:// or https:// URL with a host"),
        ("{webhook: {url: 'http://a b/'}}", "must not contain spaces or control characters"),
        ("{republish: {topic: 'a/+/b'}}", "must not contain the MQTT wildcards"),
        ("{republish: {topic: 'a/{nope}'}}", "{nope} is not a template name"),
        ("{republish: {topic: 'a/{group}'}}", "{group} is only known in a group rule"),
        ("{republish: {topic: 'a', qos: 2}}", "Input should be 0 or 1"),
        ("{command: {name: x, device: '{device_id:>9}'}}", "takes no conversion or format spec"),
        (
            "{webhook: {url: 'http://a/', method: PUT}}",
            "unknown key 'method'; expected one of: url, cooldown",
        ),
        ("{mail: {to: ops}}", "expected `alert`, `command: {name: <command>"),
    ],
)
def test_action_errors_are_located(step: str, message: str) -> None:
    text = f"rules:\n  - id: r\n    when: t > 1\n    on_raise:\n      - {step}\n"
    with pytest.raises(SourceFileError) as caught:
        build_rule_set({"a.yaml": text})
    problems = caught.value.problems
    assert any(message in p.message for p in problems), [p.message for p in problems]
    assert all(p.file == "a.yaml" and p.line == 5 for p in problems), problems
