"""Command dispatch with an in-memory channel and a fake clock: allow-list, audit, MQTT 5, waiting."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from devices.command import Command, CommandAck
from devices.delivery import DeliveryPolicy
from devices.registry import parse_registry
from devices.topic import TopicScheme
from gateway.commands import CommandDispatcher, check_rule_commands
from gateway.mqttcodec import Properties
from gateway.store.base import Point
from rules import build_rule_set

REGISTRY = """\
types:
  greenhouse:
    fields: {temperature: {type: number}}
    commands:
      fan: {params: {on: {type: bool}}}
  meter:
    fields: {kwh: {type: number}}
devices:
  - {id: gh-1, type: greenhouse}
  - {id: gh-2, type: greenhouse}
  - {id: m-1, type: meter}
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListChannel:
    """Collects publishes; can refuse them, and stand for a connection that is up or down."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes, Properties | None]] = []
        self.fail = fail
        self.connected = True

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        if self.fail:
            raise RuntimeError("outgoing queue full")
        self.sent.append((topic, payload, properties))

    def commands(self) -> list[Command]:
        return [Command.decode(topic.split("/")[1], payload) for topic, payload, _ in self.sent]


def make(
    channel: ListChannel,
    clock: FakeClock,
    *,
    policy: DeliveryPolicy | None = None,
    registry: str | None = None,
    offline: set[str] | None = None,
    mqtt5: bool = False,
) -> tuple[CommandDispatcher, list[Point]]:
    records: list[Point] = []
    down = offline if offline is not None else set()
    dispatcher = CommandDispatcher(
        channel=channel,
        topics=TopicScheme("devices/{device_id}/commands"),
        record=records.append,
        clock=clock,
        policy=policy if policy is not None else DeliveryPolicy(ack_timeout=5, retry_interval=2),
        ttl=60,
        allow_list=parse_registry(registry, "devices.yaml").allow_list() if registry is not None else None,
        is_connected=lambda: channel.connected,
        is_offline=down.__contains__,
        mqtt5=mqtt5,
    )
    return dispatcher, records


def state(dispatcher: CommandDispatcher, command_id: str) -> str:
    tracked = dispatcher.get(command_id)
    assert tracked is not None
    return tracked.state


def statuses(records: list[Point]) -> list[str]:
    return [dict(p.tags)["status"] for p in records]


def test_send_then_ack_ok() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, records = make(channel, clock)
    tracked = dispatcher.send("gh-1", "fan", {"on": True}, rule_id="hot")
    assert tracked.state == "sent"
    [command] = channel.commands()
    assert command == tracked.command and command.expires == clock.now + 60
    assert channel.sent[0][0] == "devices/gh-1/commands" and channel.sent[0][2] is None  # MQTT 3.1.1
    clock.now += 0.25
    dispatcher.handle_ack("gh-1", CommandAck(command.id, "gh-1", "ok").encode())
    assert statuses(records) == ["sent", "ok"]
    sent, ok = records
    assert sent.fields["attempt"] == 1 and json.loads(str(sent.fields["params"])) == {"on": True}
    assert ok.fields["latency_ms"] == pytest.approx(250.0)
    assert dict(ok.tags)["rule"] == "hot" and ok.fields["id"] == command.id
    assert dispatcher.stats.acked_ok == 1 and dispatcher.pending == 0


def test_error_ack_keeps_the_detail() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, records = make(channel, clock)
    tracked = dispatcher.send("gh-1", "reboot", {})
    dispatcher.handle_ack("gh-1", CommandAck(tracked.command.id, "gh-1", "error", "unknown command").encode())
    assert statuses(records) == ["sent", "error"]
    assert records[1].fields["detail"] == "unknown command"


def test_retries_reuse_the_id_and_every_attempt_is_audited_until_the_timeout() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, records = make(channel, clock, policy=DeliveryPolicy(ack_timeout=5, retry_interval=2))
    dispatcher.send("gh-1", "fan", {"on": True})
    for _ in range(10):
        clock.now += 0.5
        dispatcher.advance()
    assert len({c.id for c in channel.commands()}) == 1 and len(channel.sent) == 3  # max_attempts 3
    assert statuses(records) == ["sent", "sent", "sent", "timed_out"]
    assert [p.fields.get("attempt") for p in records[:3]] == [1, 2, 3]
    assert dispatcher.stats.retries == 2 and dispatcher.stats.timed_out == 1
    # a late ack is counted, not recorded
    dispatcher.handle_ack("gh-1", CommandAck(channel.commands()[0].id, "gh-1", "ok").encode())
    assert dispatcher.stats.late_acks == 1 and len(records) == 4


def test_commands_off_the_allow_list_are_rejected_before_sending_and_audited() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, records = make(channel, clock, registry=REGISTRY)
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("gh-1", "self_destruct", {}, "not on the allow-list of type 'greenhouse'"),
        ("gh-1", "fan", {"on": "yes"}, "param 'on': expected a bool"),
        ("gh-1", "fan", {}, "param 'on' is missing"),
        ("gh-1", "fan", {"on": True, "x": 1}, "param 'x' is not a parameter"),
        ("m-1", "fan", {"on": True}, "accepts no commands"),
        ("stranger", "fan", {"on": True}, "device 'stranger' is not in the registry"),
    ]
    for device, name, params, reason in cases:
        tracked = dispatcher.send(device, name, params, rule_id="hot")
        assert tracked.state == "rejected" and reason in tracked.detail
    assert channel.sent == []
    assert statuses(records) == ["rejected"] * len(cases)
    assert all(reason in str(p.fields["detail"]) for p, (*_, reason) in zip(records, cases, strict=True))
    assert json.loads(str(records[1].fields["params"])) == {"on": "yes"}  # what was asked for is kept
    assert dispatcher.stats.rejected == len(cases)
    assert dispatcher.send("gh-1", "fan", {"on": True}).state == "sent"


def test_publish_failure_and_full_pending_are_rejected_not_lost() -> None:
    clock = FakeClock()
    dispatcher, records = make(ListChannel(fail=True), clock)
    assert dispatcher.send("gh-1", "fan", {}).state == "rejected"
    assert statuses(records) == ["rejected"] and "queue full" in str(records[0].fields["detail"])
    dispatcher, records = make(ListChannel(), clock, policy=DeliveryPolicy(max_pending=1))
    assert dispatcher.send("gh-1", "fan", {}).state == "sent"
    assert dispatcher.send("gh-2", "fan", {}).state == "rejected"
    assert statuses(records) == ["sent", "rejected"]


def test_a_held_command_is_sent_once_when_the_device_is_back_or_expires() -> None:
    clock, channel = FakeClock(), ListChannel()
    offline = {"gh-1"}
    dispatcher, records = make(channel, clock, offline=offline)
    held = dispatcher.send("gh-1", "fan", {"on": True})
    doomed = dispatcher.send("gh-1", "fan", {"on": False}, ttl=3)
    assert held.state == doomed.state == "queued" and channel.sent == []
    clock.now += 3
    dispatcher.advance()
    assert state(dispatcher, doomed.command.id) == "expired" and channel.sent == []
    offline.clear()  # its birth message arrived
    clock.now += 1
    dispatcher.advance()
    dispatcher.advance()
    assert [c.id for c in channel.commands()] == [held.command.id]
    assert statuses(records) == ["queued", "queued", "expired", "sent"]
    assert dispatcher.stats.expired == 1


def test_while_disconnected_commands_wait_and_then_go_out() -> None:
    clock, channel = FakeClock(), ListChannel()
    channel.connected = False
    dispatcher, records = make(channel, clock)
    tracked = dispatcher.send("gh-1", "fan", {"on": True})
    assert tracked.state == "queued" and tracked.detail == "not connected to the broker"
    dispatcher.advance()
    assert channel.sent == []
    channel.connected = True
    dispatcher.advance()
    assert [c.id for c in channel.commands()] == [tracked.command.id]
    assert statuses(records) == ["queued", "sent"]


def test_mqtt5_publishes_carry_expiry_correlation_data_and_response_topic() -> None:
    clock, channel = FakeClock(), ListChannel()
    policy = DeliveryPolicy(ack_timeout=60, retry_interval=30)
    dispatcher, _ = make(channel, clock, mqtt5=True, policy=policy)
    tracked = dispatcher.send("gh-1", "fan", {"on": True}, ttl=90)
    clock.now += 30.5
    dispatcher.advance()  # a retry: the expiry left shrinks
    first, retry = (properties for _, _, properties in channel.sent)
    assert first is not None and retry is not None
    assert first == Properties(
        message_expiry_interval=90,
        correlation_data=tracked.command.id.encode(),
        response_topic="devices/gh-1/commands/ack",
    )
    assert retry.message_expiry_interval == 60
    # an MQTT 5 device may answer with the correlation data in place of an id
    dispatcher.handle_ack("gh-1", b'{"status": "ok"}', correlation_data=tracked.command.id.encode())
    assert tracked.state == "ok"


@pytest.mark.parametrize(
    ("payload", "counter"),
    [(b"not json", "bad_acks"), (b'{"id": "nope", "status": "ok"}', "unknown_acks")],
)
def test_bad_and_unknown_acks_are_counted(payload: bytes, counter: str) -> None:
    dispatcher, records = make(ListChannel(), FakeClock())
    dispatcher.handle_ack("gh-1", payload)
    assert getattr(dispatcher.stats, counter) == 1 and records == []


def test_submit_waits_for_the_outcome() -> None:
    async def scenario() -> tuple[dict[str, object], dict[str, object]]:
        clock, channel = FakeClock(), ListChannel()
        dispatcher, _ = make(channel, clock)

        async def device() -> None:
            while not channel.sent:  # noqa: ASYNC110 - the fake channel has no event
                await asyncio.sleep(0.001)
            dispatcher.handle_ack("gh-1", CommandAck(channel.commands()[0].id, "gh-1", "ok").encode())

        answering = asyncio.create_task(device())
        acked = await dispatcher.submit("gh-1", "fan", {"on": True}, wait=5)
        await answering
        unanswered = await dispatcher.submit("gh-2", "fan", {"on": True}, wait=0.05)
        return acked, unanswered

    acked, unanswered = asyncio.run(scenario())
    assert acked["status"] == "ok"
    assert unanswered["status"] == "sent"  # no outcome within the wait: still pending


def test_listing_shows_pending_and_finished_commands() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, _ = make(channel, clock, registry=REGISTRY)
    dispatcher.send("gh-1", "fan", {"on": True})
    clock.now += 1
    dispatcher.send("gh-1", "open_roof", {})
    listed = dispatcher.list_commands()
    assert [(c["device"], c["name"], c["status"]) for c in listed] == [
        ("gh-1", "fan", "sent"),
        ("gh-1", "open_roof", "rejected"),
    ]


RULES = """
rules:
  - id: hot
    devices: ["gh-*"]
    when: temperature > 30
    on_raise: [alert, {command: {name: fan, params: {on: true}}}]
    on_clear: [alert, {command: {name: fan, params: {on: "no"}}}]
  - id: everyone
    when: temperature > 40
    on_raise: [{command: {name: fan, params: {on: true}}}]
  - id: ghosts
    devices: ["ghost-*"]
    when: temperature > 40
    on_raise: [{command: {name: fan, params: {on: true}}}]
  - id: by-type
    devices: {type: meter}
    when: kwh > 40
    on_raise: [{command: {name: fan, params: {on: true}, device: "gh-{tags.room}"}}]
