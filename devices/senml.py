"""Decode SenML JSON packs (RFC 8428, `application/senml+json`) into `TelemetryEvent`s.

A pack is a JSON array of records. Base fields (`bn`, `bt`, `bu`, `bv`, `bs`, `bver`) apply to their
record and every later one until replaced; regular fields (`n`, `u`, `v`, `vs`, `vb`, `vd`, `s`, `t`,
`ut`) to their record only. Each record is resolved as the RFC defines it:

- name = `bn` + `n`; it must use only `A-Z a-z 0-9 - : . / _` and start with a letter or digit;
- time = `bt` + `t` (either missing counts as 0); a result below 2**28 is relative to "now", which
  here is when the gateway received the message (0 = now, -5 = five seconds earlier);
- value = `bv` + `v`, or `vs` (string), or `vb` (bool): exactly one value label, unless there is a sum;
- sum = `bs` + `s` when either is present (the RFC's "integrated sum of the values over time").

How resolved records become events:

- The device id comes from the topic. A resolved name is `<field>`, or `<device id>:<field>` or
  `<device id>/<field>`: the part after the last `:` or `/` is the field, and what comes before it must
  be exactly the topic's device id. Any other prefix (`dev-b:temp`, `urn:dev:mac:0024befffe804ff1:temp`
  on another device's topic) names another device and rejects the whole pack (identity rule I6).
- A value is stored as field `<field>`; a sum as field `<field>_sum`.
- Records with the same resolved time become one event. The field `seq` carries the event's sequence
  number (a non-negative integer `v`), as `seq` does in the JSON form; `ts`, `device` and `device_id`
  are reserved and rejected as names.
- Units (`u`, `bu`) and update times (`ut`) are checked (text; a non-negative number) but not stored: a
  device type declares its fields' units in the registry.
- `vd` (base64 data) is rejected: tidegate stores numbers, bools and text, and a base64 string stored
  as text could not be told apart from a `vs`.
- Labels tidegate does not know are ignored, as RFC 8428 section 4.4 requires, except those ending in
  `_` ("must understand"), which reject the pack. A `bver` above 10 rejects the pack, and so does a
  record whose version differs from the rest.
- A record with base fields only (e.g. `{"bn": "gh-1:"}` first) is allowed and carries no reading.

Every rejection is a `PayloadError` naming the record as `[index]`, with the same size, batch (records
per pack), field and string limits and the same numeric rules (no NaN, no infinity, integers within
int64) as the JSON form. The module is pure: it reads no clock (`received_at` is passed in).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from devices.errors import PayloadError
from devices.event import FieldValue, TelemetryEvent
from devices.payload import (
    FIELD_NAME_RE,
    IDENTITY_KEYS,
    INT64_MAX,
    INT64_MIN,
    MAX_FUTURE_SKEW,
    MIN_TS,
    identity_error,
    load_json,
)

SENML_VERSION = 10  # RFC 8428; a pack may say an older one (5.1.2 uses 5), never a newer one
RELATIVE_TIME_LIMIT = 2**28  # resolved times below this are seconds relative to "now" (RFC 8428 4.5.3)
MAX_NAME = 256  # a device id (128) + separator + field name (64), with room to spare
SUM_SUFFIX = "_sum"
SEQ_FIELD = "seq"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*\Z")
_BASE_LABELS = frozenset({"bn", "bt", "bu", "bv", "bs", "bver"})
_REGULAR_LABELS = frozenset({"n", "u", "v", "vs", "vb", "vd", "s", "t", "ut"})
_LABELS = _BASE_LABELS | _REGULAR_LABELS
_VALUE_LABELS = ("v", "vs", "vb", "vd")
_RESERVED_NAMES = frozenset({"ts"}) | IDENTITY_KEYS


class _RecordError(Exception):
    """One record is invalid; `SenmlDecoder.decode` adds the record index and the device id."""


@dataclass(slots=True)
class _Reading:
    """The fields and sequence number of all records that share one resolved time."""

    first: int  # index of its first record, for error messages
    fields: dict[str, FieldValue] = field(default_factory=dict)
    seq: int | None = None


@dataclass(slots=True)
class _Base:
    """The base fields in force at the current record."""

    name: str = ""
    time: int | float = 0
    value: int | float | None = None
    sum: int | float | None = None
    version: int = SENML_VERSION
    pack_version: int | None = None  # the first record's version; every record must have it


class SenmlDecoder:
    """Validate SenML JSON packs against size, shape and value limits (see the module docstring).

    Args:
        max_bytes: payloads larger than this are rejected before parsing.
        max_batch: the most records one pack may carry.
        max_fields: the most fields one event (one resolved time) may carry.
        max_string: the longest string value (`vs`) accepted.
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
        """Decode one SenML pack into events, one per resolved time, oldest first; or raise `PayloadError`."""
        pack = load_json(device_id, payload, self.max_bytes)
        if not isinstance(pack, list):
            raise PayloadError(
                f"a SenML pack must be a JSON array of records, got {type(pack).__name__}",
                device_id=device_id,
            )
        if not pack:
            raise PayloadError("empty SenML pack", device_id=device_id)
        if len(pack) > self.max_batch:
            raise PayloadError(
                f"SenML pack of {len(pack)} records exceeds {self.max_batch}", device_id=device_id
            )
        base = _Base()
        readings: dict[float, _Reading] = {}
        for index, record in enumerate(pack):
            try:
                self._record(device_id, index, record, base, readings, received_at)
            except _RecordError as exc:
                raise PayloadError(f"[{index}] {exc}", device_id=device_id) from None
        if not readings:
            raise PayloadError("SenML pack has no record with a value or sum", device_id=device_id)
        events = []
        for ts in sorted(readings):
            reading = readings[ts]
            at = f"[{reading.first}] "
            if not reading.fields:
                raise PayloadError(f"{at}no metric fields at time {ts!r}, only seq", device_id=device_id)
            if len(reading.fields) > self.max_fields:
                raise PayloadError(
                    f"{at}{len(reading.fields)} fields at time {ts!r} exceed {self.max_fields}",
                    device_id=device_id,
                )
            events.append(TelemetryEvent(device_id=device_id, ts=ts, fields=reading.fields, seq=reading.seq))
        return events

    def _record(
        self,
        device_id: str,
        index: int,
        record: object,
        base: _Base,
        readings: dict[float, _Reading],
        received_at: float,
    ) -> None:
        if not isinstance(record, dict):
            raise _RecordError(f"SenML records must be JSON objects, got {type(record).__name__}")
        for label in record.keys() - _LABELS:
            if label.endswith("_"):
                raise _RecordError(
                    f"label {label[:40]!r} must be understood (it ends in '_') and tidegate does not know it"
                )
        _apply_base(record, base)
        if not record.keys() & _REGULAR_LABELS:
            if record.keys() & _BASE_LABELS:
                return  # base fields only: they apply to the records that follow
            raise _RecordError("record has no SenML fields")
        values = [label for label in _VALUE_LABELS if label in record]
        has_sum = "s" in record or base.sum is not None
        if len(values) > 1:
            raise _RecordError(f"record has more than one value ({', '.join(values)}); RFC 8428 allows one")
        if not values and not has_sum:
            raise _RecordError("record has no value (v, vs, vb) or sum (s)")

        name = _field_name(device_id, base.name + _text(record, "n", MAX_NAME))
        if "u" in record:
            _text(record, "u", MAX_NAME)
        if "ut" in record and _number(record, "ut") < 0:
            raise _RecordError(f"ut must not be negative, got {record['ut']!r}")

        ts: float = _add(base.time, _number(record, "t") if "t" in record else 0)
        if ts < RELATIVE_TIME_LIMIT:
            ts = received_at + ts
        ts = float(ts)
        if not MIN_TS <= ts <= received_at + MAX_FUTURE_SKEW:
            raise _RecordError(f"time {ts!r} (bt + t) is outside the accepted time window")

        reading = readings.get(ts)
        if reading is None:
            reading = readings[ts] = _Reading(first=index)
        if name == SEQ_FIELD:
            seq = _add(base.value, _number(record, "v")) if "v" in record else None
            if values != ["v"] or has_sum or type(seq) is not int or seq < 0:
                raise _RecordError(
                    "a record named 'seq' must carry the sequence number as a non-negative integer v"
                )
            if reading.seq is not None:
                raise _RecordError(f"seq appears twice at time {ts!r}")
            reading.seq = seq
            return
        if values:
            _put(reading, name, self._value(values[0], record, base), ts)
        if has_sum:
            total = _add(base.sum, _number(record, "s") if "s" in record else 0)
            sum_name = name + SUM_SUFFIX
            if FIELD_NAME_RE.match(sum_name) is None:
                raise _RecordError(f"sum field name {sum_name[:80]!r} is too long (at most 64 characters)")
            _put(reading, sum_name, _checked(total, "s"), ts)

    def _value(self, label: str, record: dict[str, Any], base: _Base) -> FieldValue:
        if label == "v":
            return _checked(_add(base.value, _number(record, "v")), "v")
        if label == "vs":
            return _text(record, "vs", self.max_string)
        if label == "vb":
            raw = record["vb"]
            if type(raw) is not bool:
                raise _RecordError(f"vb must be true or false, got {_show(raw)}")
            return raw
        raise _RecordError("vd (data value) is not supported; send text as vs")


