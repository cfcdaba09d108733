"""The InfluxDB stores against real servers: InfluxDB 1.x (v1 API) and VictoriaMetrics (v2 write path)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from devices.event import FieldValue
from gateway.store.base import Point, Query, RejectedPointsError, RetryableStoreError, Row
from gateway.store.influx_v1 import InfluxV1Store
from gateway.store.influx_v2 import InfluxV2Store
from gateway.store.lineprotocol import LineProtocolError, encode_point, write_isolating
from gateway.store.memory import MemoryStore
from tests.integration.influx_servers import InfluxDBServer, VictoriaMetricsServer
from tests.unit.store.reference import should_reject

pytestmark = pytest.mark.integration

T = TypeVar("T")
T0 = 1_700_000_000.0
_measurements = itertools.count(1)

awkward = st.text(
    # Separators, quotes and escapes often; line breaks only rarely (via characters()), as they are
    # refused before reaching the server.
    st.one_of(st.sampled_from(list(" ,=\"'\\#\t{}$")), st.characters(codec="utf-8")),
    min_size=1,
    max_size=12,
)


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.fixture
def database(influxdb_v1: InfluxDBServer) -> str:
    return influxdb_v1.create_database()


async def write_then_query(store: InfluxV1Store, points: Sequence[Point], *queries: Query) -> list[list[Row]]:
    try:
        await store.write(points)
        return [await store.query(query) for query in queries]
    finally:
        await store.close()


AWKWARD_TAGS = (
    ("device", "dev 1,zone=north"),
    ("note", "#not a comment"),
    ("path", "C:\\temp\\x"),
    ("quote", 'it\'s "quoted"'),
    ("unicode", "Zürich 😀"),
    ("with space", "a=b"),
)
ALL_TYPES: dict[str, FieldValue] = {
    "float": 21.5,
    "integral float": 2.0,
    "int": 2**62 + 1,
    "negative": -(2**63),
    "flag": True,
    "off": False,
    "text": 'say "hi" \\o/ ,= ünï',
    "ends with backslash": "C:\\",
    "empty": "",
    "field,with=odd 'chars'": 1,
}


def test_v1_reads_back_every_type_and_awkward_names(influxdb_v1: InfluxDBServer, database: str) -> None:
    written = [
        Point("tele metry,x", AWKWARD_TAGS, ALL_TYPES, T0 + 0.000001),
        Point("tele metry,x", (("device", "plain"),), {"float": 1.25}, T0 + 1),
    ]
    store = InfluxV1Store(influxdb_v1.url, database)
    (rows,) = run(write_then_query(store, written, Query("tele metry,x")))
    assert rows == [
        Row(T0 + 0.000001, dict(AWKWARD_TAGS), ALL_TYPES),
        Row(T0 + 1, {"device": "plain"}, {"float": 1.25}),
    ]
    got = rows[0].fields
    assert {name: type(value) for name, value in got.items()} == {
        name: type(v) for name, v in ALL_TYPES.items()
    }
    assert len(influxdb_v1.rows('SELECT * FROM "tele metry,x"', database)) == 2


def test_v1_rewriting_points_is_idempotent(influxdb_v1: InfluxDBServer, database: str) -> None:
    points = [Point("m", (("device", f"d{n % 3}"),), {"v": n, "s": f"#{n}"}, T0 + n / 10) for n in range(30)]

    async def go() -> None:
        store = InfluxV1Store(influxdb_v1.url, database)
        await store.write(points)
        await store.write(points)
        await store.write(points[5:10])
        await store.close()

    run(go())
    assert influxdb_v1.rows('SELECT count("v") FROM "m"', database)[0]["count"] == 30


def test_v1_type_conflict_rejects_exactly_those_points_and_stores_the_rest(
    influxdb_v1: InfluxDBServer, database: str
) -> None:
    # x is an integer from now on (field types are kept per shard: same week as the points below)
    assert influxdb_v1.write(database, f"m x=1i {round((T0 - 1) * 1e6)}").status_code == 204
    points = [Point("m", (("device", "d"),), {"x": n if n % 4 else n + 0.5}, T0 + n) for n in range(12)]
    store = InfluxV1Store(influxdb_v1.url, database)
    with pytest.raises(RejectedPointsError) as caught:
        run(write_then_query(store, points))
    assert caught.value.rejected == [points[n] for n in (0, 4, 8)]
    assert 'field type conflict: input field "x" on measurement "m" is type float' in caught.value.reason
    stored = influxdb_v1.rows('SELECT "x" FROM "m" WHERE "device" = \'d\'', database)
    assert [row["x"] for row in stored] == [n for n in range(12) if n % 4]


def test_v1_whole_batch_refusal_is_isolated_by_splitting(influxdb_v1: InfluxDBServer, database: str) -> None:
    # One batch giving a new field two types is refused whole ("field type conflict", nothing stored).
    points = [Point("fresh", (), {"y": float(n)}, T0 + n) for n in range(7)] + [
        Point("fresh", (), {"y": 7}, T0 + 7)
    ]
    store = InfluxV1Store(influxdb_v1.url, database)
    with pytest.raises(RejectedPointsError) as caught:
        run(write_then_query(store, points))
    assert caught.value.rejected == [points[7]]
    assert [row["y"] for row in influxdb_v1.rows('SELECT "y" FROM "fresh"', database)] == list(range(7))


def test_unparseable_lines_are_isolated_and_the_rest_stored(
    influxdb_v1: InfluxDBServer, database: str
) -> None:
    points = [Point("raw", (), {"z": n}, T0 + n) for n in range(6)]
    lines = [encode_point(point) for point in points]
    lines[2] = "raw z=NaN 1"  # what an encoder without validation would send
    lines[4] = "raw,t= z=1i 2"  # empty tag value

    async def go() -> list[tuple[Point, str]]:
        async with httpx.AsyncClient(base_url=influxdb_v1.url) as client:

            async def send(body: bytes) -> tuple[int, str]:
                response = await client.post(
                    "/write", params={"db": database, "precision": "u"}, content=body
                )
                return response.status_code, response.text

            return await write_isolating(send, points, lines)

    rejected = run(go())
    assert [point for point, _ in rejected] == [points[2], points[4]]
    assert "invalid number" in rejected[0][1] and "missing tag value" in rejected[1][1]
    assert [row["z"] for row in influxdb_v1.rows('SELECT "z" FROM "raw"', database)] == [0, 1, 3, 5]


def test_v1_missing_database_is_retryable(influxdb_v1: InfluxDBServer) -> None:
    store = InfluxV1Store(influxdb_v1.url, "no_such_database")
    with pytest.raises(RetryableStoreError) as caught:
        run(write_then_query(store, [Point("m", (), {"x": 1}, T0)]))
    assert caught.value.status == 404
    assert "database 'no_such_database' not found" in str(caught.value)


def test_v1_creates_its_database_when_asked(influxdb_v1: InfluxDBServer) -> None:
    name = f"created_{next(_measurements)}"
    store = InfluxV1Store(influxdb_v1.url, name, create_database=True)
    (rows,) = run(write_then_query(store, [Point("m", (), {"x": 1}, T0)], Query("m")))
    assert rows == [Row(T0, {}, {"x": 1})]


def test_v1_unreachable_server_is_retryable() -> None:
    store = InfluxV1Store("http://127.0.0.1:9", "db", timeout=2.0)
    with pytest.raises(RetryableStoreError, match="ConnectError") as caught:
        run(write_then_query(store, [Point("m", (), {"x": 1}, T0)]))
    assert caught.value.__cause__ is not None


QUERIES = [
    Query("q"),
    Query("q", device_id="b", fields=("x",)),
    Query("q", fields=("x", "s"), start=T0 + 3, end=T0 + 12),
    Query("q", limit=5),
    *(
        Query("q", every=5, aggregate=name)
        for name in ("mean", "min", "max", "sum", "count", "first", "last")
    ),
    Query("q", fields=("x",), device_id="a", every=2.5, aggregate="max", start=T0, end=T0 + 10),
    Query("q", fields=("x", "n"), every=10, aggregate="mean", limit=2),
]


@pytest.mark.parametrize("query", QUERIES, ids=lambda query: f"{query.aggregate or 'raw'}")
def test_v1_queries_answer_like_the_reference_store(
    influxdb_v1: InfluxDBServer, database: str, query: Query
) -> None:
    points = [
        Point("q", (("device", "ab"[n % 2]),), {"x": n * 1.5, "n": n, "s": f"s{n}"}, T0 + n * 0.9 + 0.000123)
        for n in range(20)
    ]
    (actual,) = run(write_then_query(InfluxV1Store(influxdb_v1.url, database), points, query))
    reference = MemoryStore()
    run(reference.write(points))
    expected = run(reference.query(query))
    assert len(actual) == len(expected) > 0
    for got, want in zip(actual, expected, strict=True):
        assert got.ts == pytest.approx(want.ts, abs=1e-6)
        assert got.tags == want.tags
        assert got.fields == pytest.approx(want.fields)


# --- the v2 write path into VictoriaMetrics -----------------------------------------------------------


def test_v2_writes_read_back_equal_from_victoria_metrics(victoria_metrics: VictoriaMetricsServer) -> None:
    measurement = f"vm{next(_measurements)}"
    now = round(time.time() - 60, 3)  # VictoriaMetrics keeps milliseconds
    tags = (("device", "dev 1,zone=north"), ("path", "C:\\temp\\x"), ("unicode", "Zürich 😀"))
    points = [
        Point(measurement, tags, {"temp": 20.5 + n, "count": n, "ok": n % 2 == 0}, now + n) for n in range(5)
    ]
    store = InfluxV2Store(victoria_metrics.url, SecretStr("unused-token"), "org", "bucket")

    async def go() -> None:
        await store.write(points)
        await store.close()

    run(go())
    series = victoria_metrics.wait_for_samples(f'{{__name__=~"{measurement}_.*"}}', count=15)
    by_name = {item["metric"]["__name__"]: item for item in series}
    assert sorted(by_name) == [f"{measurement}_count", f"{measurement}_ok", f"{measurement}_temp"]
    for item in series:
        labels = {key: value for key, value in item["metric"].items() if key not in ("__name__", "db")}
        assert labels == dict(tags)
        assert item["timestamps"] == [round((now + n) * 1000) for n in range(5)]
    assert by_name[f"{measurement}_temp"]["values"] == [20.5 + n for n in range(5)]
    assert by_name[f"{measurement}_count"]["values"] == list(range(5))
    assert by_name[f"{measurement}_ok"]["values"] == [1, 0, 1, 0, 1]


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(st.tuples(awkward, awkward), min_size=20, max_size=40, unique_by=lambda pair: pair[0]))
def test_v2_awkward_names_read_back_equal_from_victoria_metrics(
    victoria_metrics: VictoriaMetricsServer, names: list[tuple[str, str]]
) -> None:
    measurement = f"vm{next(_measurements)}"
    now = round(time.time() - 60)
    candidates = [
        Point(measurement, (("device", device),), {field: float(n)}, now)
        for n, (device, field) in enumerate(names)
    ]
    points = []
    for point in candidates:
        try:
            encode_point(point)
        except LineProtocolError:
            assert should_reject(point)
        else:
            points.append(point)
    store = InfluxV2Store(victoria_metrics.url, SecretStr("unused-token"), "org", "bucket")

    async def go() -> None:
        await store.write(points)
        await store.close()

    run(go())
    series = victoria_metrics.wait_for_samples(
        f'{{__name__=~"{measurement}_.*"}}', count=len(points), timeout=5
    )
    read_back = sorted(
        (item["metric"]["__name__"], item["metric"].get("device"), value)
        for item in series
        for value in item["values"]
    )
    sent = sorted(
        (f"{measurement}_{field}", dict(point.tags)["device"], value)
        for point in points
        for field, value in point.fields.items()
    )
    assert read_back == sent


def test_v2_unreachable_server_is_retryable() -> None:
    store = InfluxV2Store("http://127.0.0.1:9", SecretStr("token"), "org", "bucket", timeout=2.0)

    async def go() -> None:
        try:
            await store.write([Point("m", (), {"x": 1}, T0)])
        finally:
            await store.close()

    with pytest.raises(RetryableStoreError, match="Connection refused"):
        run(go())


# --- awkward input through line protocol into InfluxDB 1.x reads back as exactly one point ------------


@pytest.fixture(scope="module")
def hypothesis_database(influxdb_v1: InfluxDBServer) -> str:
    return influxdb_v1.create_database("hypothesis")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(device=awkward, field=awkward, text=st.one_of(awkward, st.just("")))
def test_awkward_values_read_back_as_exactly_one_point(
    influxdb_v1: InfluxDBServer, hypothesis_database: str, device: str, field: str, text: str
) -> None:
    measurement = f"awkward{next(_measurements)}"
    point = Point(measurement, (("device", device),), {field: text, "n": 1}, T0)
    try:
        encode_point(point)
    except LineProtocolError:
        assert should_reject(point)
        return
    store = InfluxV1Store(influxdb_v1.url, hypothesis_database)
    everything, by_device = run(
        write_then_query(store, [point], Query(measurement), Query(measurement, device_id=device))
    )
    expected = [Row(T0, {"device": device}, {field: text, "n": 1})]
    assert everything == expected
    assert by_device == expected
