"""The storage schema: how events, alerts and command outcomes become points.

| measurement | tags                                   | fields                                                |
|-------------|----------------------------------------|-------------------------------------------------------|
| telemetry   | device                                 | one per metric (float, bool, string); seq (int)       |
| alerts      | device, rule, severity, state          | message (string); the values that caused it           |
| alerts      | group, group_by, rule, severity, state | the same, for a group rule's alarm (no device)         |
| (derived)   | device or <group_by>, rule             | a derived metric's fields (floats), at interval start |
| commands    | device, name, status, rule             | id, params (JSON text), detail, latency_ms, attempt   |

| gateway_events | kind, client_id (session_lost)         | since, until (epoch seconds), detail                  |
| gateway_events | kind, device (seq_gap, seq_gap_unverified) | first, last, missing (seqs, integers), detail     |
| device_status  | device, status                         | device_ts (the device's own ts, when it sent one)      |
| quarantine     | device                                 | like telemetry: payloads of unregistered devices       |

A `device_status` point is timed when the gateway received the status message: a last will is
composed at connect time, so the `ts` inside it says when the device connected, not when it went away.

`state` is `raised`, `cleared` or `acknowledged`; command `status` is `queued`, `sent`, `ok`, `error`, `timed_out`, `expired` or `rejected` (see devices/delivery.py).
"""

from __future__ import annotations

import json
from typing import Any

from devices.dedupe import SeqGap
from devices.event import FieldValue, TelemetryEvent
from gateway.store.base import Point
from rules.action import RecordAlert, WriteDerived

TELEMETRY = "telemetry"
ALERTS = "alerts"
COMMANDS = "commands"
GATEWAY_EVENTS = "gateway_events"
DEVICE_STATUS = "device_status"
QUARANTINE = "quarantine"


def telemetry_point(event: TelemetryEvent) -> Point:
    """Build the telemetry point of one event; `seq` is kept so loss can be checked from the store.

    Numbers are stored as floats: JSON does not tell 25 from 25.0, and a device sending both would
    otherwise hit InfluxDB's field type conflict and lose points.
    """
    fields: dict[str, FieldValue] = {
        name: float(value) if type(value) is int else value for name, value in event.fields.items()
    }
    if event.seq is not None:
        fields["seq"] = event.seq
    return Point(TELEMETRY, (("device", event.device_id),), fields, event.ts)


def quarantine_point(event: TelemetryEvent) -> Point:
    """Build the point that keeps an unregistered device's event apart from telemetry."""
    point = telemetry_point(event)
    return Point(QUARANTINE, point.tags, point.fields, point.ts)


def device_status_point(device_id: str, status: str, received_at: float, device_ts: float | None) -> Point:
    """Record a change of a device's online status."""
    fields: dict[str, FieldValue] = {"device_ts": device_ts if device_ts is not None else received_at}
    return Point(DEVICE_STATUS, (("device", device_id), ("status", status)), fields, received_at)


def alert_point(alert: RecordAlert) -> Point:
    """Build the point that records one raise or clear of an alarm."""
    fields: dict[str, FieldValue] = {"message": alert.message}
    for name, value in alert.values.items():
        if name != "message":
            fields[name] = value
    subject: tuple[tuple[str, str], ...] = (("device", alert.device_id),)
    if alert.group is not None:  # a group rule's alarm: the group, not a device
        subject = (("group", alert.group[1]), ("group_by", alert.group[0]))
    tags = (*subject, ("rule", alert.rule_id), ("severity", alert.severity), ("state", alert.state))
    return Point(ALERTS, tags, fields, alert.ts)


def derived_point(derived: WriteDerived) -> Point:
    """Build the point of one interval of a derived metric (its tags come sorted from the engine)."""
    return Point(derived.measurement, derived.tags, dict(derived.fields), derived.ts)


def command_point(
    *,
    command_id: str,
    device_id: str,
    name: str,
    status: str,
    ts: float,
    rule_id: str = "",
    params: dict[str, Any] | None = None,
    detail: str = "",
    latency_ms: float | None = None,
    attempt: int | None = None,
) -> Point:
    """Build the audit point of one step in a command's life (`attempt`: which publish, on `sent`)."""
    fields: dict[str, FieldValue] = {"id": command_id, "detail": detail}
    if params is not None:
        fields["params"] = json.dumps(params, separators=(",", ":"), sort_keys=True)
    if latency_ms is not None:
        fields["latency_ms"] = latency_ms
    if attempt is not None:
        fields["attempt"] = attempt
    tags = (("device", device_id), ("name", name), ("rule", rule_id), ("status", status))
    return Point(COMMANDS, tags, fields, ts)


def session_loss_point(since: float, until: float, *, client_id: str) -> Point:
    """Record a window in which the broker may have dropped messages for us (session not resumed)."""
    fields: dict[str, FieldValue] = {
        "since": since,
        "until": until,
        "detail": "broker did not resume the MQTT session; messages queued for us may be lost",
    }
    return Point(GATEWAY_EVENTS, (("client_id", client_id), ("kind", "session_lost")), fields, until)


def seq_gap_point(gap: SeqGap, ts: float) -> Point:
    """Record seqs a device skipped, timed like the message that revealed the gap.

    `kind` is `seq_gap`, or `seq_gap_unverified` for a jump right after a restart that followed a
    crash, which the crashed run may have stored (see devices/dedupe.py).
    """
    kind, detail = "seq_gap", "these seqs never reached the gateway (lost on the way or in the broker)"
    if not gap.verified:
        kind, detail = "seq_gap_unverified", "skipped after a crash; the previous run may have stored them"
    fields: dict[str, FieldValue] = {
        "first": gap.first,
        "last": gap.last,
        "missing": gap.missing,
        "detail": detail,
    }
    return Point(GATEWAY_EVENTS, (("device", gap.device_id), ("kind", kind)), fields, ts)