def _apply_base(record: dict[str, Any], base: _Base) -> None:
    if "bver" in record:
        version = record["bver"]
        if type(version) is not int or version < 1:
            raise _RecordError(f"bver must be a positive integer, got {_show(version)}")
        if version > SENML_VERSION:
            raise _RecordError(f"SenML version {version} is newer than {SENML_VERSION}, which tidegate reads")
        base.version = version
    if base.pack_version is None:
        base.pack_version = base.version
    elif base.version != base.pack_version:
        raise _RecordError(
            f"record has SenML version {base.version} but the pack began with {base.pack_version};"
            " all records of a pack must have the same version"
        )
    if "bn" in record:
        base.name = _text(record, "bn", MAX_NAME)
    if "bt" in record:
        base.time = _number(record, "bt")
    if "bu" in record:
        _text(record, "bu", MAX_NAME)
    if "bv" in record:
        base.value = _number(record, "bv")
    if "bs" in record:
        base.sum = _number(record, "bs")


def _field_name(device_id: str, name: str) -> str:
    """Map a resolved SenML name to a field name, enforcing that any device part is the topic's."""
    if not name:
        raise _RecordError("record has no name (n, or bn from this or an earlier record)")
    if len(name) > MAX_NAME or _NAME_RE.match(name) is None:
        raise _RecordError(
            f"SenML name {name[:80]!r} is not allowed (A-Z a-z 0-9 - : . / _, starting with a letter or digit)"
        )
    cut = max(name.rfind(":"), name.rfind("/"))
    if cut >= 0:
        if name == device_id:
            raise _RecordError(
                f"SenML name {name!r} is the device itself; add the field: '{name}:temperature'"
            )
        if name[:cut] != device_id:
            part = name[cut + 1 :] or "<field>"
            reason = identity_error(device_id, name[:cut], f"SenML name {name[:80]!r}").reason
            raise _RecordError(f"{reason} (expected {part!r}, '{device_id}:{part}' or '{device_id}/{part}')")
    field_name = name[cut + 1 :]
    if not field_name:
        raise _RecordError(f"SenML name {name!r} has no field after the device id")
    if FIELD_NAME_RE.match(field_name) is None:
        raise _RecordError(f"field name {field_name[:80]!r} (from SenML name {name[:80]!r}) is not allowed")
    if field_name in _RESERVED_NAMES:
        raise _RecordError(
            f"{field_name!r} is a reserved name: time goes in t or bt, the topic names the device"
        )
    return field_name


