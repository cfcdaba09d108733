"""In-memory stores, and the query semantics every store follows.

`MemoryStore` keeps points in a dict and is the reference for what `Store.query` returns; the
helpers here (`check_query`, `bucket_start_us`, `aggregate_values`, `finish_rows`) are shared by the
other stores so that they agree:

- `measurement` must match; `device_id` matches the tag "device".
- `start` is inclusive, `end` exclusive (seconds; compared at microsecond precision).
- With `fields`, rows carry exactly those fields (None where a point has no value) and points with
  none of them are left out; without, rows carry the fields that have a value.
- `every` and `aggregate` go together. Buckets are aligned to multiples of `every` since the epoch
  (as InfluxDB's GROUP BY time and Flux's aggregateWindow do); a row per device and non-empty bucket,
  with `ts` the bucket start and tags `{"device": ...}`. mean/sum/min/max use int and float values
  only; count counts every value; first/last take the value with the earliest/latest time.
- Rows come sorted by time, then by tags, at most `limit` of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from devices.event import FieldValue
from gateway.store.base import Aggregate, Point, Query, Row
from gateway.store.lineprotocol import encode_lines, rejected_points_error

__all__ = [
    "MemoryStore",
    "NullStore",
    "aggregate_values",
    "bucket_start_us",
    "check_query",
    "finish_rows",
    "select_fields",
    "to_us",
]

_AGGREGATES: Final = frozenset({"mean", "min", "max", "sum", "count", "first", "last"})


def to_us(seconds: float) -> int:
    """Convert epoch seconds to integer microseconds, the precision every store keeps."""
    return round(seconds * 1_000_000)


def check_query(query: Query) -> int | None:
    """Validate a query; return `every` in microseconds for an aggregate query, else None.

    Raises:
        ValueError: `every` without `aggregate` or the reverse, a non-positive `every`, an unknown
            aggregate or a negative limit. These are bugs in the caller, not store failures.
    """
    if (query.every is None) != (query.aggregate is None):
        raise ValueError(
            f"every and aggregate go together, got every={query.every} aggregate={query.aggregate}"
        )
    if query.limit < 0:
        raise ValueError(f"limit must not be negative, got {query.limit}")
    if query.every is None:
        return None
    if query.aggregate not in _AGGREGATES:
        raise ValueError(f"unknown aggregate {query.aggregate!r}, expected one of {sorted(_AGGREGATES)}")
    every_us = to_us(query.every) if math.isfinite(query.every) else 0
    if every_us <= 0:
        raise ValueError(f"every must be at least a microsecond, got {query.every}")
    return every_us


def bucket_start_us(ts_us: int, every_us: int) -> int:
    """Return the start of the epoch-aligned bucket holding `ts_us` (floor, also before 1970)."""
    return ts_us - ts_us % every_us


def aggregate_values(aggregate: Aggregate, values: Sequence[tuple[int, FieldValue]]) -> FieldValue | None:
    """Aggregate (ts_us, value) pairs in time order; None when nothing qualifies."""
    if aggregate == "count":
        return len(values)
    if aggregate == "first":
        return min(values, key=lambda pair: pair[0])[1] if values else None
    if aggregate == "last":
        return max(values, key=lambda pair: pair[0])[1] if values else None
    # Exact types: bool is an int subclass but InfluxDB does not add booleans up.
    numbers: list[int | float] = [value for _, value in values if type(value) is int or type(value) is float]
    if not numbers:
        return None
    if aggregate == "mean":
        return math.fsum(numbers) / len(numbers)
    if aggregate == "sum":
        return sum(numbers) if all(type(n) is int for n in numbers) else math.fsum(numbers)
    if aggregate == "min":
        return min(numbers)
    return max(numbers)


def _row_order(row: Row) -> tuple[float, tuple[tuple[str, str], ...]]:
    return row.ts, tuple(sorted(row.tags.items()))


def finish_rows(rows: Iterable[Row], limit: int) -> list[Row]:
    """Sort rows by time, then tags, and keep the first `limit`."""
    return sorted(rows, key=_row_order)[:limit]


def select_fields(
    values: Mapping[str, FieldValue | None], fields: tuple[str, ...]
) -> dict[str, FieldValue | None] | None:
    """Return the row's fields as the query asks for them, or None when the row has none of them."""
    if fields:
        picked = {name: values.get(name) for name in fields}
        return picked if any(value is not None for value in picked.values()) else None
    present: dict[str, FieldValue | None] = {
        name: value for name, value in values.items() if value is not None
    }
    return present or None


