"""The storage schema: how events, alerts and command outcomes become points.

| measurement | tags                                   | fields                                                |
|-------------|----------------------------------------|-------------------------------------------------------|
| telemetry   | device                                 | one per metric (float, bool, string); seq (int)       |
| alerts      | device, rule, severity, state          | message (string); the values that caused it           |
| commands    | device, name, status, rule             | id, params (JSON text), detail (string), latency_ms   |

| gateway_events | kind, client_id                        | since, until (epoch seconds), detail                  |
| device_status  | device, status                         | device_ts (the device's own ts, when it sent one)      |
| quarantine     | device                                 | like telemetry: payloads of unregistered devices       |

A `device_status` point is timed when the gateway received the status message: a last will is
composed at connect time, so the `ts` inside it says when the device connected, not when it went away.

`state` is `raised`, `cleared` or `acknowledged`; command `status` is `sent`, `ok`, `error`, `timed_out` or `rejected`.
"""

from __future__ import annotations

import json
from typing import Any

from devices.event import FieldValue, TelemetryEvent
from gateway.store.base import Point
from rules.action import RecordAlert

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
    tags = (
        ("device", alert.device_id),
        ("rule", alert.rule_id),
        ("severity", alert.severity),
        ("state", alert.state),
    )
    return Point(ALERTS, tags, fields, alert.ts)


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
) -> Point:
    """Build the audit point of one step in a command's life."""
    fields: dict[str, FieldValue] = {"id": command_id, "detail": detail}
    if params is not None:
        fields["params"] = json.dumps(params, separators=(",", ":"), sort_keys=True)
    if latency_ms is not None:
        fields["latency_ms"] = latency_ms
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
