"""BatchWriter: batching, ordered acknowledgements, retry, rejection, backpressure and close."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.store.base import Point, RejectedPointsError, RetryableStoreError
from gateway.store.batcher import BatchWriter
from gateway.store.memory import MemoryStore
from gateway.store.spool import Spool

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


# -- with a spool


class FlakyStore(MemoryStore):
    """A MemoryStore that fails every write with a retryable error while `down`."""

    def __init__(self, down: bool = False) -> None:
        super().__init__()
        self.down = down
        self.calls: list[list[int]] = []
        self.failures = 0

    async def write(self, batch: Sequence[Point]) -> None:
        self.calls.append([int(p.fields["n"]) for p in batch])
        if self.down:
            self.failures += 1
            raise RetryableStoreError("connection refused")
        await super().write(batch)

    @property
    def stored(self) -> list[int]:
        return [int(p.fields["n"]) for p in self.points]


class GatedSpool(Spool):
    """A Spool whose segment writes wait for `gate` (on the worker thread) and can fail first."""

    def __init__(self, directory: Path, *, max_bytes: int = 1 << 30, failures: int = 0) -> None:
        super().__init__(directory, max_bytes=max_bytes)
        self.gate = threading.Event()
        self.gate.set()
        self.failures = failures

    def _write_sync(self, seq: int, data: bytes) -> None:
        self.gate.wait(5)
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        super()._write_sync(seq, data)


def fast_writer(store: MemoryStore, spool: Spool | None, **kwargs: Any) -> BatchWriter:
    options: dict[str, Any] = {
        "batch_size": 1,
        "flush_interval": 60,
        "retry_initial": 0.001,
        "retry_max": 0.01,
    }
    options.update(kwargs)
    return BatchWriter(store, spool=spool, **options)


def segments_on_disk(directory: Path) -> int:
    return len(list(directory.glob("*.seg")))


def prefill(directory: Path, *batches: list[Point]) -> None:
    async def body() -> None:
        spool = Spool(directory)
        await spool.open()
        for batch in batches:
            await spool.append(batch)
        await spool.close()

    run(body())


def test_a_healthy_store_is_written_directly_and_the_spool_stays_unused(tmp_path: Path) -> None:
    store = FlakyStore()
    spool = Spool(tmp_path)
    writer = fast_writer(store, spool)
    fired: list[int] = []

    async def body() -> None:
        writer.add(points(1), lambda: fired.append(1))
        writer.add(points(2), lambda: fired.append(2))
        await until(lambda: fired == [1, 2])

    run(running(writer, body))
    assert store.stored == [1, 2] and store.calls == [[1], [2]]
    assert spool.stats.spooled_batches == 0 and writer.spooled == 0
    assert not spool.is_open  # closed when run returned


def test_a_retryable_failure_spools_the_batch_and_acks_only_once_it_is_fsynced(tmp_path: Path) -> None:
    store = FlakyStore(down=True)
    spool = GatedSpool(tmp_path)
    writer = fast_writer(store, spool)
    fired: list[tuple[str, int]] = []

    async def body() -> None:
        spool.gate.clear()
        writer.add(points(1), lambda: fired.append(("a", segments_on_disk(tmp_path))))
        await until(lambda: store.failures >= 1 and spool._reserved > 0)
        await asyncio.sleep(0.05)
        assert fired == [] and writer.pending == 1  # the segment is not durable yet
        spool.gate.set()
        await until(lambda: fired != [])
        assert fired == [("a", 1)]  # the segment file existed when the ack went out
        assert writer.pending == 0 and store.stored == []
        assert (spool.stats.batches, spool.stats.points) == (1, 1)
        store.down = False
        await until(lambda: spool.empty)

    run(running(writer, body))
    assert store.stored == [1]
    assert (writer.written, writer.spooled, writer.drained) == (1, 1, 1)
    assert segments_on_disk(tmp_path) == 0


def test_batches_keep_their_order_through_the_spool(tmp_path: Path) -> None:
    store = FlakyStore(down=True)
    spool = Spool(tmp_path)
    writer = fast_writer(store, spool)
    fired: list[int] = []

    async def body() -> None:
        for n in range(1, 6):
            writer.add(points(n), partial(fired.append, n))
        await until(lambda: fired == [1, 2, 3, 4, 5])  # all acked while the store is down
        assert store.stored == [] and spool.stats.batches == 5
        store.down = False
        for n in range(6, 9):  # the spool is not empty: these queue behind it even though the store is up
            writer.add(points(n), partial(fired.append, n))
        await until(lambda: spool.empty and writer.pending == 0)

    run(running(writer, body))
    assert fired == list(range(1, 9))
    assert store.stored == list(range(1, 9))
    successful = [call for call in store.calls if call[0] in store.stored]
    assert store.calls[-8:] == [[n] for n in range(1, 9)] and len(successful) >= 8
    assert spool.stats.spooled_batches >= 5 and spool.stats.drained_batches == spool.stats.spooled_batches


def test_the_drain_backs_off_exponentially_with_jitter(tmp_path: Path) -> None:
    errors = [RetryableStoreError(f"down {n}") for n in range(5)]
    store = ScriptedStore(errors)
    sleep = FakeSleep()
    writer = BatchWriter(
        store,
        spool=Spool(tmp_path),
        batch_size=1,
        flush_interval=60,
        retry_initial=0.5,
        retry_max=4.0,
        sleep=sleep,
        jitter=lambda: 0.0,
    )

    async def body() -> None:
        writer.add(points(1))
        await until(lambda: store.stored == [1])

    run(running(writer, body))
    # the direct write fails and spools at once; the drain then fails 4 times and sleeps between
    assert sleep.delays == [0.25, 0.5, 1.0, 2.0]
    assert writer.retries == 5 and writer.last_error == "down 4"


def test_an_existing_spool_drains_before_newer_batches(tmp_path: Path) -> None:
    prefill(tmp_path, points(1, 2), points(3))
    store = ScriptedStore()
    spool = Spool(tmp_path)
    writer = fast_writer(store, spool, batch_size=10, flush_interval=0.01)

    async def body() -> None:
        store.permits = asyncio.Semaphore(0)  # the store takes nothing until the new batch is in
        writer.add(points(4, 5))
        await until(lambda: spool.stats.spooled_batches == 1)
        assert store.stored == [] and spool.stats.batches == 3
        for _ in range(3):
            store.permits.release()
        await until(lambda: store.stored == [1, 2, 3, 4, 5])

    run(running(writer, body))
    assert store.calls == [[1, 2], [3], [4, 5]]
    assert spool.stats.recovered_batches == 2 and spool.stats.drained_points == 5


def test_points_refused_during_the_drain_go_to_on_rejected(tmp_path: Path) -> None:
    bad = Point("m", (), {"n": float("nan")}, 2.0)
    prefill(tmp_path, [*points(1), bad, *points(3)], points(4))
    store = MemoryStore()
    seen: list[RejectedPointsError] = []
    spool = Spool(tmp_path)
    writer = BatchWriter(store, spool=spool, on_rejected=seen.append)

    async def body() -> None:
        await until(lambda: spool.is_open and spool.empty)

    run(running(writer, body))
    assert [[repr(p) for p in err.rejected] for err in seen] == [[repr(bad)]]  # NaN != NaN
    assert (writer.written, writer.rejected, writer.drained) == (3, 1, 4)
    assert sorted(int(p.fields["n"]) for p in store.points) == [1, 3, 4]
    assert segments_on_disk(tmp_path) == 0


def test_a_full_spool_holds_the_batch_unacknowledged_until_the_drain_makes_room(tmp_path: Path) -> None:
    from gateway.store.spool import encode_segment

    store = FlakyStore(down=True)
    spool = Spool(tmp_path, max_bytes=2 * len(encode_segment(points(1))))
    writer = fast_writer(store, spool, max_pending=2)
    fired: list[int] = []

    async def body() -> None:
        for n in range(1, 5):
            writer.add(points(n), partial(fired.append, n))
        await until(lambda: writer.spool_full_waits >= 1)
        await asyncio.sleep(0.05)
        assert fired == [1, 2]  # nothing dropped, nothing acked beyond what is on disk
        assert writer.pending == 2 and writer.is_full
        assert spool.stats.batches == 2 and spool.stats.bytes <= spool.max_bytes
        store.down = False
        await until(lambda: fired == [1, 2, 3, 4] and spool.empty)

    run(running(writer, body))
    assert store.stored == [1, 2, 3, 4]


def test_spool_write_errors_are_retried_and_nothing_is_acked_meanwhile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(down=True)
    spool = GatedSpool(tmp_path, failures=3)
    writer = fast_writer(store, spool)
    fired: list[int] = []

    async def body() -> None:
        writer.add(points(1), lambda: fired.append(1))
        await until(lambda: fired == [1])
        assert writer.spool_errors == 3
        store.down = False
        await until(lambda: store.stored == [1])

    run(running(writer, body))
    assert "No space left on device" in caplog.text


def test_points_the_spool_cannot_hold_are_refused_and_the_rest_spooled(tmp_path: Path) -> None:
    store = FlakyStore(down=True)
    seen: list[RejectedPointsError] = []
    writer = fast_writer(store, Spool(tmp_path), batch_size=3, on_rejected=seen.append)
    huge = Point("m", (), {"n": 10**5000}, 2.0)
    fired: list[str] = []

    async def body() -> None:
        writer.add([*points(1), huge, *points(3)], lambda: fired.append("acked"))
        await until(lambda: fired == ["acked"])
        store.down = False
        await until(lambda: store.stored == [1, 3])

    run(running(writer, body))
    assert [err.rejected for err in seen] == [[huge]] and "cannot be spooled" in seen[0].reason
    assert (writer.rejected, writer.spooled, writer.written) == (1, 2, 2)


def test_close_with_the_store_down_spools_everything_and_a_restart_drains_it(tmp_path: Path) -> None:
    store = FlakyStore(down=True)
    writer = fast_writer(store, Spool(tmp_path), batch_size=2)
    fired: list[str] = []

    async def body() -> None:
        writer.add(points(1, 2, 3), lambda: fired.append("x"))
        await until(lambda: store.failures >= 1)

    run(running(writer, body))
    assert fired == ["x"] and store.stored == [] and segments_on_disk(tmp_path) == 2

    store.down = False
    again = fast_writer(store, Spool(tmp_path))

    async def restarted() -> None:
        again.add(points(4))
        await until(lambda: store.stored == [1, 2, 3, 4])

    run(running(again, restarted))
    assert segments_on_disk(tmp_path) == 0


def test_close_without_a_run_loop_opens_and_closes_the_spool(tmp_path: Path) -> None:
    store = FlakyStore(down=True)
    spool = Spool(tmp_path)
    writer = fast_writer(store, spool)
    fired: list[str] = []

    async def body() -> None:
        writer.add(points(1, 2), lambda: fired.append("x"))
        await writer.close()

    run(body())
    assert fired == ["x"] and not spool.is_open and segments_on_disk(tmp_path) == 2


def test_a_corrupt_segment_is_skipped_and_counted_by_the_drain(tmp_path: Path) -> None:
    prefill(tmp_path, points(1), points(2), points(3))
    damaged = tmp_path / "0000000000000002.seg"
    data = bytearray(damaged.read_bytes())
    data[-2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    store = FlakyStore()
    spool = Spool(tmp_path)
    writer = fast_writer(store, spool)

    async def body() -> None:
        await until(lambda: spool.is_open and spool.empty)

    run(running(writer, body))
    assert store.stored == [1, 3]
    assert spool.stats.corrupt_segments == 1 and (tmp_path / "corrupt" / damaged.name).exists()


def test_a_locked_spool_stops_run_with_a_clear_error(tmp_path: Path) -> None:
    from gateway.store.spool import SpoolLockedError

    async def body() -> None:
        holder = Spool(tmp_path)
        await holder.open()
        try:
            with pytest.raises(SpoolLockedError, match="in use"):
                await fast_writer(MemoryStore(), Spool(tmp_path)).run()
        finally:
            await holder.close()

    run(body())