class MemoryStore:
    """Keep points in memory, validated like InfluxDB would; for unit tests and demos.

    Writing the same series and time again merges the fields, as InfluxDB does, so rewrites are
    idempotent. `points` lists what is stored, in first-written order.
    """

    def __init__(self) -> None:
        self._points: dict[tuple[str, tuple[tuple[str, str], ...], int], dict[str, FieldValue]] = {}
        self.writes = 0
        self.closed = False

    @property
    def points(self) -> list[Point]:
        """Return the stored points (fields merged per series and time)."""
        return [
            Point(measurement, tags, dict(fields), ts_us / 1_000_000)
            for (measurement, tags, ts_us), fields in self._points.items()
        ]

    async def write(self, points: Sequence[Point]) -> None:
        """Store points; refuse those line protocol cannot carry, as the real stores do."""
        self.writes += 1
        batch = encode_lines(points)
        for point in batch.points:
            # Same series identity as InfluxDB: empty tag values are not part of it.
            tags = tuple(sorted((key, value) for key, value in point.tags if value))
            key = (point.measurement, tags, to_us(point.ts))
            self._points.setdefault(key, {}).update(point.fields)
        if batch.rejected:
            raise rejected_points_error(batch.rejected, len(points))

    async def query(self, query: Query) -> list[Row]:
        """Read points back following the shared query semantics (see the module docstring)."""
        every_us = check_query(query)
        start = None if query.start is None else to_us(query.start)
        end = None if query.end is None else to_us(query.end)
        selected = []
        for (measurement, tags, ts_us), fields in self._points.items():
            if measurement != query.measurement:
                continue
            if start is not None and ts_us < start:
                continue
            if end is not None and ts_us >= end:
                continue
            tag_map = dict(tags)
            if query.device_id is not None and tag_map.get("device") != query.device_id:
                continue
            selected.append((ts_us, tag_map, fields))
        if every_us is None or query.aggregate is None:
            rows = []
            for ts_us, tag_map, fields in selected:
                picked = select_fields(fields, query.fields)
                if picked is not None:
                    rows.append(Row(ts_us / 1_000_000, tag_map, picked))
            return finish_rows(rows, query.limit)
        groups: dict[tuple[str | None, int], dict[str, list[tuple[int, FieldValue]]]] = {}
        for ts_us, tag_map, fields in selected:
            group = groups.setdefault((tag_map.get("device"), bucket_start_us(ts_us, every_us)), {})
            for name, value in fields.items():
                group.setdefault(name, []).append((ts_us, value))
        rows = []
        for (device, bucket), by_field in groups.items():
            values = {name: aggregate_values(query.aggregate, pairs) for name, pairs in by_field.items()}
            picked = select_fields(values, query.fields)
            if picked is not None:
                rows.append(Row(bucket / 1_000_000, {} if device is None else {"device": device}, picked))
        return finish_rows(rows, query.limit)

    async def close(self) -> None:
        """Mark the store closed; the points stay readable."""
        self.closed = True


class NullStore:
    """Discard every point, counting them; for benchmarks of everything before the store."""

    def __init__(self) -> None:
        self.written = 0
        self.batches = 0

    async def write(self, points: Sequence[Point]) -> None:
        """Count the points and drop them."""
        self.written += len(points)
        self.batches += 1

    async def query(self, query: Query) -> list[Row]:
        """Return nothing: nothing is kept."""
        check_query(query)
        return []

    async def close(self) -> None:
        """Nothing to release."""
