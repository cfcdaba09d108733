"""BatchWriter: batching, ordered acknowledgements, retry, rejection, backpressure and close."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from gateway.store.base import Point, RejectedPointsError, RetryableStoreError
from gateway.store.batcher import BatchWriter
from gateway.store.memory import MemoryStore

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def points(*numbers: int) -> list[Point]:
    return [Point("m", (("device", "d"),), {"n": n}, float(n)) for n in numbers]


class ScriptedStore(MemoryStore):
    """A MemoryStore whose writes can be held (one permit each), and that fails with scripted errors first."""

    def __init__(self, errors: Sequence[Exception] = ()) -> None:
        super().__init__()
        self.errors = list(errors)
        self.calls: list[list[int]] = []
        self.permits: asyncio.Semaphore | None = None

    async def write(self, batch: Sequence[Point]) -> None:
        self.calls.append([int(p.fields["n"]) for p in batch])
        if self.permits is not None:
            await self.permits.acquire()
        if self.errors:
            raise self.errors.pop(0)
        await super().write(batch)

    @property
    def stored(self) -> list[int]:
        return [int(p.fields["n"]) for p in self.points]


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` for up to ~5 s (the writer has no hook to wait on, by design)."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not met in time")


async def running(writer: BatchWriter, body: Callable[[], Awaitable[None]]) -> None:
    async with asyncio.TaskGroup() as group:
        group.create_task(writer.run())
        await body()
        await writer.close()


def test_a_full_batch_is_written_at_once() -> None:
    store = ScriptedStore()
    writer = BatchWriter(store, batch_size=3, flush_interval=60)

    async def body() -> None:
        writer.add(points(1, 2))
        await asyncio.sleep(0.05)
        assert store.calls == []
        writer.add(points(3, 4))
        await until(lambda: store.calls == [[1, 2, 3]])

    run(running(writer, body))
    assert store.calls == [[1, 2, 3], [4]]  # close wrote the remainder
    assert (writer.written, writer.batches) == (4, 2)


def test_a_partial_batch_is_written_after_the_flush_interval() -> None:
    store = ScriptedStore()
    writer = BatchWriter(store, batch_size=100, flush_interval=0.05)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.add(points(1))
        await until(lambda: store.stored == [1])
        assert loop.time() - started >= 0.04
        writer.add(points(2))
        await until(lambda: store.stored == [1, 2])

    run(running(writer, body))
    assert store.calls == [[1], [2]]


def test_callbacks_fire_in_order_once_all_their_points_are_written() -> None:
    store = ScriptedStore()
    writer = BatchWriter(store, batch_size=2, flush_interval=60)
    fired: list[str] = []

    async def body() -> None:
        store.permits = asyncio.Semaphore(0)
        writer.add(points(1), lambda: fired.append("a"))
        writer.add(points(2, 3), lambda: fired.append("b"))  # spans the first and second batch
        writer.add(points(4), lambda: fired.append("c"))
        await until(lambda: len(store.calls) == 1)
        assert fired == []
        store.permits.release()
        await until(lambda: len(store.calls) == 2)  # the second batch is being written
        assert fired == ["a"]
        store.permits.release()
        await until(lambda: len(fired) == 3)
        assert fired == ["a", "b", "c"]
        store.permits = None
        writer.add([], lambda: fired.append("d"))  # nothing outstanding: acknowledged at once
        assert fired == ["a", "b", "c", "d"]

    run(running(writer, body))
    assert store.calls == [[1, 2], [3, 4]]


def test_a_callback_for_no_points_waits_behind_earlier_ones() -> None:
    store = ScriptedStore()
    writer = BatchWriter(store, batch_size=10, flush_interval=60)
    fired: list[str] = []

    async def body() -> None:
        writer.add(points(1), lambda: fired.append("a"))
        writer.add([], lambda: fired.append("b"))
        assert fired == []

    run(running(writer, body))
    assert fired == ["a", "b"]


def test_retryable_errors_retry_the_same_batch_with_growing_jittered_delays_in_order() -> None:
    errors = [RetryableStoreError(f"down {n}", status=503) for n in range(6)]
    store = ScriptedStore(errors)
    sleep = FakeSleep()
    jitters = iter([0.0, 0.999, 0.0, 0.0, 0.0, 0.0])
    writer = BatchWriter(
        store,
        batch_size=2,
        flush_interval=60,
        retry_initial=0.5,
        retry_max=4.0,
        sleep=sleep,
        jitter=lambda: next(jitters),
    )
    fired: list[int] = []

    async def body() -> None:
        writer.add(points(1, 2), lambda: fired.append(1))
        writer.add(points(3, 4), lambda: fired.append(2))
        await until(lambda: len(store.calls) == 8)

    run(running(writer, body))
    assert store.calls == [[1, 2]] * 7 + [[3, 4]]
    assert store.stored == [1, 2, 3, 4]
    assert fired == [1, 2]
    assert sleep.delays[0] == 0.25
    assert sleep.delays[1] == pytest.approx(1.0, rel=1e-3)
    assert sleep.delays[2:] == [1.0, 2.0, 2.0, 2.0]  # half of the 4 s ceiling, with jitter 0
    assert writer.retries == 6 and writer.last_error == "down 5"
    assert (writer.written, writer.rejected, writer.batches) == (4, 0, 2)


def test_rejected_points_go_to_on_rejected_and_the_rest_count_as_written() -> None:
    store = MemoryStore()
    seen: list[RejectedPointsError] = []
    fired: list[str] = []
    writer = BatchWriter(store, batch_size=3, flush_interval=60, on_rejected=seen.append)
    bad = Point("m", (), {"n": float("nan")}, 2.0)

    async def body() -> None:
        writer.add([*points(1), bad, *points(3)], lambda: fired.append("acked"))
        await until(lambda: fired == ["acked"])

    run(running(writer, body))
    assert [err.rejected for err in seen] == [[bad]]
    assert (writer.written, writer.rejected, writer.retries) == (2, 1, 0)
    assert writer.last_error is not None and "not a finite number" in writer.last_error
    assert len(store.points) == 2


def test_backpressure_holds_the_ingest_until_points_are_written() -> None:
    store = ScriptedStore()
    writer = BatchWriter(store, batch_size=3, flush_interval=60, max_pending=5)

    async def body() -> None:
        store.permits = asyncio.Semaphore(0)
        writer.add(points(1, 2, 3))
        await until(lambda: len(store.calls) == 1)
        writer.add(points(4))
        assert not writer.is_full
        writer.add(points(5))
        assert writer.is_full and writer.pending == 5
        waiter = asyncio.create_task(writer.wait_until_not_full())
        await asyncio.sleep(0.02)
        assert not waiter.done()  # nothing was dropped to make room
        store.permits.release()
        await asyncio.wait_for(waiter, 1)
        store.permits = None
        assert not writer.is_full

    run(running(writer, body))
    assert store.stored == [1, 2, 3, 4, 5]


def test_close_writes_everything_pending_and_then_refuses_points() -> None:
    store = ScriptedStore()
    writer = BatchWriter(store, batch_size=2, flush_interval=60)

    async def body() -> None:
        writer.add(points(1, 2, 3, 4, 5))

    run(running(writer, body))
    assert store.stored == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(points(6))


def test_close_without_a_run_loop_writes_inline() -> None:
    store = ScriptedStore()
    writer = BatchWriter(store, batch_size=2)
    fired: list[str] = []

    async def body() -> None:
        writer.add(points(1, 2, 3), lambda: fired.append("x"))
        await writer.close()
        await writer.run()  # returns at once after close

    run(body())
    assert store.calls == [[1, 2], [3]] and fired == ["x"]


def test_add_creates_no_tasks() -> None:
    writer = BatchWriter(MemoryStore(), batch_size=10_000, max_pending=100_000)

    async def body() -> None:
        before = len(asyncio.all_tasks())
        for n in range(1000):
            writer.add(points(n), lambda: None)
        assert len(asyncio.all_tasks()) == before

    run(body())


def test_a_bug_in_the_store_crashes_the_loop() -> None:
    store = ScriptedStore([TypeError("bug")])
    writer = BatchWriter(store, batch_size=1)

    async def body() -> None:
        writer.add(points(1))
        await asyncio.sleep(1)

    with pytest.raises(ExceptionGroup) as caught:
        run(running(writer, body))
    assert caught.group_contains(TypeError, match="bug")


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"max_pending": 0}, {"flush_interval": 0}, {"retry_initial": 0}, {"retry_max": 0.1}],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BatchWriter(MemoryStore(), **kwargs)
