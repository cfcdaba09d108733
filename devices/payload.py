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
import sys
from collections.abc import Mapping
from datetime import datetime
from math import isfinite
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
_ABSENT: Any = object()  # a key the object does not have (None is JSON's null)
MAX_CACHED_IDS = 65_536  # <= ~13 MB of 128-character ids; a flood of new ids empties it, a fleet refills it


# Payloads up to this size are parsed by json's C scanner alone, and `PayloadDecoder` checks each
# number it keeps (finite, within int64): Python hooks for every number cost ~1.2 of ~3.6 us per
# telemetry message. Larger payloads keep the hooks, which refuse a long integer before int() builds
# it: int() is quadratic in the digits (a 4,299-digit integer, just under Python's conversion
# limit, takes ~90 us), so a large payload of such integers would cost far more than the hooks.
UNCHECKED_NUMBERS_MAX_BYTES = 2_048


class _Refused(ValueError):
    """A number a parse hook refuses (the hooks' rejections, told apart from int()'s digit limit)."""


def _reject_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number tidegate accepts")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"number {text[:40]} overflows a double")
    return value


def _parse_int(text: str) -> int | float:
    if len(text) > 20:  # cheaper than letting int() build a 5000-digit number
        raise _Refused(f"integer {text[:24]}... is outside int64")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise _Refused(f"integer {text} is outside int64")
    return value


_decoder = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int, parse_constant=_reject_constant)
# NaN and Infinity are refused while parsing either way: no check after parsing can tell them from
# an overflow, and they are rare enough that the hook costs nothing.
_unchecked_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def int64_reason(value: int) -> str:
    """Say that an integer is outside int64, without printing all of a huge one."""
    if value.bit_length() <= 128:
        return f"integer {value} is outside int64"
    # str() of a long integer is quadratic too, and its thousands of digits help nobody
    return f"integer of {value.bit_length()} bits is outside int64"


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
    return _parse(device_id, payload, max_bytes, check_numbers=True)


def _parse(device_id: str, payload: bytes, max_bytes: int, *, check_numbers: bool) -> Any:
    """Check the payload size and parse JSON; see `load_json`.

    Without `check_numbers`, payloads up to `UNCHECKED_NUMBERS_MAX_BYTES` may hold infinity (from
    `1e400`) and integers outside int64: the caller must refuse those among the values it keeps.
    """
    size = len(payload)
    if not size:
        raise PayloadError("empty payload", device_id=device_id)
    if size > max_bytes:
        raise PayloadError(f"payload of {size} bytes exceeds {max_bytes}", device_id=device_id)
    try:
        text = payload.decode("utf-8")
        if check_numbers or size > UNCHECKED_NUMBERS_MAX_BYTES:
            return _decoder.decode(text)
        try:
            # raw_decode skips decode()'s whitespace scans; anything around the value (whitespace,
            # extra data) falls through to decode(), which allows the one and refuses the other.
            doc, end = _unchecked_decoder.raw_decode(text)
            if end == len(text):
                return doc
        except json.JSONDecodeError:
            pass
        return _unchecked_decoder.decode(text)
    except UnicodeDecodeError:
        raise PayloadError("payload is not UTF-8", device_id=device_id) from None
    except RecursionError:
        raise PayloadError("payload is nested too deeply", device_id=device_id) from None
    except (json.JSONDecodeError, _Refused) as exc:
        raise PayloadError(f"invalid JSON: {exc}", device_id=device_id) from None
    except ValueError:  # int() refused a number longer than sys.get_int_max_str_digits()
        raise PayloadError(
            f"invalid JSON: an integer has more than {sys.get_int_max_str_digits()} digits (outside int64)",
            device_id=device_id,
        ) from None


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
        self._ids: set[str] = set()  # device ids already checked against the allow-list

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
        ids = self._ids
        if device_id not in ids:
            if not is_valid_device_id(device_id):
                raise PayloadError(f"device id {device_id[:80]!r} is not allowed", device_id=device_id)
            if len(ids) >= MAX_CACHED_IDS:  # bounded: ids seen long ago are checked again
                ids.clear()
            ids.add(device_id)
        # Numbers are checked in `_event`, among the values kept (see UNCHECKED_NUMBERS_MAX_BYTES).
        doc = _parse(device_id, payload, self.max_bytes, check_numbers=False)
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
        # ts and seq come out of the parsed object, which then is the event's fields: no copy
        ts = received_at
        raw_ts = doc.pop("ts", _ABSENT)
        if raw_ts is not _ABSENT:
            # epoch seconds as a float in the window (the usual case; never NaN, and the window
            # excludes infinity), else everything else `_timestamp` accepts or refuses
            if type(raw_ts) is float and MIN_TS <= raw_ts <= received_at + MAX_FUTURE_SKEW:
                ts = raw_ts
            else:
                ts = self._timestamp(device_id, raw_ts, received_at, at)
        raw_seq = doc.pop("seq", _ABSENT)
        seq: int | None = None
        if raw_seq is not _ABSENT:
            if type(raw_seq) is not int or raw_seq < 0:
                raise PayloadError(
                    f"{at}seq must be a non-negative integer, got {raw_seq!r}", device_id=device_id
                )
            if raw_seq > INT64_MAX:
                raise PayloadError(f"{at}seq: {int64_reason(raw_seq)}", device_id=device_id)
            seq = raw_seq
        names = self._names
        for key, value in doc.items():
            if key not in names and not self._allowed_name(key):  # known names skip the regex
                raise PayloadError(f"{at}field name {key[:80]!r} is not allowed", device_id=device_id)
            # json builds exactly these types (True is a bool, never an int): `is` tests suffice.
            kind = type(value)
            if kind is float:
                if not isfinite(value):  # `1e400` parses to infinity (NaN is refused while parsing)
                    raise PayloadError(f"{at}field {key!r}: number overflows a double", device_id=device_id)
            elif kind is int:
                if not INT64_MIN <= value <= INT64_MAX:
                    raise PayloadError(f"{at}field {key!r}: {int64_reason(value)}", device_id=device_id)
            elif kind is str:
                if len(value) > self.max_string:
                    raise PayloadError(
                        f"{at}field {key!r}: string longer than {self.max_string}", device_id=device_id
                    )
            elif kind is not bool:
                raise PayloadError(
                    f"{at}field {key!r} must be a number, bool or string, got {kind.__name__}",
                    device_id=device_id,
                )
        fields: dict[str, FieldValue] = doc
        if not fields:
            raise PayloadError(f"{at}no metric fields", device_id=device_id)
        if len(fields) > self.max_fields:
            raise PayloadError(f"{at}{len(fields)} fields exceed {self.max_fields}", device_id=device_id)
        return TelemetryEvent(device_id=device_id, ts=ts, fields=fields, seq=seq)

    @staticmethod
    def _timestamp(device_id: str, value: object, received_at: float, at: str) -> float:
        if type(value) is int and not INT64_MIN <= value <= INT64_MAX:  # float() of a huge one overflows
            raise PayloadError(f"{at}ts: {int64_reason(value)}", device_id=device_id)
        if type(value) is float and not isfinite(value):
            raise PayloadError(f"{at}ts: number overflows a double", device_id=device_id)
        try:
            ts = parse_timestamp(value)
        except PayloadError as exc:
            raise PayloadError(at + exc.reason, device_id=device_id) from None
        if not MIN_TS <= ts <= received_at + MAX_FUTURE_SKEW:
            raise PayloadError(f"{at}ts {value!r} is outside the accepted time window", device_id=device_id)
        return ts
