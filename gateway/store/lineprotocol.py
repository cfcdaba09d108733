"""Encode Points as InfluxDB line protocol, refusing what cannot be written safely.

    ValueError
     └── LineProtocolError        a point cannot be written unchanged; `reason` says why

Encoding is hand-written because it is the hot path: on the machine this was measured on,
`influxdb_client.Point.to_line_protocol` took 4.7 µs for a point with one tag and one float field and
6.3 µs with three fields; `encode_point` 1.0 and 1.5 µs (series keys and field keys are cached, see
`_remember`; what remains is mostly float repr and int formatting).
Timestamps are integer microseconds (`precision=u` / `WritePrecision.US`).

What is refused, and why (each checked against influxd 1.6 and VictoriaMetrics):
- a line break anywhere: a newline in a tag value injects a second point;
- NaN, ±inf and integers outside int64: the server refuses the whole batch;
- an empty measurement, tag key or field key, a point without fields, duplicate tag keys;
- "time" as a tag key or field key: InfluxDB 1.x drops the point;
- a measurement starting with "#" (the line becomes a comment, silently skipped), or a measurement
  or field key starting with a tab (stripped as leading whitespace, so the name changes);
- NUL in a name: InfluxQL has no way to quote it, so the point could not be queried;
- a double quote in a field key: VictoriaMetrics reads the value after it as 0;
- in names (measurement, tag keys and values, field keys), a backslash at the end or before one of
  `\\ , = space "`: InfluxDB 1.x keeps backslashes in names literally and has no way to write a
  trailing one (it always escapes the separator that follows), while VictoriaMetrics reads `\\\\`
  as one backslash, so no encoding of these reads back unchanged on both. A backslash before any
  other character is kept as is by both;
- a series key longer than InfluxDB's 65535-byte limit;
- text that is not valid UTF-8 (lone surrogates).
Tags with an empty value are left out: InfluxDB refuses empty tag values, and a missing tag reads
back as an empty one.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from gateway.store.base import Point, RejectedPointsError

__all__ = [
    "EncodedBatch",
    "LineProtocolError",
    "encode_batch",
    "encode_lines",
    "encode_point",
    "rejected_points_error",
    "write_isolating",
]

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# InfluxDB stores nanoseconds in an int64 and refuses the two extreme values.
_TS_US_MIN: Final = -9_223_372_036_854_775
_TS_US_MAX: Final = 9_223_372_036_854_775
# InfluxDB 1.x: len(series key) + len("#!~#") + len(field key) must not exceed 65535 bytes.
_MAX_KEY_BYTES: Final = 65535 - 4
_CACHE_MAX: Final = 20_000
_K = TypeVar("_K")
_V = TypeVar("_V")

_MEASUREMENT_ESCAPES: Final = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES: Final = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_STRING_ESCAPES: Final = str.maketrans({'"': '\\"', "\\": "\\\\"})
_BAD_BACKSLASH: Final = re.compile(r'\\(?:[\\,= "]|\Z)')


class LineProtocolError(ValueError):
    """A point cannot be written to line protocol unchanged.

    Attributes:
        reason: what is wrong, naming the offending name or value.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _show(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        # repr of a huge int is slow, and refused past 4300 digits.
        return f"<{value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_text(text: str, what: str) -> None:
    if "\n" in text or "\r" in text:
        raise LineProtocolError(f"{what} {_show(text)} contains a line break")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise LineProtocolError(f"{what} {_show(text)} is not valid UTF-8") from None


def _escape_name(name: object, escapes: dict[int, str], what: str) -> str:
    if not isinstance(name, str):
        raise LineProtocolError(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise LineProtocolError(f"empty {what}")
    _check_text(name, what)
    if "\0" in name:
        raise LineProtocolError(f"{what} {_show(name)} contains NUL, which InfluxQL cannot quote")
    if "\\" in name and _BAD_BACKSLASH.search(name):
        raise LineProtocolError(
            f'{what} {_show(name)} has a backslash at its end or before one of \\ , = space ", '
            "which InfluxDB cannot store unchanged"
        )
    return name.translate(escapes)


def _byte_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _encode_series(measurement: str, tags: tuple[tuple[str, str], ...]) -> tuple[str, int]:
    escaped = _escape_name(measurement, _MEASUREMENT_ESCAPES, "measurement")
    if measurement[0] in "#\t":
        raise LineProtocolError(
            f"measurement {_show(measurement)} starts with {measurement[0]!r}, which the line parser skips"
        )
    parts = [escaped]
    if tags:
        pairs = []
        for pair in tags:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise LineProtocolError(f"tag {_show(pair)} is not a (key, value) pair")
            key, value = pair
            if not isinstance(key, str):
                raise LineProtocolError(f"tag key must be a string, not {type(key).__name__}")
            if not isinstance(value, str):
                raise LineProtocolError(f"tag {key!r} value must be a string, not {type(value).__name__}")
            if value:
                pairs.append((key, value))
        pairs.sort()
        previous = None
        for key, value in pairs:
            if key == previous:
                raise LineProtocolError(f"tag key {_show(key)} appears twice")
            if key == "time":
                raise LineProtocolError('"time" cannot be a tag key')
            previous = key
            parts.append(
                _escape_name(key, _KEY_ESCAPES, "tag key")
                + "="
                + _escape_name(value, _KEY_ESCAPES, "tag value")
            )
    series = ",".join(parts)
    return series, _byte_len(series)


def _encode_field_key(key: object) -> tuple[str, int]:
    if key == "time":
        raise LineProtocolError('"time" cannot be a field key')
    escaped = _escape_name(key, _KEY_ESCAPES, "field key")
    if '"' in escaped:
        raise LineProtocolError(
            f"field key {_show(key)} contains a double quote, which VictoriaMetrics misreads"
        )
    if escaped[0] == "\t":
        raise LineProtocolError(
            f"field key {_show(key)} starts with {escaped[0]!r}, which the line parser skips"
        )
    return escaped, _byte_len(escaped)


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    # A bounded cache of escaped names: device ids, measurements and field names repeat on almost
    # every message, and a dict hit is several times cheaper than validating and escaping again.
    # Clearing when full keeps it bounded without the bookkeeping of an LRU.
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value


_series_cache: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, int]] = {}
_field_key_cache: dict[str, tuple[str, int]] = {}


