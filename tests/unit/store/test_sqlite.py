"""SqliteStore: writes read back typed, idempotent rewrites, and queries equal to the reference store."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store.base import Aggregate, Point, Query, RejectedPointsError, RetryableStoreError, Row
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SqliteStore

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def write_and_query(
    store: SqliteStore | MemoryStore, points: list[Point], *queries: Query
) -> list[list[Row]]:
    try:
        with contextlib.suppress(RejectedPointsError):  # tests that care check rejection themselves
            await store.write(points)
        return [await store.query(query) for query in queries]
    finally:
        await store.close()


def test_points_read_back_with_their_types(tmp_path: Path) -> None:
    written = [
        Point(
            "telemetry",
            (("device", "d1"), ("site", "north pier")),
            {"f": 2.0, "i": 3, "b": True, "s": "ünï 😀"},
            1.5,
        ),
        Point("telemetry", (("device", "d2"),), {"f": -0.5, "big": 2**63 - 1}, 2.000001),
        Point("other", (("device", "d1"),), {"f": 9.0}, 1.5),
    ]
    (rows,) = run(write_and_query(SqliteStore(tmp_path / "t.db"), written, Query("telemetry")))
    assert rows == [
        Row(1.5, {"device": "d1", "site": "north pier"}, {"b": True, "f": 2.0, "i": 3, "s": "ünï 😀"}),
        Row(2.000001, {"device": "d2"}, {"big": 2**63 - 1, "f": -0.5}),
    ]
    fields = rows[0].fields
    assert [type(fields[name]) for name in ("b", "f", "i", "s")] == [bool, float, int, str]


def test_rewriting_a_point_is_idempotent_and_merges_fields(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = Point("m", (("device", "d"),), {"a": 1, "b": 2}, 10.0)

    async def go() -> list[Row]:
        store = SqliteStore(path)
        await store.write([first, first])
        await store.write([first])
        await store.write([Point("m", (("device", "d"),), {"b": 20, "c": 30}, 10.0)])
        await store.close()
        reopened = SqliteStore(path)  # and it survives a restart
        rows = await reopened.query(Query("m"))
        await reopened.close()
        return rows

    assert run(go()) == [Row(10.0, {"device": "d"}, {"a": 1, "b": 20, "c": 30})]
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT count(*) FROM points").fetchone() == (3,)
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_empty_tag_values_are_not_part_of_the_series(tmp_path: Path) -> None:
    points = [
        Point("m", (("device", "d"), ("x", "")), {"a": 1}, 1.0),
        Point("m", (("device", "d"),), {"a": 2}, 1.0),
    ]
    (rows,) = run(write_and_query(SqliteStore(tmp_path / "t.db"), points, Query("m")))
    assert rows == [Row(1.0, {"device": "d"}, {"a": 2})]


def test_refused_points_are_reported_and_the_rest_stored(tmp_path: Path) -> None:
    bad = Point("m", (), {"a": math.inf}, 1.0)
    good = Point("m", (), {"a": 1.0}, 2.0)

    async def go() -> list[Row]:
        store = SqliteStore(tmp_path / "t.db")
        with pytest.raises(RejectedPointsError) as caught:
            await store.write([bad, good])
        assert caught.value.rejected == [bad]
        rows = await store.query(Query("m"))
        await store.close()
        return rows

    assert run(go()) == [Row(2.0, {}, {"a": 1.0})]


def test_filters_fields_and_limit(tmp_path: Path) -> None:
    points = [
        Point("m", (("device", f"d{n % 2}"),), {"a": n, "b": -n} if n % 3 else {"a": n}, float(n))
        for n in range(10)
    ]
    queries = [
        Query("m", device_id="d1"),
        Query("m", start=2.0, end=5.0),
        Query("m", fields=("b",)),
        Query("m", fields=("b", "zzz"), limit=2),
        Query("m", limit=0),
        Query("nothing"),
    ]
    results = run(write_and_query(SqliteStore(tmp_path / "t.db"), points, *queries))
    assert [row.ts for row in results[0]] == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert [row.ts for row in results[1]] == [2.0, 3.0, 4.0]
    assert [row.fields for row in results[2]] == [{"b": -n} for n in range(10) if n % 3]
    assert results[3] == [
        Row(1.0, {"device": "d1"}, {"b": -1, "zzz": None}),
        Row(2.0, {"device": "d0"}, {"b": -2, "zzz": None}),
    ]
    assert results[4] == [] and results[5] == []


def test_limit_breaks_ties_by_tags_like_the_other_stores(tmp_path: Path) -> None:
    points = [Point("m", tags, {"a": 1}, 5.0) for tags in ((("device", "b"),), (("device", "a"),), ())]
    points.append(Point("m", (), {"a": 1}, 1.0))
    (rows,) = run(write_and_query(SqliteStore(tmp_path / "t.db"), points, Query("m", limit=3)))
    assert [(row.ts, row.tags) for row in rows] == [(1.0, {}), (5.0, {}), (5.0, {"device": "a"})]


def test_aggregates_per_device_and_bucket(tmp_path: Path) -> None:
    points = [
        Point("m", (("device", "a"),), {"x": 1, "s": "one"}, 0.0),
        Point("m", (("device", "a"),), {"x": 3.5, "s": "two"}, 5.0),
        Point("m", (("device", "a"),), {"x": 10, "s": "three"}, 10.0),
        Point("m", (("device", "b"),), {"x": 7, "flag": True}, 9.999999),
        Point("m", (("device", "b"),), {"x": -2}, -0.5),  # before 1970: bucket -10
    ]
    aggregates: list[Aggregate] = ["mean", "min", "max", "sum", "count", "first", "last"]
    queries = [Query("m", every=10, aggregate=name) for name in aggregates]
    results = dict(
        zip(aggregates, run(write_and_query(SqliteStore(tmp_path / "t.db"), points, *queries)), strict=True)
    )
    a, b = {"device": "a"}, {"device": "b"}
    assert results["mean"] == [
        Row(-10.0, b, {"x": -2.0}),
        Row(0.0, a, {"x": 2.25}),
        Row(0.0, b, {"x": 7.0}),
        Row(10.0, a, {"x": 10.0}),
    ]
    assert results["min"] == [
        Row(-10.0, b, {"x": -2}),
        Row(0.0, a, {"x": 1}),
        Row(0.0, b, {"x": 7}),
        Row(10.0, a, {"x": 10}),
    ]
    assert results["max"][1] == Row(0.0, a, {"x": 3.5})
    assert results["sum"][1] == Row(0.0, a, {"x": 4.5})
    assert results["count"][1] == Row(0.0, a, {"s": 2, "x": 2})
    assert results["count"][2] == Row(0.0, b, {"flag": 1, "x": 1})
    assert results["first"][1] == Row(0.0, a, {"s": "one", "x": 1})
    assert results["last"][1] == Row(0.0, a, {"s": "two", "x": 3.5})
    assert results["last"][2] == Row(0.0, b, {"flag": True, "x": 7})


def test_database_errors_are_retryable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "missing-dir" / "t.db")
    with pytest.raises(RetryableStoreError, match="unable to open database file") as caught:
        run(write_and_query(store, [Point("m", (), {"a": 1}, 1.0)]))
    assert isinstance(caught.value.__cause__, sqlite3.Error)


def test_a_closed_store_refuses_use(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "t.db")
    run(store.close())
    with pytest.raises(RuntimeError, match="closed"):
        run(store.query(Query("m")))


# --- the same answers as the reference store ----------------------------------------------------------

values = st.one_of(st.integers(-1000, 1000), st.floats(-1e6, 1e6), st.booleans(), st.text("ab", max_size=2))
stored_points = st.lists(
    st.builds(
        lambda device, fields, ts: Point("m", (("device", device),) if device else (), fields, ts / 4),
        st.sampled_from(["", "a", "b"]),
        st.dictionaries(st.sampled_from(["x", "y", "z"]), values, min_size=1),
        st.integers(-40, 40),  # coarse times: many ties between devices and rewrites of a point
    ),
    max_size=25,
)
queries = st.builds(
    Query,
    measurement=st.just("m"),
    device_id=st.sampled_from([None, "a", "b"]),
    fields=st.sampled_from([(), ("x",), ("y", "z")]),
    start=st.sampled_from([None, -5.0, 0.0, 3.3]),
    end=st.sampled_from([None, 0.0, 7.5]),
    every=st.sampled_from([None, 1.0, 2.5, 10.0]),
    aggregate=st.sampled_from([None, "mean", "min", "max", "sum", "count", "first", "last"]),
    limit=st.sampled_from([0, 3, 1000]),
).filter(lambda query: (query.every is None) == (query.aggregate is None))


def _close(left: object, right: object) -> bool:
    if isinstance(left, float) and isinstance(right, float):
        return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-9)
    return type(left) is type(right) and left == right


@settings(max_examples=150, deadline=None)
@given(points=stored_points, query=queries)
def test_queries_answer_like_the_reference_store(points: list[Point], query: Query) -> None:
    # A point's fields may be merged across writes with the same series and time in both stores.
    (expected,) = run(write_and_query(MemoryStore(), points, query))
    (actual,) = run(write_and_query(SqliteStore(":memory:"), points, query))
    assert [(row.ts, row.tags, sorted(row.fields)) for row in actual] == [
        (row.ts, row.tags, sorted(row.fields)) for row in expected
    ]
    for got, want in zip(actual, expected, strict=True):
        for name, value in want.fields.items():
            assert _close(got.fields[name], value), (name, got.fields[name], value)
