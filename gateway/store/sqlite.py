"""SQLite store: the embedded local store used when no InfluxDB is configured.

One row per (point, field) keeps every point readable with plain SQL:

    points(measurement, ts_us, tags_json, device, field, kind, num, str)

`tags_json` (the tags as canonical JSON) is the series identity, and the primary key
(measurement, ts_us, tags_json, field) makes rewriting a point idempotent, as in InfluxDB. `device`
repeats the "device" tag for the (measurement, device, field, ts_us) index that queries use. `num` has
no declared type so SQLite keeps integers exact and floats as floats; `kind` says which Python type
to give back.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from devices.event import FieldValue
from gateway.store.base import Point, Query, RetryableStoreError, Row
from gateway.store.lineprotocol import encode_lines, rejected_points_error
from gateway.store.memory import check_query, finish_rows, select_fields, to_us

__all__ = ["SqliteStore"]

_T = TypeVar("_T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS points (
    measurement TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    tags_json TEXT NOT NULL,
    device TEXT NOT NULL,
    field TEXT NOT NULL,
    kind TEXT NOT NULL,
    num,
    str TEXT,
    PRIMARY KEY (measurement, ts_us, tags_json, field)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS points_by_device ON points (measurement, device, field, ts_us);
"""

_NUMERIC: Final = "kind IN ('int', 'float')"
_AGGREGATE_SQL: Final = {
    "mean": f"avg(CASE WHEN {_NUMERIC} THEN num END)",
    "sum": f"sum(CASE WHEN {_NUMERIC} THEN num END)",
    "min": f"min(CASE WHEN {_NUMERIC} THEN num END)",
    "max": f"max(CASE WHEN {_NUMERIC} THEN num END)",
    "count": "count(*)",
}


def _column_values(value: FieldValue) -> tuple[str, int | float | None, str | None]:
    kind = type(value)
    if kind is bool:
        return "bool", int(value), None
    if kind is str:
        return "str", None, str(value)
    if kind is int:
        return "int", int(value), None
    return "float", float(value), None


def _field_value(kind: str, num: Any, text: str | None) -> FieldValue | None:
    if kind == "str":
        return text
    if kind == "bool":
        return bool(num)
    if num is None:
        return None
    return float(num) if kind == "float" else int(num)


