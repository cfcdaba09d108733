"""Device online status: the birth / last-will protocol, plus last seen and message rate per device.

A device publishes on `devices/{device_id}/status`, QoS 1, retained:

    {"status": "online", "ts": <epoch seconds>}     right after connecting (its birth message)
    {"status": "offline", "ts": <epoch seconds>}    as its MQTT last will, set when connecting,
                                                    and itself before a clean disconnect

Both are retained so that whoever subscribes later (a restarted gateway) reads the current state;
the will must be retained too, or the retained birth would claim the device online forever.

`DeviceTracker` is pure: every method takes the current time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from devices.errors import PayloadError
from devices.payload import parse_timestamp

Status = Literal["online", "offline"]
RATE_WINDOW = 60  # seconds the message rate is averaged over
MAX_STATUS_BYTES = 1_024


def encode_status(status: Status, ts: float) -> bytes:
    """Return the status payload a device publishes."""
    return json.dumps({"status": status, "ts": ts}, separators=(",", ":")).encode()


def decode_status(device_id: str, payload: bytes) -> tuple[Status, float | None]:
    """Return (status, device ts or None) from a status payload, or raise `PayloadError`."""
    if len(payload) > MAX_STATUS_BYTES:
        raise PayloadError(
            f"status payload of {len(payload)} bytes exceeds {MAX_STATUS_BYTES}", device_id=device_id
        )
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise PayloadError("status payload is not JSON", device_id=device_id) from None
    if not isinstance(doc, dict) or not set(doc) <= {"status", "ts"}:
        raise PayloadError(
            'status payload must be {"status": "online"|"offline", "ts": ...}', device_id=device_id
        )
    status = doc.get("status")
    if status != "online" and status != "offline":
        raise PayloadError(f"status must be 'online' or 'offline', got {status!r}", device_id=device_id)
    ts = None
    if "ts" in doc:
        try:
            ts = parse_timestamp(doc["ts"])
        except PayloadError as exc:
            raise PayloadError(exc.reason, device_id=device_id) from None
    return status, ts


class _Seen:
    """Last seen time and per-second message counts of the last minute, for one device."""

    __slots__ = ("counts", "last_seen", "seconds", "status", "status_since")

    def __init__(self) -> None:
        self.last_seen: float | None = None
        self.status: Status | None = None
        self.status_since: float | None = None
        self.counts = [0] * RATE_WINDOW
        self.seconds = [-1] * RATE_WINDOW  # which second each slot of `counts` belongs to


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What is known of one device's presence."""

    device_id: str
    status: str  # "online", "offline" or "unknown" (no status message yet)
    status_since: float | None
    last_seen: float | None
    rate: float  # messages per second, averaged over the last minute


class DeviceTracker:
    """Track online status, last seen and message rate of every device heard from."""

    def __init__(self) -> None:
        self._devices: dict[str, _Seen] = {}

    def seen(self, device_id: str, now: float) -> None:
        """Count one message from `device_id` at `now` (cheap: runs for every telemetry message)."""
        entry = self._devices.get(device_id)
        if entry is None:
            entry = self._devices[device_id] = _Seen()
        entry.last_seen = now
        second = int(now)
        slot = second % RATE_WINDOW
        if entry.seconds[slot] != second:
            entry.seconds[slot] = second
            entry.counts[slot] = 1
        else:
            entry.counts[slot] += 1

    def set_status(self, device_id: str, status: Status, now: float) -> bool:
        """Record a status message (it also counts as seen); return whether the status changed."""
        self.seen(device_id, now)
        entry = self._devices[device_id]
        if entry.status == status:
            return False
        entry.status = status
        entry.status_since = now
        return True

    def view(self, device_id: str, now: float) -> DeviceView:
        """Return what is known of `device_id` at `now` (unknown devices show as never seen)."""
        entry = self._devices.get(device_id)
        if entry is None:
            return DeviceView(device_id, "unknown", None, None, 0.0)
        oldest = int(now) - RATE_WINDOW
        count = sum(c for c, s in zip(entry.counts, entry.seconds, strict=True) if s > oldest)
        return DeviceView(
            device_id, entry.status or "unknown", entry.status_since, entry.last_seen, count / RATE_WINDOW
        )

    def device_ids(self) -> list[str]:
        """Return the ids of every device heard from."""
        return list(self._devices)
