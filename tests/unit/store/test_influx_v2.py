"""InfluxV2Store without a server: the Flux it builds and how client errors are mapped."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import pytest
import urllib3
from influxdb_client.client.flux_table import FluxColumn, FluxRecord, FluxTable
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from gateway.store.base import Point, Query, RejectedPointsError, RetryableStoreError, Row
from gateway.store.influx_v2 import InfluxV2Store, flux_query, flux_string

TOKEN = "tok-Secret-123"
NO_POOL: Any = None  # urllib3's errors name their connection or pool, which these tests do not need


def api_error(status: int, message: str) -> ApiException:
    response = urllib3.HTTPResponse(
        body=json.dumps({"code": "invalid", "message": message}).encode(),
        status=status,
        reason="Reason",
        headers={"Content-Type": "application/json"},
        preload_content=True,
    )
    return ApiException(http_resp=response)  # type: ignore[no-untyped-call]


class FakeWriteApi:
    """Answer writes from a script; a line containing "bad" is refused with 400 unless alone."""

    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.errors = errors or []
        self.bodies: list[bytes] = []
        self.kwargs: list[dict[str, Any]] = []

    def write(self, **kwargs: Any) -> None:
        self.bodies.append(kwargs["record"])
        self.kwargs.append(kwargs)
        if self.errors:
            raise self.errors.pop(0)
        if b"bad" in kwargs["record"]:
            raise api_error(400, "unable to parse 'bad...': invalid")


def make_store(api: FakeWriteApi) -> InfluxV2Store:
    store = InfluxV2Store("http://influx.test:8086", SecretStr(TOKEN), "org", "bucket", timeout=3)
    store._write_api = api  # type: ignore[assignment]
    return store


def write(store: InfluxV2Store, points: list[Point]) -> None:
    async def go() -> None:
        try:
            await store.write(points)
        finally:
            await store.close()

    asyncio.run(go())


def pt(n: int, device: str = "d") -> Point:
    return Point("m", (("device", device),), {"x": float(n)}, float(n))


def test_writes_encoded_lines_at_microsecond_precision() -> None:
    api = FakeWriteApi()
    write(make_store(api), [pt(1), pt(2)])
    assert api.bodies == [b"m,device=d x=1.0 1000000\nm,device=d x=2.0 2000000"]
    assert api.kwargs[0]["bucket"] == "bucket" and api.kwargs[0]["org"] == "org"
    assert str(api.kwargs[0]["write_precision"]) == "us"


def test_refused_lines_are_isolated() -> None:
    api = FakeWriteApi()
    points = [pt(n) for n in range(6)]
    points[4] = pt(4, device="bad")
    with pytest.raises(RejectedPointsError) as caught:
        write(make_store(api), points)
    assert caught.value.rejected == [points[4]] and "unable to parse" in caught.value.reason


def test_too_large_splits_and_retries() -> None:
    api = FakeWriteApi([api_error(413, "request too large")])
    write(make_store(api), [pt(1), pt(2)])
    assert api.bodies[1:] == [b"m,device=d x=1.0 1000000", b"m,device=d x=2.0 2000000"]


@pytest.mark.parametrize(
    ("error", "status", "text"),
    [
        (api_error(404, 'bucket "bucket" not found'), 404, "bucket 'bucket' or org 'org' not found"),
        (api_error(401, "unauthorized access"), 401, "check the token"),
        (api_error(429, "slow down"), 429, "rate limited"),
        (api_error(500, "internal error"), 500, "HTTP 500: internal error"),
        (api_error(503, "unavailable"), 503, "HTTP 503"),
        (urllib3.exceptions.NewConnectionError(NO_POOL, "Connection refused"), None, "NewConnectionError"),
        (
            urllib3.exceptions.ReadTimeoutError(NO_POOL, "/api/v2/write", "Read timed out."),
            None,
            "ReadTimeoutError",
        ),
        (urllib3.exceptions.ProtocolError("Connection aborted."), None, "ProtocolError"),
        (ConnectionResetError(104, "Connection reset by peer"), None, "ConnectionResetError"),
    ],
)
def test_errors_that_may_pass_later_are_retryable(error: Exception, status: int | None, text: str) -> None:
    with pytest.raises(RetryableStoreError) as caught:
        write(make_store(FakeWriteApi([error])), [pt(1)])
    assert caught.value.status == status
    assert text in str(caught.value)
    assert caught.value.__cause__ is error
    assert TOKEN not in str(caught.value)


def test_token_is_not_shown() -> None:
    store = make_store(FakeWriteApi())
    assert TOKEN not in repr(store)
    asyncio.run(store.close())


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", '"plain"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("x${y}", '"x\\${y}"'),
        ("a\nb\tc", '"a\\nb\\tc"'),
    ],
)
def test_flux_strings_are_escaped(value: str, literal: str) -> None:
    assert flux_string(value) == literal


def test_flux_for_a_raw_query() -> None:
    assert flux_query("b", Query("m", device_id="d1", fields=("a", "b"), start=1.5, end=2.0, limit=5)) == (
        'from(bucket: "b")\n'
        "  |> range(start: time(v: 1500000000), stop: time(v: 2000000000))\n"
        '  |> filter(fn: (r) => r._measurement == "m")\n'
        '  |> filter(fn: (r) => r["device"] == "d1")\n'
        '  |> filter(fn: (r) => r._field == "a" or r._field == "b")\n'
        "  |> limit(n: 5)\n"
        '  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")'
    )


def test_flux_for_an_aggregate_query() -> None:
    text = flux_query("b", Query("m", every=60, aggregate="mean"))
    assert text.startswith('import "types"\n\nfrom(bucket: "b")\n')
    assert "range(start: time(v: -9223372036854775806), stop: time(v: 9223372036854775806))" in text
    assert '|> group(columns: ["_measurement", "device", "_field"])' in text
    assert '|> aggregateWindow(every: 60000000us, fn: mean, createEmpty: false, timeSrc: "_start")' in text
    first = flux_query("b", Query("m", every=1, aggregate="first"))
    assert "types" not in first and "fn: first" in first


class FakeQueryApi:
    def __init__(self, tables: list[FluxTable]) -> None:
        self.tables = tables
        self.seen: list[tuple[str, str]] = []

    def query(self, flux: str, org: str) -> list[FluxTable]:
        self.seen.append((flux, org))
        return self.tables


def flux_table(group: list[str], others: list[str], records: list[dict[str, Any]]) -> FluxTable:
    table = FluxTable()
    labels = ["result", "table", *group, *others]
    table.columns = [FluxColumn(index, label, "string", label in group) for index, label in enumerate(labels)]
    table.records = [FluxRecord(0, values) for values in records]
    return table


def test_query_rows_take_tags_from_the_group_key_and_fields_from_the_rest() -> None:
    when = dt.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=dt.UTC)
    common = {"result": "_result", "table": 0, "_start": when, "_stop": when, "_measurement": "m"}
    tables = [
        flux_table(
            ["_start", "_stop", "_measurement", "device", "site"],
            ["_time", "x", "s"],
            [
                {**common, "device": "d2", "site": "", "_time": when, "x": 1.5, "s": None},
                {
                    **common,
                    "device": "d2",
                    "site": "",
                    "_time": when + dt.timedelta(seconds=1),
                    "x": 2.5,
                    "s": "a",
                },
            ],
        ),
        flux_table(
            ["_start", "_stop", "_measurement", "device", "site"],
            ["_time", "x", "s"],
            [{**common, "device": "d1", "site": "north", "_time": when, "x": 3, "s": "b"}],
        ),
    ]
    store = make_store(FakeWriteApi())
    api = FakeQueryApi(tables)
    store._query_api = api  # type: ignore[assignment]

    async def go() -> list[Row]:
        rows = await store.query(Query("m", limit=2))
        await store.close()
        return rows

    ts = 1_700_000_000.123456
    assert asyncio.run(go()) == [
        Row(ts, {"device": "d1", "site": "north"}, {"x": 3, "s": "b"}),
        Row(ts, {"device": "d2"}, {"x": 1.5}),
    ]
    assert api.seen == [(flux_query("bucket", Query("m", limit=2)), "org")]
