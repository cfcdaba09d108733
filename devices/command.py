"""The command protocol between tidegate and devices.

Gateway -> device on `devices/{device_id}/commands`:
    {"id": "<hex>", "name": "fan", "params": {"speed": "high"}, "ts": <epoch seconds>}
Device -> gateway on `devices/{device_id}/commands/ack`:
    {"id": "<same id>", "status": "ok" | "error", "detail": <optional string>, ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from devices.errors import PayloadError

AckStatus = Literal["ok", "error"]
MAX_ACK_BYTES = 4_096


@dataclass(frozen=True, slots=True)
class Command:
    """A command addressed to one device."""

    id: str
    device_id: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0

    def encode(self) -> bytes:
        """Serialise the wire form a device receives."""
        return json.dumps(
            {"id": self.id, "name": self.name, "params": self.params, "ts": self.ts}, separators=(",", ":")
        ).encode()

    @classmethod
    def decode(cls, device_id: str, payload: bytes) -> Command:
        """Parse the wire form (used by devices and the simulator)."""
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            raise PayloadError("command is not valid JSON", device_id=device_id) from None
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("id"), str)
            or not isinstance(doc.get("name"), str)
        ):
            raise PayloadError("command needs string 'id' and 'name'", device_id=device_id)
        params = doc.get("params", {})
        if not isinstance(params, dict):
            raise PayloadError("command 'params' must be an object", device_id=device_id)
        ts = doc.get("ts", 0.0)
        return cls(
            doc["id"], device_id, doc["name"], params, float(ts) if isinstance(ts, int | float) else 0.0
        )


@dataclass(frozen=True, slots=True)
class CommandAck:
    """A device's answer to a command."""

    id: str
    device_id: str
    status: AckStatus
    detail: str = ""

    def encode(self) -> bytes:
        """Serialise the wire form a device sends."""
        doc: dict[str, str] = {"id": self.id, "status": self.status}
        if self.detail:
            doc["detail"] = self.detail
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, device_id: str, payload: bytes) -> CommandAck:
        """Parse and validate an ack payload, or raise `PayloadError`."""
        if len(payload) > MAX_ACK_BYTES:
            raise PayloadError(f"ack of {len(payload)} bytes exceeds {MAX_ACK_BYTES}", device_id=device_id)
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            raise PayloadError("ack is not valid JSON", device_id=device_id) from None
        if not isinstance(doc, dict):
            raise PayloadError("ack must be a JSON object", device_id=device_id)
        ack_id, status = doc.get("id"), doc.get("status")
        if not isinstance(ack_id, str) or not ack_id:
            raise PayloadError("ack needs a string 'id'", device_id=device_id)
        if status not in ("ok", "error"):
            raise PayloadError(f"ack status must be 'ok' or 'error', got {status!r}", device_id=device_id)
        detail = doc.get("detail", "")
        return cls(ack_id, device_id, status, detail if isinstance(detail, str) else json.dumps(detail))
