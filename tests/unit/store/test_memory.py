"""MemoryStore, NullStore and the query rules every store shares."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from gateway.store.base import Point, Query, RejectedPointsError, Row
from gateway.store.memory import MemoryStore, NullStore, aggregate_values, bucket_start_us, check_query


def test_memory_store_merges_rewrites_like_influxdb() -> None:
    store = MemoryStore()

    async def go() -> list[Row]:
        await store.write([Point("m", (("device", "d"), ("x", "")), {"a": 1}, 1.0)])
        await store.write([Point("m", (("device", "d"),), {"a": 2, "b": "s"}, 1.0)])
        return await store.query(Query("m"))

    assert asyncio.run(go()) == [Row(1.0, {"device": "d"}, {"a": 2, "b": "s"})]
    assert store.points == [Point("m", (("device", "d"),), {"a": 2, "b": "s"}, 1.0)]
    assert store.writes == 2


def test_memory_store_refuses_what_influxdb_would() -> None:
    store = MemoryStore()
    bad = Point("m", (("device", "trailing\\"),), {"a": 1}, 1.0)
    with pytest.raises(RejectedPointsError) as caught:
        asyncio.run(store.write([bad, Point("m", (), {"a": 1}, 2.0)]))
    assert caught.value.rejected == [bad]
    assert "1 of 2 points rejected" in caught.value.reason and "backslash" in caught.value.reason
    assert len(store.points) == 1


def test_null_store_counts_and_forgets() -> None:
    store = NullStore()
    asyncio.run(store.write([Point("m", (), {"a": 1}, 1.0)] * 3))
    assert (store.written, store.batches) == (3, 1)
    assert asyncio.run(store.query(Query("m"))) == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (Query(every=10), "go together"),
        (Query(aggregate="mean"), "go together"),
        (Query(every=0, aggregate="mean"), "at least a microsecond"),
        (Query(every=-1, aggregate="mean"), "at least a microsecond"),
        (Query(every=math.nan, aggregate="mean"), "at least a microsecond"),
        (Query(every=1, aggregate="median"), "unknown aggregate"),  # type: ignore[arg-type]
        (Query(limit=-1), "limit"),
    ],
)
def test_invalid_queries_are_refused(query: Query, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_query(query)


def test_every_is_returned_in_microseconds() -> None:
    assert check_query(Query(every=2.5, aggregate="max")) == 2_500_000
    assert check_query(Query()) is None


@pytest.mark.parametrize(("ts_us", "bucket"), [(0, 0), (9, 0), (10, 10), (-1, -10), (-10, -10), (-11, -20)])
def test_buckets_are_floored_to_multiples_of_every(ts_us: int, bucket: int) -> None:
    assert bucket_start_us(ts_us, 10) == bucket


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [
        ("mean", 2.25),
        ("sum", 4.5),
        ("min", 1),
        ("max", 3.5),
        ("count", 5),
        ("first", "s"),  # the earliest time, whatever the type
        ("last", True),
    ],
)
def test_aggregates_use_numbers_only_where_influxdb_does(aggregate: Any, expected: object) -> None:
    values: list[tuple[int, Any]] = [(3, 1), (1, "s"), (4, 3.5), (2, False), (9, True)]
    result = aggregate_values(aggregate, values)
    assert result == expected and type(result) is type(expected)


def test_aggregates_of_nothing_numeric_are_none() -> None:
    assert aggregate_values("mean", [(1, "s"), (2, True)]) is None
    assert aggregate_values("first", []) is None
    assert aggregate_values("sum", [(1, 2), (2, 3)]) == 5