"""


def test_rule_commands_are_checked_against_the_allow_lists_of_the_devices_they_reach() -> None:
    registry = REGISTRY.replace("{id: m-1, type: meter}", "{id: m-1, type: meter, tags: {room: '1'}}")
    problems = check_rule_commands(build_rule_set({"r.yaml": RULES}), parse_registry(registry, "d.yaml"))
    shown = [(p.rule_id, p.where, p.error) for p in problems]
    assert shown == [
        ("hot", "on_clear[1]", True),  # every greenhouse it reaches refuses on: "no"
        ("everyone", "on_raise[0]", False),  # the meter refuses fan; the greenhouses take it
        ("ghosts", "on_raise[0]", False),  # no registered device matches
    ]  # by-type: the meter's command goes to gh-1 (its room's greenhouse), which accepts it
    assert "expected a bool, got string 'no'" in problems[0].message
    assert "type 'meter' (1 reached)" in problems[1].message
    assert str(problems[0]).startswith("r.yaml: rule 'hot' on_clear[1]: ")
    # a template naming an unregistered device is reported too
    unregistered = registry.replace("room: '1'", "room: '9'")
    problems = check_rule_commands(build_rule_set({"r.yaml": RULES}), parse_registry(unregistered, "d.yaml"))
    assert any(p.rule_id == "by-type" and "gh-9" in p.message and not p.error for p in problems)


def test_audit_points_released_at_one_instant_get_distinct_timestamps() -> None:
    # Same series (device, name, rule, status) and the same time would overwrite each other in InfluxDB.
    clock, channel = FakeClock(), ListChannel()
    channel.connected = False
    dispatcher, records = make(channel, clock)
    dispatcher.send("gh-1", "fan", {"on": True})
    dispatcher.send("gh-1", "fan", {"on": False})
    channel.connected = True
    dispatcher.advance()  # both leave the queue at the same clock reading
    sent = [p for p in records if dict(p.tags)["status"] == "sent"]
    assert len(sent) == 2 and len({round(p.ts * 1e6) for p in sent}) == 2
    assert all(p.ts - clock.now < 1e-3 for p in records)
