"""What the rule engine asks the gateway to do. The engine returns these; it never performs I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from devices.event import FieldValue

AlertState = Literal["raised", "cleared"]
Severity = Literal["info", "warning", "critical"]


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


Action = SendCommand | RecordAlert
