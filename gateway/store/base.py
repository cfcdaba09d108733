"""The store boundary: what every time-series backend (InfluxDB v1/v2, SQLite, memory, null) implements.

StoreError                    a write or query failed
 ├── RetryableStoreError      try the same batch again later (5xx, 429, timeout, reset, store down)
 └── RejectedPointsError      the store refused some points for good (400); `rejected` lists them
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from devices.event import FieldValue

Aggregate = Literal["mean", "min", "max", "sum", "count", "first", "last"]


@dataclass(frozen=True, slots=True)
class Point:
    """One time-series point, the unit every store writes.

    Attributes:
        measurement: e.g. "telemetry", "alerts", "commands".
        tags: indexed string labels (device, rule, ...), sorted by key.
        fields: values; never empty.
        ts: epoch seconds; stores keep microsecond precision.
    """

    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: Mapping[str, FieldValue]
    ts: float


@dataclass(frozen=True, slots=True)
class Row:
    """One row read back by a query: a time, the tags that identify it, and its field values."""

    ts: float
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue | None]


@dataclass(frozen=True, slots=True)
class Query:
    """A simple read: one measurement, optional device and fields, a time range and an optional aggregate.

    With `every` and `aggregate` set, rows are grouped per device into buckets of `every` seconds.
    """

    measurement: str = "telemetry"
    device_id: str | None = None
    fields: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    every: float | None = None
    aggregate: Aggregate | None = None
    limit: int = 1000


class StoreError(Exception):
    """A store operation failed."""


class RetryableStoreError(StoreError):
    """The batch may succeed later unchanged (server down, 5xx, 429, timeout)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RejectedPointsError(StoreError):
    """The store refused points for good; the others in the batch (if any) were written.

    Attributes:
        rejected: the points that were refused.
        reason: the store's own explanation.
    """

    def __init__(self, reason: str, rejected: Sequence[Point]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rejected = list(rejected)


class Store(Protocol):
    """A time-series backend."""

    async def write(self, points: Sequence[Point]) -> None:
        """Write a batch; raise RetryableStoreError or RejectedPointsError on failure."""
        ...

    async def query(self, query: Query) -> list[Row]:
        """Read points back."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...