def _put(reading: _Reading, name: str, value: FieldValue, ts: float) -> None:
    if name in reading.fields:
        raise _RecordError(
            f"field {name!r} appears twice at time {ts!r} (tidegate tells readings apart by name, not by unit)"
        )
    reading.fields[name] = value


def _text(record: dict[str, Any], label: str, limit: int) -> str:
    value = record.get(label, "")
    if not isinstance(value, str):
        raise _RecordError(f"{label} must be a string, got {_show(value)}")
    if len(value) > limit:
        raise _RecordError(f"{label}: string longer than {limit}")
    return value


def _number(record: dict[str, Any], label: str) -> int | float:
    value = record[label]
    if type(value) is not int and type(value) is not float:  # bool is an int subclass: not a number here
        raise _RecordError(f"{label} must be a number, got {_show(value)}")
    number: int | float = value
    return number


def _add(base: int | float | None, value: int | float) -> int | float:
    return value if base is None else base + value


def _checked(value: int | float, label: str) -> int | float:
    """Reject what adding a base value can produce: an integer beyond int64, or an overflow to infinity."""
    if type(value) is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise _RecordError(f"{label} plus its base value is {value}, outside int64")
    elif not math.isfinite(value):
        raise _RecordError(f"{label} plus its base value overflows a double")
    return value


def _show(value: object) -> str:
    return f"{type(value).__name__} {repr(value)[:40]}"
