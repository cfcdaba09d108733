"""Topic schemes and the command wire protocol."""

from __future__ import annotations

import pytest

from devices.command import Command, CommandAck
from devices.errors import PayloadError
from devices.topic import TopicScheme


def test_topic_scheme_round_trip() -> None:
    scheme = TopicScheme("devices/{device_id}/telemetry")
    assert scheme.subscription == "devices/+/telemetry"
    assert scheme.format("gh-1") == "devices/gh-1/telemetry"
    assert scheme.device_id("devices/gh-1/telemetry") == "gh-1"


@pytest.mark.parametrize(
    "topic",
    ["devices/gh-1/commands", "devices/gh-1/telemetry/x", "other/gh-1/telemetry", "devices/telemetry"],
)
def test_topic_scheme_rejects_other_topics(topic: str) -> None:
    assert TopicScheme("devices/{device_id}/telemetry").device_id(topic) is None


@pytest.mark.parametrize(
    "template",
    ["devices/telemetry", "devices/{device_id}/{device_id}", "d/x{device_id}/t", "d/+/{device_id}"],
)
def test_bad_templates(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        TopicScheme(template)


def test_command_round_trip() -> None:
    command = Command("abc", "gh-1", "fan", {"on": True}, 12.5)
    assert Command.decode("gh-1", command.encode()) == command


def test_ack_round_trip() -> None:
    ack = CommandAck("abc", "gh-1", "error", "fan jammed")
    assert CommandAck.decode("gh-1", ack.encode()) == ack


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"nope", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"status": "ok"}', "needs a string 'id'"),
        (b'{"id": "a", "status": "done"}', "status must be 'ok' or 'error'"),
        (b'{"id": "a", "status": "ok", "x": "' + b"y" * 5000 + b'"}', "exceeds"),
    ],
)
def test_bad_acks(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        CommandAck.decode("gh-1", payload)
