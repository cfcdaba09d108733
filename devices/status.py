"""Device online status: the birth / last-will protocol, plus last seen and message rate per device (over the last minute, in 10 s steps).

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
from array import array
from dataclasses import dataclass
from typing import Literal

from devices.errors import PayloadError
from devices.payload import parse_timestamp

Status = Literal["online", "offline"]
RATE_WINDOW = 60  # seconds the message rate is averaged over
RATE_STEP = 10  # ... in buckets this long: cheap enough to keep for 100,000 devices
_BUCKETS = RATE_WINDOW // RATE_STEP
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
    """Last seen time and message counts of the last minute in 10 s buckets, for one device.

    Arrays rather than lists: a list of bucket numbers would hold one int object per slot, and this
    is kept for every device the gateway has heard from.
    """

    __slots__ = ("buckets", "counts", "last_seen", "status", "status_since")

    def __init__(self) -> None:
        self.last_seen: float | None = None
        self.status: Status | None = None
        self.status_since: float | None = None
        self.counts = array("l", [0] * _BUCKETS)
        self.buckets = array("q", [-1] * _BUCKETS)  # which 10 s bucket each slot of `counts` holds


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
        bucket = int(now) // RATE_STEP
        slot = bucket % _BUCKETS
        if entry.buckets[slot] != bucket:
            entry.buckets[slot] = bucket
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
        oldest = int(now) // RATE_STEP - _BUCKETS
        count = sum(c for c, b in zip(entry.counts, entry.buckets, strict=True) if b > oldest)
        return DeviceView(
            device_id, entry.status or "unknown", entry.status_since, entry.last_seen, count / RATE_WINDOW
        )

    def device_ids(self) -> list[str]:
        """Return the ids of every device heard from."""
        return list(self._devices)
