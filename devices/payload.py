"""Decode telemetry payloads: bytes from MQTT become validated `TelemetryEvent`s here and nowhere else.

Two formats, chosen per device type (`format:` in the registry) or per message by its MQTT 5 content
type (`content_type_format`):

- `json` (this module): a JSON object
  `{"ts": <epoch seconds | RFC 3339>, "seq": <int>, "<metric>": <number|bool|string>}` or a JSON array of
  such objects. `ts` and `seq` are optional.
- `senml`: SenML JSON (RFC 8428), decoded by `devices.senml.SenmlDecoder`.

Identity: the device id always comes from the topic. A JSON object may also name its device under
`device` or `device_id` (the keys in `IDENTITY_KEYS`); the value must then be exactly the topic's
device id, or the whole message is rejected. Those keys are never stored as metrics.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Protocol

from devices.errors import PayloadError
from devices.event import FieldValue, TelemetryEvent
from devices.topic import is_valid_device_id

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
FIELD_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
RESERVED_KEYS = frozenset({"ts", "seq"})
# Keys by which a payload names its device: the simulator and the README send none, but devices ported
# from other platforms often do, and a value that disagrees with the topic is a spoof or a mix-up.
IDENTITY_KEYS = frozenset({"device", "device_id"})
# Timestamps outside this window are almost certainly a unit error (ms sent as s) or a broken clock.
MIN_TS = 946_684_800.0  # 2000-01-01
MAX_FUTURE_SKEW = 366 * 86_400.0
MAX_CACHED_NAMES = 4_096


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

# A tuple, not `bool | int | float`: the union would be rebuilt for every field on the hot path.
_NUMBER = (bool, int, float)

PayloadFormat = Literal["json", "senml"]
CONTENT_TYPES: Mapping[str, PayloadFormat] = {
    "application/json": "json",
    "application/senml+json": "senml",
}


class TelemetryDecoder(Protocol):
    """Anything that turns one telemetry payload into events (`PayloadDecoder`, `SenmlDecoder`)."""

    def decode(self, device_id: str, payload: bytes, received_at: float) -> list[TelemetryEvent]: ...


def content_type_format(content_type: str) -> PayloadFormat:
    """Map an MQTT 5 content type to a payload format, or raise `PayloadError` for any other type.

    Media types compare case-insensitively and parameters (`; charset=utf-8`) are ignored: payloads
    must be UTF-8 whatever they say.
    """
    found = CONTENT_TYPES.get(content_type)
    if found is None:
        found = CONTENT_TYPES.get(content_type.partition(";")[0].strip().lower())
        if found is None:
            expected = " or ".join(CONTENT_TYPES)
            raise PayloadError(f"unsupported content type {content_type[:80]!r} (expected {expected})")
    return found


def identity_error(device_id: str, named: object, where: str) -> PayloadError:
    """Build the rejection of a payload that names a device other than its topic's."""
    shown = repr(named[:80]) if isinstance(named, str) else repr(named)[:80]
    return PayloadError(
        f"{where} names device {shown}, but the topic is for device {device_id!r}", device_id=device_id
    )


def load_json(device_id: str, payload: bytes, max_bytes: int) -> Any:
    """Check the device id and the payload size, then parse strict JSON (no NaN, inf or >int64)."""
    if not is_valid_device_id(device_id):
        raise PayloadError(f"device id {device_id[:80]!r} is not allowed", device_id=device_id)
    if not payload:
        raise PayloadError("empty payload", device_id=device_id)
    if len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds {max_bytes}", device_id=device_id)
    try:
        return _decoder.decode(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise PayloadError("payload is not UTF-8", device_id=device_id) from None
    except RecursionError:
        raise PayloadError("payload is nested too deeply", device_id=device_id) from None
    except ValueError as exc:  # JSONDecodeError is a ValueError, and so are our hooks' rejections
        raise PayloadError(f"invalid JSON: {exc}", device_id=device_id) from None


def _without_identity(device_id: str, doc: dict[str, Any], at: str) -> dict[str, Any]:
    for key in IDENTITY_KEYS & doc.keys():
        if doc[key] != device_id:
            raise identity_error(device_id, doc[key], f"{at}{key!r}")
    return {key: value for key, value in doc.items() if key not in IDENTITY_KEYS}


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
        self._names: set[str] = set()  # field names already checked against FIELD_NAME_RE

    def _allowed_name(self, key: str) -> bool:
        if FIELD_NAME_RE.match(key) is None:
            return False
        # The regex costs more than the rest of a field's checks; a fleet uses few names. Bounded so
        # a device inventing names cannot grow it without limit.
        if len(self._names) < MAX_CACHED_NAMES:
            self._names.add(key)
        return True

    def decode(self, device_id: str, payload: bytes, received_at: float) -> list[TelemetryEvent]:
        """Decode one MQTT payload into events, or raise `PayloadError` with the reason."""
        doc = load_json(device_id, payload, self.max_bytes)
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
        if "device" in doc or "device_id" in doc:  # two lookups per object keep the common case fast
            doc = _without_identity(device_id, doc, at)
        names = self._names
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
            elif key not in names and not self._allowed_name(key):
                raise PayloadError(f"{at}field name {key[:80]!r} is not allowed", device_id=device_id)
            elif isinstance(value, _NUMBER):
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
