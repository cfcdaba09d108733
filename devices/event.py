"""The typed telemetry event every later stage works with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

FieldValue = float | int | bool | str


@dataclass(frozen=True, slots=True)
class TelemetryEvent:
    """One reading of one device at one moment.

    Attributes:
        device_id: taken from the MQTT topic, never from the payload.
        ts: event time, epoch seconds (from the payload, or the receive time when absent).
        fields: metric name -> value; never empty.
        seq: the device's sequence number, when it sends one (used for loss checks and dedupe).
    """

    device_id: str
    ts: float
    fields: Mapping[str, FieldValue]
    seq: int | None = None
