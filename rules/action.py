"""What the rule engine asks the gateway to do. The engine returns these; it never performs I/O.

An alarm belongs to a device, or, for a group rule, to a group: then its subject (`device_id`
below) reads `<tag>=<value>`, e.g. `site=north`, which no device id can be, and `group` is
(`site`, `north`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from devices.event import FieldValue

AlertState = Literal["raised", "cleared"]
Severity = Literal["info", "warning", "critical"]
Group = tuple[str, str]  # (tag name, tag value)


@dataclass(frozen=True, slots=True)
class SendCommand:
    """Send command `name` with `params` to `device_id`, on behalf of rule `rule_id`."""

    device_id: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    rule_id: str = ""


@dataclass(frozen=True, slots=True)
class RecordAlert:
    """Record that alarm (`rule_id`, `device_id`) was raised or cleared at `ts`, and the values behind it."""

    rule_id: str
    device_id: str
    state: AlertState
    severity: Severity
    ts: float
    message: str = ""
    values: Mapping[str, FieldValue] = field(default_factory=dict)
    group: Group | None = None  # set for a group rule's alarm; `device_id` is then `<tag>=<value>`


@dataclass(frozen=True, slots=True)
class Republish:
    """Publish `payload` (the alert, as JSON) to the MQTT `topic`, on behalf of rule `rule_id`."""

    topic: str
    payload: Mapping[str, Any]
    qos: int = 1
    retain: bool = False
    rule_id: str = ""


@dataclass(frozen=True, slots=True)
class Webhook:
    """POST `body` (the alert, as JSON) to `url`, on behalf of rule `rule_id`."""

    url: str
    body: Mapping[str, Any]
    rule_id: str = ""


@dataclass(frozen=True, slots=True)
class WriteDerived:
    """Write one point of a derived metric: an interval's aggregates, stamped with its start `ts`."""

    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: Mapping[str, float]
    ts: float
    rule_id: str = ""


@dataclass(frozen=True, slots=True)
class FailedAction:
    """An action of rule `rule_id` for alarm subject `device_id` that could not be built, and why.

    E.g. a command to `{tags.site}-controller` for a device without a `site` tag. The gateway logs
    and counts it; a rule-file test that meets one fails.
    """

    rule_id: str
    device_id: str
    step: str  # e.g. "on_raise[2]"
    reason: str


Action = SendCommand | RecordAlert | Republish | Webhook | WriteDerived | FailedAction


def alert_payload(alert: RecordAlert) -> dict[str, Any]:
    """Return the JSON object republish and webhook actions send for `alert`."""
    payload: dict[str, Any] = {"rule": alert.rule_id}
    if alert.group is not None:
        payload["group"] = {alert.group[0]: alert.group[1]}
    else:
        payload["device"] = alert.device_id
    payload.update(
        state=alert.state,
        severity=alert.severity,
        ts=alert.ts,
        message=alert.message,
        values=dict(alert.values),
    )
    return payload