class SqliteStore:
    """Store points in a local SQLite file (WAL mode), from a dedicated worker thread.

    The connection lives on one worker thread (a single-thread executor rather than
    `asyncio.to_thread`'s shared pool): sqlite3 connections must stay on the thread that made them,
    and one thread also serialises writes and reads without a lock.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidegate-sqlite")
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    async def write(self, points: Sequence[Point]) -> None:
        """Insert or replace the points; refuse those InfluxDB could not take either."""
        batch = encode_lines(points)
        rows = []
        for point in batch.points:
            tags = {key: value for key, value in sorted(point.tags) if value}
            tags_json = json.dumps(tags, ensure_ascii=False, separators=(",", ":"))
            device = tags.get("device", "")
            ts_us = to_us(point.ts)
            for name, value in point.fields.items():
                rows.append((point.measurement, ts_us, tags_json, device, name, *_column_values(value)))
        if rows:
            await self._run(self._write_rows, rows)
        if batch.rejected:
            raise rejected_points_error(batch.rejected, len(points))

    async def query(self, query: Query) -> list[Row]:
        """Read points back, aggregating per device and bucket in SQL when asked."""
        every_us = check_query(query)
        if every_us is None or query.aggregate is None:
            return await self._run(self._select_points, query)
        return await self._run(self._select_buckets, query, every_us)

    async def close(self) -> None:
        """Close the connection and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_connection)
        self._executor.shutdown(wait=True)  # the worker is idle by now, so this returns at once

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run `function` on the worker thread, mapping sqlite3 errors to tidegate's in one place."""
        if self._closed:
            raise RuntimeError("SqliteStore is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function, *args)
        except sqlite3.Error as exc:
            # Locked, full or unreadable database: the batch itself is fine, so it can be retried.
            raise RetryableStoreError(f"SQLite store {self._path}: {type(exc).__name__}: {exc}") from exc

    # --- on the worker thread ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self._path)
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a written batch is acknowledged to the devices' broker, so it must survive a
            # power loss too, not only a crash of the process (NORMAL's guarantee in WAL mode).
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
            self._connection = connection
        return self._connection

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _write_rows(self, rows: list[tuple[object, ...]]) -> None:
        connection = self._connect()
        with connection:
            connection.executemany("INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    @staticmethod
    def _where(query: Query) -> tuple[str, dict[str, object]]:
        clauses = ["measurement = :measurement"]
        params: dict[str, object] = {"measurement": query.measurement}
        if query.device_id is not None:
            clauses.append("device = :device")
            params["device"] = query.device_id
        if query.start is not None:
            clauses.append("ts_us >= :start")
            params["start"] = to_us(query.start)
        if query.end is not None:
            clauses.append("ts_us < :end")
            params["end"] = to_us(query.end)
        if query.fields:
            names = [f":field{i}" for i in range(len(query.fields))]
            clauses.append(f"field IN ({', '.join(names)})")
            params.update(zip((name[1:] for name in names), query.fields, strict=True))
        return " AND ".join(clauses), params

    def _select_points(self, query: Query) -> list[Row]:
        if query.limit == 0:
            return []
        where, params = self._where(query)
        sql = (
            f"SELECT ts_us, tags_json, field, kind, num, str FROM points WHERE {where} "
            "ORDER BY ts_us, tags_json"
        )
        groups: list[tuple[int, str, dict[str, FieldValue | None]]] = []
        cursor = self._connect().execute(sql, params)
        for ts_us, tags_json, name, kind, num, text in cursor:
            if not groups or groups[-1][0] != ts_us or groups[-1][1] != tags_json:
                # Past the limit, read on only while the time is the same, so that ties are broken
                # by tags (in finish_rows) exactly as in the other stores.
                if len(groups) >= query.limit and ts_us != groups[-1][0]:
                    break
                groups.append((ts_us, tags_json, {}))
            groups[-1][2][name] = _field_value(kind, num, text)
        cursor.close()
        rows = []
        for ts_us, tags_json, values in groups:
            picked = select_fields(values, query.fields)
            if picked is not None:
                rows.append(Row(ts_us / 1_000_000, json.loads(tags_json), picked))
        return finish_rows(rows, query.limit)

    def _select_buckets(self, query: Query, every_us: int) -> list[Row]:
        where, params = self._where(query)
        params["every"] = every_us
        # Floor, not truncation, so buckets before 1970 are aligned like the other stores'.
        bucket = "ts_us - ((ts_us % :every) + :every) % :every"
        connection = self._connect()
        results: list[tuple[str, int, str, FieldValue | None]]
        if query.aggregate in ("first", "last"):
            pick = "min" if query.aggregate == "first" else "max"
            # SQLite takes bare columns from the row where the query's single min()/max() is found.
            sql = (
                f"SELECT device, {bucket} AS bucket, field, kind, num, str, {pick}(ts_us) FROM points "
                f"WHERE {where} GROUP BY device, bucket, field"
            )
            results = [
                (device, start, name, _field_value(kind, num, text))
                for device, start, name, kind, num, text, _ in connection.execute(sql, params)
            ]
        else:
            aggregate = _AGGREGATE_SQL[str(query.aggregate)]
            sql = (
                f"SELECT device, {bucket} AS bucket, field, {aggregate} FROM points "
                f"WHERE {where} GROUP BY device, bucket, field"
            )
            results = connection.execute(sql, params).fetchall()
        grouped: dict[tuple[str, int], dict[str, FieldValue | None]] = {}
        for device, start, name, value in results:
            grouped.setdefault((device, start), {})[name] = value
        rows = []
        for (device, start), values in grouped.items():
            picked = select_fields(values, query.fields)
            if picked is not None:
                rows.append(Row(start / 1_000_000, {"device": device} if device else {}, picked))
        return finish_rows(rows, query.limit)