def _encode_value(key: str, value: object) -> str:
    """Format a field value whose type is not exactly float, int, bool or str (subclasses, wrong types)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _encode_int(key, int(value))
    if isinstance(value, float):
        return _encode_float(key, float(value))
    if isinstance(value, str):
        return _encode_string(key, str(value))
    raise LineProtocolError(f"field {key!r} has unsupported type {type(value).__name__}")


def _encode_int(key: str, value: int) -> str:
    if _INT64_MIN <= value <= _INT64_MAX:
        return f"{value}i"
    raise LineProtocolError(f"field {key!r} integer {_show(value)} is outside int64")


def _encode_float(key: str, value: float) -> str:
    if value - value == 0.0:
        return repr(value)
    raise LineProtocolError(f"field {key!r} value {value!r} is not a finite number")


def _encode_string(key: str, value: str) -> str:
    _check_text(value, f"field {key!r} string")
    if '"' in value or "\\" in value:
        value = value.translate(_STRING_ESCAPES)
    return f'"{value}"'


def encode_point(point: Point) -> str:
    """Encode one point as a line of line protocol, without the trailing newline.

    Raises:
        LineProtocolError: the point cannot be written unchanged; `reason` says why.
    """
    cache_key = (point.measurement, point.tags)
    try:
        series, series_bytes = _series_cache[cache_key]
    except KeyError:
        series, series_bytes = _encode_series(point.measurement, point.tags)
        _remember(_series_cache, cache_key, (series, series_bytes))
    except TypeError:
        raise LineProtocolError("tags must be a tuple of (key, value) string pairs") from None
    # Any: the exact type checks below narrow by hand; isinstance would also accept subclasses such
    # as numpy.float64, whose repr is not a line protocol number (those go to _encode_value).
    fields: Mapping[str, Any] = point.fields
    if not fields:
        raise LineProtocolError("point has no fields")
    encoded = []
    for key, value in fields.items():
        try:
            escaped_key, key_bytes = _field_key_cache[key]
        except KeyError:
            escaped_key, key_bytes = _encode_field_key(key)
            _remember(_field_key_cache, key, (escaped_key, key_bytes))
        if series_bytes + key_bytes > _MAX_KEY_BYTES:
            raise LineProtocolError(f"series key with field {_show(key)} exceeds InfluxDB's 65535 bytes")
        kind = type(value)
        if kind is float:
            if value - value == 0.0:  # false for NaN and ±inf, in one operation
                encoded.append(f"{escaped_key}={value!r}")
            else:
                encoded.append(escaped_key + "=" + _encode_float(key, value))
        elif kind is int:
            if _INT64_MIN <= value <= _INT64_MAX:
                encoded.append(f"{escaped_key}={value}i")
            else:
                encoded.append(escaped_key + "=" + _encode_int(key, value))
        elif kind is str:
            encoded.append(escaped_key + "=" + _encode_string(key, value))
        elif kind is bool:
            encoded.append(escaped_key + ("=true" if value else "=false"))
        else:
            encoded.append(escaped_key + "=" + _encode_value(key, value))
    ts = point.ts
    try:
        ts_us = round(ts * 1_000_000)
    except (OverflowError, ValueError, TypeError):
        raise LineProtocolError(f"timestamp {_show(ts)} is not a finite number") from None
    if not _TS_US_MIN <= ts_us <= _TS_US_MAX:
        raise LineProtocolError(f"timestamp {_show(ts)} is outside the years 1677-2262")
    return f"{series} {','.join(encoded)} {ts_us}"


@dataclass(slots=True)
class EncodedBatch:
    """Points encoded one line each, and the points that could not be encoded.

    Attributes:
        points: the encodable points, in input order.
        lines: `lines[i]` encodes `points[i]`.
        rejected: (point, reason) for each point that cannot be written.
    """

    points: list[Point] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    rejected: list[tuple[Point, str]] = field(default_factory=list)

    def body(self) -> bytes:
        """Return the request body: the lines joined by newlines, UTF-8 encoded."""
        return "\n".join(self.lines).encode()


def encode_lines(points: Iterable[Point]) -> EncodedBatch:
    """Encode each point, keeping the ones that cannot be written aside with their reason."""
    batch = EncodedBatch()
    for point in points:
        try:
            line = encode_point(point)
        except LineProtocolError as err:
            batch.rejected.append((point, err.reason))
        else:
            batch.points.append(point)
            batch.lines.append(line)
    return batch


def encode_batch(points: Iterable[Point]) -> tuple[bytes, list[tuple[Point, str]]]:
    """Encode points into one request body; return it and the (point, reason) pairs left out."""
    batch = encode_lines(points)
    return batch.body(), batch.rejected


def rejected_points_error(rejected: Sequence[tuple[Point, str]], total: int) -> RejectedPointsError:
    """Build the error for refused (point, reason) pairs, its reason summing up the distinct reasons."""
    reasons: dict[str, int] = {}
    for _, reason in rejected:
        reasons[reason] = reasons.get(reason, 0) + 1
    shown = [f"{reason} (x{count})" if count > 1 else reason for reason, count in list(reasons.items())[:5]]
    more = f"; and {len(reasons) - 5} more reasons" if len(reasons) > 5 else ""
    summary = f"{len(rejected)} of {total} points rejected: " + "; ".join(shown) + more
    return RejectedPointsError(summary, [point for point, _ in rejected])


# --- Writing: isolating the lines a server refuses ----------------------------------------------

Send = Callable[[bytes], Awaitable[tuple[int, str]]]
"""Post one body; return (status, server message) for 2xx, 400 and 413, raise RetryableStoreError
for anything that may succeed later."""

_DROPPED = re.compile(r"dropped=(\d+)\s*$")
_INFLUX_TYPES: Final = {float: "float", int: "integer", str: "string", bool: "boolean"}


def _conflicting(pairs: Sequence[tuple[Point, str]], message: str) -> list[int]:
    """Return the indices of the points a "field type conflict" message names."""
    found = []
    for index, (point, _line) in enumerate(pairs):
        for key, value in point.fields.items():
            kind = _INFLUX_TYPES.get(type(value))
            needle = f'input field "{key}" on measurement "{point.measurement}" is type {kind}'
            if needle in message:
                found.append(index)
                break
    return found


async def write_isolating(
    send: Send, points: Sequence[Point], lines: Sequence[str]
) -> list[tuple[Point, str]]:
    """Write encoded points, isolating the ones the server refuses; return those with the reason.

    InfluxDB answers one status per request, so the refused lines are found from its message where
    it names them (a field type conflict names the field, the measurement and the type; the rest is
    then written again to confirm it), and otherwise by writing each half of the batch again,
    recursively. Writing a point twice is idempotent (same series, time and values), so rewriting
    points the server already stored in a partial write is safe. A 413 splits the batch the same way.
    """
    return await _isolate(send, list(zip(points, lines, strict=True)))


async def _isolate(send: Send, pairs: list[tuple[Point, str]]) -> list[tuple[Point, str]]:
    if not pairs:
        return []
    status, message = await send("\n".join(line for _, line in pairs).encode())
    if 200 <= status < 300:
        return []
    if status == 400 and "partial write" in message and "field type conflict" in message:
        found = _conflicting(pairs, message)
        match = _DROPPED.search(message)
        if found and (match is None or len(found) <= int(match.group(1))):
            # The message names only the first conflict, and InfluxDB 1.x leaves out lines it could
            # not parse when it also has a conflict to report: write the rest again (idempotent) to
            # confirm them or learn what else is wrong.
            taken = set(found)
            rest = [pair for i, pair in enumerate(pairs) if i not in taken]
            return [(pairs[i][0], message) for i in found] + await _isolate(send, rest)
    if len(pairs) == 1:
        if status == 413:
            message = f"larger than the server accepts ({len(pairs[0][1])} characters): {message}"
        return [(pairs[0][0], message)]
    middle = len(pairs) // 2
    return await _isolate(send, pairs[:middle]) + await _isolate(send, pairs[middle:])
