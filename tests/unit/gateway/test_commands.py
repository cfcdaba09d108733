"""Command dispatch: publish, match acks, time out, audit every step."""

from __future__ import annotations

import pytest

from devices.command import Command, CommandAck
from devices.topic import TopicScheme
from gateway.commands import CommandDispatcher
from gateway.store.base import Point


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListChannel:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail = fail

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self.fail:
            raise RuntimeError("outgoing queue full")
        self.sent.append((topic, payload))


def make(channel: ListChannel, clock: FakeClock, **kw: int) -> tuple[CommandDispatcher, list[Point]]:
    records: list[Point] = []
    dispatcher = CommandDispatcher(
        channel=channel,
        topics=TopicScheme("devices/{device_id}/commands"),
        record=records.append,
        clock=clock,
        ack_timeout=5,
        **kw,
    )
    return dispatcher, records


def statuses(records: list[Point]) -> list[str]:
    return [dict(p.tags)["status"] for p in records]


def test_send_then_ack_ok() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, records = make(channel, clock)
    command = dispatcher.send("gh-1", "fan", {"on": True}, rule_id="hot")
    assert command is not None
    [(topic, payload)] = channel.sent
    assert topic == "devices/gh-1/commands"
    assert Command.decode("gh-1", payload) == command
    clock.now += 0.25
    dispatcher.handle_ack("gh-1", CommandAck(command.id, "gh-1", "ok").encode())
    assert statuses(records) == ["sent", "ok"]
    assert records[1].fields["latency_ms"] == pytest.approx(250.0)
    assert dict(records[1].tags)["rule"] == "hot"
    assert dispatcher.stats.acked_ok == 1 and dispatcher.pending == 0


def test_error_ack_keeps_the_detail() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, records = make(channel, clock)
    command = dispatcher.send("gh-1", "reboot", {})
    assert command is not None
    dispatcher.handle_ack("gh-1", CommandAck(command.id, "gh-1", "error", "unknown command").encode())
    assert statuses(records) == ["sent", "error"]
    assert records[1].fields["detail"] == "unknown command"


def test_timeout_is_recorded_and_a_late_ack_ignored() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, records = make(channel, clock)
    command = dispatcher.send("gh-1", "fan", {})
    assert command is not None
    clock.now += 4.9
    dispatcher.expire()
    assert statuses(records) == ["sent"]
    clock.now += 0.2
    dispatcher.expire()
    assert statuses(records) == ["sent", "timed_out"]
    dispatcher.handle_ack("gh-1", CommandAck(command.id, "gh-1", "ok").encode())
    assert statuses(records) == ["sent", "timed_out"]
    assert dispatcher.stats.unknown_acks == 1


def test_ack_from_another_device_does_not_match() -> None:
    clock, channel = FakeClock(), ListChannel()
    dispatcher, _records = make(channel, clock)
    command = dispatcher.send("gh-1", "fan", {})
    assert command is not None
    dispatcher.handle_ack("gh-2", CommandAck(command.id, "gh-2", "ok").encode())
    assert dispatcher.pending == 1 and dispatcher.stats.unknown_acks == 1


def test_publish_failure_and_full_pending_are_rejected_not_lost() -> None:
    clock = FakeClock()
    dispatcher, records = make(ListChannel(fail=True), clock)
    assert dispatcher.send("gh-1", "fan", {}) is None
    assert statuses(records) == ["rejected"] and "queue full" in str(records[0].fields["detail"])
    dispatcher, records = make(ListChannel(), clock, max_pending=1)
    assert dispatcher.send("gh-1", "fan", {}) is not None
    assert dispatcher.send("gh-1", "fan", {}) is None
    assert statuses(records) == ["sent", "rejected"]


def test_bad_ack_is_counted() -> None:
    dispatcher, _ = make(ListChannel(), FakeClock())
    dispatcher.handle_ack("gh-1", b"not json")
    assert dispatcher.stats.bad_acks == 1
