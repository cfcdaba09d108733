"""InfluxDB 1.x store: line protocol over HTTP `/write`, InfluxQL over `/query` (httpx)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Final

import httpx
from pydantic import SecretStr

from devices.event import FieldValue
from gateway.store.base import Point, Query, RetryableStoreError, Row, StoreError
from gateway.store.lineprotocol import encode_lines, rejected_points_error, write_isolating
from gateway.store.memory import check_query, finish_rows, select_fields, to_us

__all__ = ["InfluxV1Store", "influxql_identifier", "influxql_string"]

logger = logging.getLogger(__name__)

_MESSAGE_MAX: Final = 500


def influxql_identifier(name: str) -> str:
    """Quote an identifier (measurement, field, tag key, database) for InfluxQL."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def influxql_string(value: str) -> str:
    """Quote a string literal (a tag value) for InfluxQL."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _server_message(response: httpx.Response) -> str:
    """Return InfluxDB's own explanation from an error response, shortened for logs."""
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        text = body["error"]
    text = text.strip() or response.reason_phrase
    return text if len(text) <= _MESSAGE_MAX else text[: _MESSAGE_MAX - 3] + "..."


class InfluxV1Store:
    """Write to and read from an InfluxDB 1.x database (or anything speaking its HTTP API).

    Writes use microsecond precision. Failures map to tidegate's errors: 400 → RejectedPointsError
    naming only the refused points (the rest are written), 413 → the batch is split and retried,
    anything that may pass later (404 database not found, 401/403, 429, 5xx, timeouts, connection
    errors) → RetryableStoreError with `status`. Credentials go in a Basic auth header, never in the
    URL, and never appear in messages.
    """

    def __init__(
        self,
        url: str,
        database: str,
        retention_policy: str | None = None,
        username: str | None = None,
        password: SecretStr | None = None,
        timeout: float = 10.0,
        create_database: bool = False,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Create the store; no connection is made until the first write or query.

        Args:
            url: base URL, e.g. "http://127.0.0.1:8086".
            database: the database to write to and query.
            retention_policy: write to and query this retention policy instead of the default.
            username: user for Basic auth; `password` goes with it.
            password: the user's password.
            timeout: seconds for each HTTP request (connect, read, write).
            create_database: issue `CREATE DATABASE` before the first write or query (and again
                after the database is found missing).
            transport: an httpx transport, for tests (e.g. `httpx.MockTransport`).
        """
        self._database = database
        self._retention_policy = retention_policy
        self._timeout = timeout
        self._create_database = create_database
        self._database_ready = not create_database
        parsed = httpx.URL(url)
        if parsed.userinfo:
            # Credentials in the URL would show in httpx's request log and in error messages: move
            # them to the auth header (explicit username/password win).
            if username is None:
                username = parsed.username
                password = SecretStr(parsed.password)
            parsed = parsed.copy_with(username=None, password=None)
        self._safe_url = str(parsed)
        auth = None
        if username is not None:
            secret = password.get_secret_value() if password is not None else ""
            auth = httpx.BasicAuth(username, secret)
        self._client = httpx.AsyncClient(base_url=parsed, auth=auth, timeout=timeout, transport=transport)
        self._field_types: dict[str, dict[str, str]] = {}

    def __repr__(self) -> str:
        return f"InfluxV1Store({self._safe_url!r}, database={self._database!r})"

    async def __aenter__(self) -> InfluxV1Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    async def write(self, points: Sequence[Point]) -> None:
        """Write a batch; refused points raise RejectedPointsError after the others are written."""
        if not points:
            return
        await self._ensure_database()
        batch = encode_lines(points)
        rejected = batch.rejected + await write_isolating(self._send_write, batch.points, batch.lines)
        if rejected:
            raise rejected_points_error(rejected, len(points))

    async def query(self, query: Query) -> list[Row]:
        """Run `query` as InfluxQL and return rows with epoch-second times."""
        every_us = check_query(query)
        if query.limit == 0:
            return []
        await self._ensure_database()
        series = await self._run(self._influxql(query, every_us))
        prefix = f"{query.aggregate}_"
        renamed = every_us is not None and not query.fields  # mean(*) names its columns mean_<field>
        names_of = [
            [
                column[len(prefix) :] if renamed and column.startswith(prefix) else column
                for column in item["columns"]
            ]
            for item in series
        ]
        field_types = await self._types_of(
            query.measurement, {name for names in names_of for name in names[1:]}
        )
        rows = []
        for item, names in zip(series, names_of, strict=True):
            tags = {key: value for key, value in (item.get("tags") or {}).items() if value}
            for record in item.get("values") or []:
                values: dict[str, FieldValue | None] = {
                    name: self._typed(value, field_types.get(name), query)
                    for name, value in zip(names[1:], record[1:], strict=True)
                }
                picked = select_fields(values, query.fields)
                if picked is not None:
                    rows.append(Row(record[0] / 1_000_000, tags, picked))
        return finish_rows(rows, query.limit)

    # --- writing ---------------------------------------------------------------------------------

    async def _send_write(self, body: bytes) -> tuple[int, str]:
        params = {"db": self._database, "precision": "u"}
        if self._retention_policy is not None:
            params["rp"] = self._retention_policy
        response = await self._request("POST", "/write", params=params, content=body)
        status = response.status_code
        if 200 <= status < 300:
            return status, ""
        if status in (400, 413):
            return status, _server_message(response)
        raise self._status_error(response, "write")

    def _status_error(self, response: httpx.Response, action: str) -> RetryableStoreError:
        status = response.status_code
        message = _server_message(response)
        where = f"InfluxDB at {self._safe_url}"
        if status == 404:
            self._database_ready = not self._create_database
            text = f"{where}: database {self._database!r} not found ({message}); {action} will be retried"
        elif status in (401, 403):
            text = f"{where}: {action} not authorised (HTTP {status}: {message}); check the credentials"
        elif status == 429:
            text = f"{where}: {action} rate limited (HTTP 429: {message})"
        else:
            text = f"{where}: {action} failed with HTTP {status}: {message}"
        return RetryableStoreError(text, status=status)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request, mapping httpx's exceptions to tidegate's in one place."""
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise RetryableStoreError(
                f"InfluxDB at {self._safe_url}: {path} timed out after {self._timeout}s: {type(exc).__name__}"
            ) from exc
        except httpx.HTTPError as exc:
            raise RetryableStoreError(
                f"InfluxDB at {self._safe_url}: {path} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _ensure_database(self) -> None:
        if self._database_ready:
            return
        await self._run(f"CREATE DATABASE {influxql_identifier(self._database)}", with_database=False)
        self._database_ready = True
        logger.info("InfluxDB database %r ready at %s", self._database, self._safe_url)

    # --- querying --------------------------------------------------------------------------------

    def _target(self, measurement: str) -> str:
        quoted = influxql_identifier(measurement)
        if self._retention_policy is None:
            return quoted
        return f"{influxql_identifier(self._database)}.{influxql_identifier(self._retention_policy)}.{quoted}"

    def _influxql(self, query: Query, every_us: int | None) -> str:
        measurement = self._target(query.measurement)
        conditions = []
        if query.start is not None:
            conditions.append(f"time >= {to_us(query.start)}u")
        if query.end is not None:
            conditions.append(f"time < {to_us(query.end)}u")
        if query.device_id is not None:
            conditions.append(f'"device" = {influxql_string(query.device_id)}')
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        # LIMIT applies per series (per device when aggregating); rows are merged and cut to
        # `limit` afterwards, which gives the first `limit` rows overall.
        if every_us is None:
            selected = ", ".join(map(influxql_identifier, query.fields)) or "*"
            return f"SELECT {selected} FROM {measurement}{where} GROUP BY * LIMIT {query.limit}"
        function = query.aggregate
        if query.fields:
            selected = ", ".join(
                f"{function}({influxql_identifier(name)}) AS {influxql_identifier(name)}"
                for name in query.fields
            )
        else:
            selected = f"{function}(*)"
        return (
            f'SELECT {selected} FROM {measurement}{where} GROUP BY time({every_us}u), "device" '
            f"fill(none) LIMIT {query.limit}"
        )

    async def _run(self, statement: str, *, with_database: bool = True) -> list[dict[str, Any]]:
        """Run one InfluxQL statement; return its series."""
        data = {"q": statement, "epoch": "u"}
        if with_database:
            data["db"] = self._database
        response = await self._request("POST", "/query", data=data)
        status = response.status_code
        if status != 400 and not 200 <= status < 300:
            raise self._status_error(response, "query")
        try:
            body = response.json()
        except ValueError as exc:
            raise StoreError(f"InfluxDB at {self._safe_url}: query answer is not JSON") from exc
        if status == 400 or "error" in body:
            raise StoreError(f"InfluxDB at {self._safe_url}: {body.get('error')} (query: {statement})")
        result = (body.get("results") or [{}])[0]
        if "error" in result:
            error = str(result["error"])
            if error.startswith("database not found"):
                self._database_ready = not self._create_database
                raise RetryableStoreError(f"InfluxDB at {self._safe_url}: {error}", status=404)
            raise StoreError(f"InfluxDB at {self._safe_url}: {error} (query: {statement})")
        series: list[dict[str, Any]] = result.get("series") or []
        return series

    async def _types_of(self, measurement: str, names: set[str]) -> dict[str, str]:
        """Return field name -> InfluxDB type, asking the server again when a field is new to us."""
        known = self._field_types.get(measurement, {})
        if not names <= known.keys():
            found = await self._run(f"SHOW FIELD KEYS FROM {self._target(measurement)}")
            known = {name: kind for item in found for name, kind in item.get("values") or []}
            self._field_types[measurement] = known
        return known

    @staticmethod
    def _typed(value: Any, influx_type: str | None, query: Query) -> FieldValue | None:
        # InfluxDB's JSON writes the float 2.0 as 2; the field's type (or the aggregate) says which.
        if type(value) is not int:
            return value  # type: ignore[no-any-return]
        if query.aggregate == "mean" or (query.aggregate != "count" and influx_type == "float"):
            return float(value)
        return value
