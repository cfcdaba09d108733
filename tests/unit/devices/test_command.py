"""The command wire protocol: `expires`, and acks that name their command by MQTT 5 correlation data."""

from __future__ import annotations

import json

import pytest

from devices.command import Command, CommandAck
from devices.errors import PayloadError


def test_expires_travels_in_the_body_and_decides_expiry() -> None:
    command = Command("abc", "gh-1", "fan", {"on": True}, 100.0, 130.0)
    doc = json.loads(command.encode())
    assert doc == {"id": "abc", "name": "fan", "params": {"on": True}, "ts": 100.0, "expires": 130.0}
    assert Command.decode("gh-1", command.encode()) == command
    assert not command.is_expired(129.9)
    assert command.is_expired(130.0)


def test_a_command_without_expires_never_expires() -> None:
    command = Command.decode("gh-1", b'{"id": "a", "name": "fan", "expires": "soon"}')
    assert command.expires is None and not command.is_expired(1e12)
    assert "expires" not in json.loads(command.encode())


def test_an_ack_may_name_its_command_by_correlation_data_only() -> None:
    ack = CommandAck.decode("gh-1", b'{"status": "ok"}', correlation_id="abc")
    assert ack == CommandAck("abc", "gh-1", "ok")
    assert CommandAck.decode("gh-1", b'{"id": "abc", "status": "ok"}', correlation_id="abc").id == "abc"


def test_an_ack_whose_id_and_correlation_data_disagree_is_refused() -> None:
    with pytest.raises(PayloadError, match="differs from its correlation data"):
        CommandAck.decode("gh-1", b'{"id": "abc", "status": "ok"}', correlation_id="xyz")
    with pytest.raises(PayloadError, match="needs a string 'id'"):
        CommandAck.decode("gh-1", b'{"status": "ok"}')
