"""InfluxV1Store against an emulated server: isolating refused points, error mapping, InfluxQL."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from gateway.store.base import Point, Query, RejectedPointsError, RetryableStoreError, Row, StoreError
from gateway.store.influx_v1 import InfluxV1Store, influxql_identifier, influxql_string
from tests.unit.store.fake_influx import TYPE_NAMES, FakeInflux, query_answer

T = TypeVar("T")
PASSWORD = "s3cret-Pa55"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def make_store(fake: FakeInflux, **kwargs: Any) -> InfluxV1Store:
    return InfluxV1Store("http://influx.test:8086", fake.database, transport=fake.transport(), **kwargs)


def write(store: InfluxV1Store, points: list[Point]) -> RejectedPointsError | None:
    async def go() -> RejectedPointsError | None:
        try:
            await store.write(points)
        except RejectedPointsError as err:
            return err
        finally:
            await store.close()
        return None

    return run(go())


def pt(ts: int, value: Any, *, measurement: str = "m", field: str = "x", bad: bool = False) -> Point:
    tags = (("bad", "1"),) if bad else ()
    return Point(measurement, (("device", "d"), *tags), {field: value}, float(ts))


def test_writes_a_batch_in_one_request_at_microsecond_precision() -> None:
    fake = FakeInflux()
    assert write(make_store(fake, retention_policy="week"), [pt(1, 1.5), pt(2, 2.5)]) is None
    assert len(fake.requests) == 1
    assert fake.requests[0].url.params == httpx.QueryParams(db="db", precision="u", rp="week")
    assert len(fake.stored) == 2


def test_type_conflict_rejects_exactly_the_named_points_and_keeps_the_rest() -> None:
    fake = FakeInflux()
    fake.types[("m", "x")] = "float"
    points = [pt(1, 1.0), pt(2, 2), pt(3, 3.0), pt(4, 4)]
    err = write(make_store(fake), points)
    assert err is not None
    assert err.rejected == [points[1], points[3]]
    assert "field type conflict" in err.reason and "2 of 4 points rejected" in err.reason
    assert len(fake.stored) == 2
    # the message named them; the rest is written once more to confirm it, and nothing else
    assert len(fake.requests) == 2
    assert fake.requests[1].content.decode().count("\n") == 1


def test_a_parse_error_hidden_behind_a_type_conflict_is_still_found() -> None:
    fake = FakeInflux()
    fake.types[("m", "x")] = "integer"
    points = [pt(1, 2.5), pt(2, 3), pt(3, 4, bad=True)]
    err = write(make_store(fake), points)
    assert err is not None and err.rejected == [points[0], points[2]]
    assert [key[2] for key in fake.stored] == [2_000_000]


def test_second_conflict_is_found_by_writing_the_rest_again() -> None:
    fake = FakeInflux()
    fake.types[("m", "x")] = "float"
    fake.types[("m", "y")] = "integer"
    points = [pt(1, 1.0), pt(2, 2), pt(3, 3.5, field="y"), pt(4, 4, field="y")]
    err = write(make_store(fake), points)
    assert err is not None and err.rejected == [points[1], points[2]]
    assert {key[2] for key in fake.stored} == {1_000_000, 4_000_000}


def test_whole_batch_refusal_is_isolated_by_splitting() -> None:
    fake = FakeInflux()
    points = [pt(n, n) for n in range(8)]
    points[5] = pt(5, 5, bad=True)
    err = write(make_store(fake), [points[5]])
    assert err is not None and err.rejected == [points[5]] and "unable to parse" in err.reason
    fake = FakeInflux()
    fake_points = [pt(n, 1.0) for n in range(7)] + [pt(7, 2)]  # new field, two types in one batch
    err = write(make_store(fake), fake_points)
    assert err is not None and err.rejected == [fake_points[7]]
    assert len(fake.stored) == 7


def test_too_large_batches_are_split_and_a_single_oversized_point_is_rejected() -> None:
    fake = FakeInflux(max_body=200)
    points = [pt(n, float(n)) for n in range(40)]
    assert write(make_store(fake), points) is None
    assert len(fake.stored) == 40 and len(fake.requests) > 1
    huge = Point("m", (), {"s": "x" * 500}, 1.0)
    err = write(make_store(FakeInflux(max_body=200)), [huge, *points[:3]])
    assert err is not None and err.rejected == [huge] and "larger than the server accepts" in err.reason


def test_points_the_encoder_refuses_are_rejected_with_the_others_written() -> None:
    fake = FakeInflux()
    nan = Point("m", (), {"x": float("nan")}, 1.0)
    err = write(make_store(fake), [nan, pt(2, 1.0)])
    assert err is not None and err.rejected == [nan] and "not a finite number" in err.reason
    assert len(fake.stored) == 1


def test_empty_batch_sends_nothing() -> None:
    fake = FakeInflux()
    assert write(make_store(fake), []) is None
    assert fake.requests == []


field_value = st.one_of(st.integers(-5, 5), st.floats(-5, 5), st.booleans(), st.text("ab", max_size=2))


@settings(max_examples=200)
@given(
    existing=st.dictionaries(
        st.sampled_from([("a", "x"), ("a", "y"), ("b", "x")]), st.sampled_from(list(TYPE_NAMES.values()))
    ),
    specs=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["x", "y"]), field_value, st.booleans()),
        min_size=1,
        max_size=30,
    ),
    max_body=st.sampled_from([None, 120, 400]),
)
def test_every_point_is_either_stored_or_rejected_never_both(
    existing: dict[tuple[str, str], str], specs: list[tuple[str, str, Any, bool]], max_body: int | None
) -> None:
    fake = FakeInflux(max_body=max_body)
    fake.types.update(existing)
    points = [
        pt(ts, value, measurement=measurement, field=field, bad=ts % 7 == 3 and unparseable)
        for ts, (measurement, field, value, unparseable) in enumerate(specs)
    ]
    err = write(make_store(fake), points)
    rejected = err.rejected if err is not None else []
    stored_times = {(measurement, ts) for measurement, _, ts in fake.stored}
    for point in points:
        key = (point.measurement, round(point.ts * 1e6))
        was_rejected = any(point is other for other in rejected)
        assert was_rejected != (key in stored_times), point
        if was_rejected:
            ((name, value),) = point.fields.items()
            conflicts = fake.types.get((point.measurement, name)) != TYPE_NAMES[type(value)]
            assert conflicts or dict(point.tags).get("bad") == "1", point


# --- errors that may pass later --------------------------------------------------------------------


def status_store(status: int, body: str = '{"error": "boom"}', **kwargs: Any) -> InfluxV1Store:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body.encode()))
    return InfluxV1Store("http://influx.test:8086", "db", transport=transport, **kwargs)


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (404, "database 'db' not found"),
        (401, "not authorised"),
        (403, "not authorised"),
        (429, "rate limited"),
        (500, "HTTP 500: boom"),
        (502, "HTTP 502"),
        (503, "HTTP 503"),
        (418, "HTTP 418"),
    ],
)
def test_statuses_that_may_pass_later_are_retryable(status: int, text: str) -> None:
    with pytest.raises(RetryableStoreError) as caught:
        write(status_store(status), [pt(1, 1.0)])
    assert caught.value.status == status
    assert text in str(caught.value)


def raising(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (httpx.ReadTimeout("read timed out"), "timed out after 2.5s"),
        (httpx.ConnectTimeout("connect timed out"), "timed out after 2.5s"),
        (httpx.ConnectError("Connection refused"), "ConnectError: Connection refused"),
        (httpx.ReadError("Connection reset by peer"), "ReadError"),
        (httpx.RemoteProtocolError("Server disconnected"), "RemoteProtocolError"),
    ],
)
def test_transport_errors_are_retryable_and_chained(exc: Exception, text: str) -> None:
    store = InfluxV1Store(
        "http://influx.test:8086", "db", timeout=2.5, transport=httpx.MockTransport(raising(exc))
    )
    with pytest.raises(RetryableStoreError) as caught:
        write(store, [pt(1, 1.0)])
    assert text in str(caught.value)
    assert caught.value.status is None
    assert caught.value.__cause__ is exc


def test_password_is_sent_as_basic_auth_and_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/query":
            return httpx.Response(200, json={"results": [{"statement_id": 0}]})
        raise httpx.ConnectError(f"cannot reach {request.url}")

    store = InfluxV1Store(
        "http://admin:url-Pa55@influx.test:8086",
        "db",
        username="writer",
        password=SecretStr(PASSWORD),
        create_database=True,
        transport=httpx.MockTransport(handler),
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RetryableStoreError) as caught:
        write(store, [pt(1, 1.0)])
    expected = "Basic " + base64.b64encode(f"writer:{PASSWORD}".encode()).decode()
    assert seen[0].headers["authorization"] == expected
    assert all(PASSWORD not in str(request.url) for request in seen)
    shown = [str(caught.value), repr(caught.value), repr(store), caplog.text]
    for text in shown:
        assert PASSWORD not in text and "url-Pa55" not in text


def test_create_database_runs_once_and_again_after_the_database_disappears() -> None:
    fake = FakeInflux(database="tele")
    store = InfluxV1Store("http://influx.test:8086", "tele", create_database=True, transport=fake.transport())

    async def go() -> None:
        await store.write([pt(1, 1.0)])
        await store.write([pt(2, 1.0)])
        assert fake.queries == ['CREATE DATABASE "tele"']
        fake.database = "other"  # the server lost it
        with pytest.raises(RetryableStoreError, match="not found"):
            await store.write([pt(3, 1.0)])
        fake.database = "tele"
        await store.write([pt(3, 1.0)])
        assert fake.queries == ['CREATE DATABASE "tele"'] * 2
        await store.close()

    run(go())


# --- queries ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("plain", '"plain"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("new\nline", '"new\\nline"'),
        ("it's", '"it\'s"'),
    ],
)
def test_identifiers_are_quoted(name: str, quoted: str) -> None:
    assert influxql_identifier(name) == quoted


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("plain", "'plain'"),
        ("it's", "'it\\'s'"),
        ("a\\b", "'a\\\\b'"),
        ('a"b', "'a\"b'"),
        ("x\ny", "'x\\ny'"),
    ],
)
def test_string_literals_are_quoted(value: str, quoted: str) -> None:
    assert influxql_string(value) == quoted


@pytest.mark.parametrize(
    ("query", "statement"),
    [
        (Query("m"), 'SELECT * FROM "m" GROUP BY * LIMIT 1000'),
        (
            Query("m", device_id="d'1", fields=("a", "b c"), start=1.5, end=2.0, limit=10),
            'SELECT "a", "b c" FROM "m" WHERE time >= 1500000u AND time < 2000000u AND "device" = \'d\\\'1\' '
            "GROUP BY * LIMIT 10",
        ),
        (
            Query("m", every=60, aggregate="mean"),
            'SELECT mean(*) FROM "m" GROUP BY time(60000000u), "device" fill(none) LIMIT 1000',
        ),
        (
            Query("m", fields=("x",), every=0.5, aggregate="max", start=0),
            'SELECT max("x") AS "x" FROM "m" WHERE time >= 0u GROUP BY time(500000u), "device" fill(none) LIMIT 1000',
        ),
    ],
)
def test_influxql_statements(query: Query, statement: str) -> None:
    fake = FakeInflux()
    store = make_store(fake)
    fake.query_answers.append(query_answer())

    async def go() -> None:
        assert await store.query(query) == []
        await store.close()

    run(go())
    assert fake.queries == [statement]


def test_retention_policy_qualifies_the_measurement() -> None:
    fake = FakeInflux()
    store = make_store(fake, retention_policy="a week")

    async def go() -> None:
        await store.query(Query("m"))
        await store.close()

    run(go())
    assert fake.queries == ['SELECT * FROM "db"."a week"."m" GROUP BY * LIMIT 1000']


def test_rows_are_merged_across_series_typed_and_limited() -> None:
    fake = FakeInflux()
    fake.query_answers += [
        query_answer(
            {
                "name": "m",
                "tags": {"device": "b", "site": ""},
                "columns": ["time", "x", "n", "s"],
                "values": [[2_000_000, 2, 7, None], [3_000_000, 3.5, None, None]],
            },
            {
                "name": "m",
                "tags": {"device": "a", "site": "s1"},
                "columns": ["time", "x", "n", "s"],
                "values": [[1_000_000, 1, 5, "hi"], [2_000_000, 4, 6, None]],
            },
        ),
        query_answer(
            {
                "name": "m",
                "columns": ["fieldKey", "fieldType"],
                "values": [["x", "float"], ["n", "integer"], ["s", "string"]],
            }
        ),
    ]
    store = make_store(fake)

    async def go() -> list[Row]:
        rows = await store.query(Query("m", limit=3))
        await store.close()
        return rows

    rows = run(go())
    assert rows == [
        Row(1.0, {"device": "a", "site": "s1"}, {"x": 1.0, "n": 5, "s": "hi"}),
        Row(2.0, {"device": "a", "site": "s1"}, {"x": 4.0, "n": 6}),
        Row(2.0, {"device": "b"}, {"x": 2.0, "n": 7}),
    ]
    assert type(rows[0].fields["x"]) is float and type(rows[0].fields["n"]) is int
    assert fake.queries[1] == 'SHOW FIELD KEYS FROM "m"'


def test_aggregate_columns_are_named_after_their_fields() -> None:
    fake = FakeInflux()
    fake.query_answers += [
        query_answer(
            {
                "name": "m",
                "tags": {"device": "a"},
                "columns": ["time", "count_x", "count_y"],
                "values": [[0, 3, None]],
            }
        ),
        query_answer(
            {"name": "m", "columns": ["fieldKey", "fieldType"], "values": [["x", "float"], ["y", "float"]]}
        ),
    ]
    store = make_store(fake)

    async def go() -> list[Row]:
        rows = await store.query(Query("m", every=10, aggregate="count"))
        await store.close()
        return rows

    assert run(go()) == [Row(0.0, {"device": "a"}, {"x": 3})]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"results": [{"statement_id": 0, "error": "database not found: db"}]}, RetryableStoreError),
        ({"results": [{"statement_id": 0, "error": "invalid something"}]}, StoreError),
        ({"error": "error parsing query"}, StoreError),
    ],
)
def test_query_errors(answer: dict[str, Any], error: type[Exception]) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    store = InfluxV1Store("http://influx.test:8086", "db", transport=transport)
    with pytest.raises(error):
        run(store.query(Query("m")))


def test_invalid_queries_are_bugs() -> None:
    store = make_store(FakeInflux())
    with pytest.raises(ValueError, match="go together"):
        run(store.query(Query("m", every=10)))
