"""Decode telemetry payloads: bytes from MQTT become validated `TelemetryEvent`s here and nowhere else.

Accepted: a JSON object `{"ts": <epoch seconds | RFC 3339>, "seq": <int>, "<metric>": <number|bool|string>}`
or a JSON array of such objects. `ts` and `seq` are optional.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any

from devices.errors import PayloadError
from devices.event import FieldValue, TelemetryEvent
from devices.topic import is_valid_device_id

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
FIELD_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
RESERVED_KEYS = frozenset({"ts", "seq"})
# Timestamps outside this window are almost certainly a unit error (ms sent as s) or a broken clock.
MIN_TS = 946_684_800.0  # 2000-01-01
MAX_FUTURE_SKEW = 366 * 86_400.0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number tidegate accepts")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} overflows a double")
    return value


def _parse_int(text: str) -> int | float:
    if len(text) > 20:  # cheaper than letting int() build a 5000-digit number
        raise ValueError(f"integer {text[:24]}... is outside int64")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"integer {text} is outside int64")
    return value


_decoder = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int, parse_constant=_reject_constant)


def parse_timestamp(raw: object) -> float:
    """Turn a payload `ts` (epoch seconds or RFC 3339 text) into epoch seconds."""
    if isinstance(raw, bool):
        raise PayloadError(f"ts must be epoch seconds or RFC 3339 text, got {raw!r}")
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise PayloadError(f"ts {raw[:40]!r} is not RFC 3339") from None
        if parsed.tzinfo is None:
            raise PayloadError(f"ts {raw[:40]!r} has no time zone offset")
        return parsed.timestamp()
    raise PayloadError(f"ts must be epoch seconds or RFC 3339 text, got {type(raw).__name__}")


class PayloadDecoder:
    """Validate telemetry payloads against size, shape and value limits.

    Args:
        max_bytes: payloads larger than this are rejected before parsing.
        max_batch: the most objects one array payload may carry.
        max_fields: the most metrics one object may carry.
        max_string: the longest string value accepted.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 65_536,
        max_batch: int = 1_000,
        max_fields: int = 100,
        max_string: int = 1_024,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self.max_fields = max_fields
        self.max_string = max_string

    def decode(self, device_id: str, payload: bytes, received_at: float) -> list[TelemetryEvent]:
        """Decode one MQTT payload into events, or raise `PayloadError` with the reason."""
        if not is_valid_device_id(device_id):
            raise PayloadError(f"device id {device_id[:80]!r} is not allowed", device_id=device_id)
        if not payload:
            raise PayloadError("empty payload", device_id=device_id)
        if len(payload) > self.max_bytes:
            raise PayloadError(
                f"payload of {len(payload)} bytes exceeds {self.max_bytes}", device_id=device_id
            )
        try:
            text = payload.decode("utf-8")
            doc = _decoder.decode(text)
        except UnicodeDecodeError:
            raise PayloadError("payload is not UTF-8", device_id=device_id) from None
        except RecursionError:
            raise PayloadError("payload is nested too deeply", device_id=device_id) from None
        except ValueError as exc:  # JSONDecodeError is a ValueError, and so are our hooks' rejections
            raise PayloadError(f"invalid JSON: {exc}", device_id=device_id) from None
        if isinstance(doc, dict):
            return [self._event(device_id, doc, received_at)]
        if isinstance(doc, list):
            if not doc:
                raise PayloadError("empty batch", device_id=device_id)
            if len(doc) > self.max_batch:
                raise PayloadError(f"batch of {len(doc)} exceeds {self.max_batch}", device_id=device_id)
            return [self._event(device_id, item, received_at, i) for i, item in enumerate(doc)]
        raise PayloadError(
            f"payload must be a JSON object or array, got {type(doc).__name__}", device_id=device_id
        )

    def _event(
        self, device_id: str, doc: object, received_at: float, index: int | None = None
    ) -> TelemetryEvent:
        at = "" if index is None else f"[{index}] "
        if not isinstance(doc, dict):
            raise PayloadError(f"{at}batch items must be JSON objects", device_id=device_id)
        ts = received_at
        seq: int | None = None
        fields: dict[str, FieldValue] = {}
        for key, value in doc.items():
            if key == "ts":
                try:
                    ts = parse_timestamp(value)
                except PayloadError as exc:
                    raise PayloadError(at + exc.reason, device_id=device_id) from None
                if not MIN_TS <= ts <= received_at + MAX_FUTURE_SKEW:
                    raise PayloadError(
                        f"{at}ts {value!r} is outside the accepted time window", device_id=device_id
                    )
            elif key == "seq":
                if type(value) is not int or value < 0:
                    raise PayloadError(
                        f"{at}seq must be a non-negative integer, got {value!r}", device_id=device_id
                    )
                seq = value
            elif FIELD_NAME_RE.match(key) is None:
                raise PayloadError(f"{at}field name {key[:80]!r} is not allowed", device_id=device_id)
            elif isinstance(value, bool | int | float):
                fields[key] = value
            elif isinstance(value, str):
                if len(value) > self.max_string:
                    raise PayloadError(
                        f"{at}field {key!r}: string longer than {self.max_string}", device_id=device_id
                    )
                fields[key] = value
            else:
                raise PayloadError(
                    f"{at}field {key!r} must be a number, bool or string, got {type(value).__name__}",
                    device_id=device_id,
                )
        if not fields:
            raise PayloadError(f"{at}no metric fields", device_id=device_id)
        if len(fields) > self.max_fields:
            raise PayloadError(f"{at}{len(fields)} fields exceed {self.max_fields}", device_id=device_id)
        return TelemetryEvent(device_id=device_id, ts=ts, fields=fields, seq=seq)
