"""InfluxDB 2.x store (influxdb-client): line protocol writes and Flux queries, each in a thread.

VictoriaMetrics accepts this write path (`/api/v2/write`) but cannot run Flux, so against it only
`write` works; it also keeps millisecond timestamps and stores numbers only (see the integration
tests).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

import urllib3.exceptions
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from devices.event import FieldValue
from gateway.store.base import Point, Query, RetryableStoreError, Row, StoreError
from gateway.store.lineprotocol import encode_lines, rejected_points_error, write_isolating
from gateway.store.memory import check_query, finish_rows, select_fields, to_us

__all__ = ["InfluxV2Store", "flux_query", "flux_string"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_MESSAGE_MAX: Final = 500
# The client declares its precision constants as plain strings but annotates parameters with the class.
_PRECISION_US: Final = cast(WritePrecision, WritePrecision.US)
# The time range Flux can represent (int64 nanoseconds); used when the query leaves an end open.
_FLUX_MIN_TIME: Final = "time(v: -9223372036854775806)"
_FLUX_MAX_TIME: Final = "time(v: 9223372036854775806)"
_FLUX_ESCAPES: Final = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def flux_string(value: str) -> str:
    """Quote a Flux string literal (escaping `${`, which would otherwise interpolate)."""
    return '"' + value.translate(_FLUX_ESCAPES).replace("${", "\\${") + '"'


def _flux_time(seconds: float) -> str:
    return f"time(v: {to_us(seconds) * 1000})"


def flux_query(bucket: str, query: Query) -> str:
    """Build the Flux for `query` against `bucket` (the query semantics are in gateway.store.memory)."""
    every_us = check_query(query)
    start = _FLUX_MIN_TIME if query.start is None else _flux_time(query.start)
    stop = _FLUX_MAX_TIME if query.end is None else _flux_time(query.end)
    lines = [
        f"from(bucket: {flux_string(bucket)})",
        f"  |> range(start: {start}, stop: {stop})",
        f"  |> filter(fn: (r) => r._measurement == {flux_string(query.measurement)})",
    ]
    if query.device_id is not None:
        lines.append(f'  |> filter(fn: (r) => r["device"] == {flux_string(query.device_id)})')
    if query.fields:
        wanted = " or ".join(f"r._field == {flux_string(name)}" for name in query.fields)
        lines.append(f"  |> filter(fn: (r) => {wanted})")
    if every_us is not None:
        if query.aggregate in ("mean", "sum", "min", "max"):
            # InfluxDB's mean/sum/min/max take numbers only, as the other stores do.
            lines.append(
                '  |> filter(fn: (r) => types.isType(v: r._value, type: "float") or '
                'types.isType(v: r._value, type: "int"))'
            )
        lines.append('  |> group(columns: ["_measurement", "device", "_field"])')
        lines.append(
            f"  |> aggregateWindow(every: {every_us}us, fn: {query.aggregate}, createEmpty: false, "
            'timeSrc: "_start")'
        )
    # limit per table before pivoting: each table is one series and field, so the first `limit` rows
    # overall are among them; they are merged and cut in Python.
    lines.append(f"  |> limit(n: {query.limit})")
    lines.append('  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")')
    text = "\n".join(lines)
    if every_us is not None and query.aggregate in ("mean", "sum", "min", "max"):
        text = 'import "types"\n\n' + text
    return text


class InfluxV2Store:
    """Write to and query an InfluxDB 2.x bucket through the synchronous influxdb-client, in a thread.

    Failures map as in InfluxV1Store: 400 → RejectedPointsError with only the refused points, 413 →
    split and retry, 404 (bucket or org not found), 401/403, 429, 5xx and urllib3 errors →
    RetryableStoreError. The token never appears in messages.
    """

    def __init__(self, url: str, token: SecretStr, org: str, bucket: str, timeout: float = 10.0) -> None:
        """Create the store; no connection is made until the first write or query.

        Args:
            url: base URL, e.g. "http://127.0.0.1:8086".
            token: API token with write (and read, for queries) access to the bucket.
            org: organisation name or id.
            bucket: bucket name.
            timeout: seconds for each HTTP request.
        """
        self._url = url
        self._org = org
        self._bucket = bucket
        self._timeout = timeout
        # retries=False: the BatchWriter retries whole batches itself, with backoff and in order.
        self._client = InfluxDBClient(
            url=url, token=token.get_secret_value(), org=org, timeout=int(timeout * 1000), retries=False
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._query_api = self._client.query_api()
        self._closed = False

    def __repr__(self) -> str:
        return f"InfluxV2Store({self._url!r}, org={self._org!r}, bucket={self._bucket!r})"

    async def __aenter__(self) -> InfluxV2Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client's connection pool."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._client.close)
        # The write and query APIs keep the client's ApiClient alive, and its __del__ would run once
        # more at interpreter exit, when the modules it needs are gone ("Exception ignored ...").
        del self._write_api, self._query_api

    async def write(self, points: Sequence[Point]) -> None:
        """Write a batch; refused points raise RejectedPointsError after the others are written."""
        if not points:
            return
        batch = encode_lines(points)
        rejected = batch.rejected + await write_isolating(self._send_write, batch.points, batch.lines)
        if rejected:
            raise rejected_points_error(rejected, len(points))

    async def query(self, query: Query) -> list[Row]:
        """Run `query` as Flux and return rows with epoch-second times (not on VictoriaMetrics)."""
        if query.limit == 0:
            check_query(query)
            return []
        flux = flux_query(self._bucket, query)
        tables = await self._call(lambda: self._query_api.query(flux, org=self._org), "query")
        rows = []
        for table in tables:
            group_key = {column.label for column in table.columns if column.group}
            for record in table.records:
                tags: dict[str, str] = {}
                values: dict[str, FieldValue | None] = {}
                for name, value in record.values.items():
                    if name.startswith("_") or name in ("result", "table"):
                        continue
                    if name in group_key:
                        if value:
                            tags[name] = str(value)
                    else:
                        values[name] = value
                picked = select_fields(values, query.fields)
                if picked is not None:
                    rows.append(Row(_epoch_seconds(record.values["_time"]), tags, picked))
        return finish_rows(rows, query.limit)

    async def _send_write(self, body: bytes) -> tuple[int, str]:
        def write() -> None:
            self._write_api.write(
                bucket=self._bucket, org=self._org, record=body, write_precision=_PRECISION_US
            )

        try:
            await self._call(write, "write")
        except _Refused as refused:
            return refused.status, refused.message
        return 204, ""

    async def _call(self, function: Callable[[], _T], action: str) -> _T:
        """Run a blocking client call in a thread, mapping its exceptions to tidegate's in one place."""
        if self._closed:
            raise RuntimeError("InfluxV2Store is closed")
        where = f"InfluxDB at {self._url}"
        try:
            return await asyncio.to_thread(function)
        except ApiException as exc:
            status = int(exc.status or 0)
            message = _api_message(exc)
            if action == "write" and status in (400, 413):
                raise _Refused(status, message) from exc
            if status == 404:
                text = f"{where}: bucket {self._bucket!r} or org {self._org!r} not found ({message})"
            elif status in (401, 403):
                text = f"{where}: {action} not authorised (HTTP {status}: {message}); check the token"
            elif status == 429:
                text = f"{where}: {action} rate limited (HTTP 429: {message})"
            elif status == 400:
                raise StoreError(f"{where}: {action} refused (HTTP 400: {message})") from exc
            else:
                text = f"{where}: {action} failed with HTTP {status}: {message}"
            raise RetryableStoreError(f"{text}; will be retried", status=status) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # Connection refused or reset, timeouts (urllib3 wraps socket errors; OSError catches
            # the ones it lets through).
            raise RetryableStoreError(f"{where}: {action} failed: {type(exc).__name__}: {exc}") from exc


class _Refused(Exception):
    """A write answered 400 or 413; carried out of `_call` to the line-isolating writer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _api_message(exc: ApiException) -> str:
    message = getattr(exc, "message", None) or exc.reason or ""
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    text = str(message).strip()
    return text if len(text) <= _MESSAGE_MAX else text[: _MESSAGE_MAX - 3] + "..."


def _epoch_seconds(value: Any) -> float:
    if isinstance(value, dt.datetime):
        delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        return (delta // dt.timedelta(microseconds=1)) / 1_000_000
    return float(value)
