"""BatchWriter.current_hand_off: each callback learns whether its points were stored, spooled or refused."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gateway.store.base import Point, RetryableStoreError
from gateway.store.batcher import BatchWriter, HandOff
from gateway.store.memory import MemoryStore
from gateway.store.spool import Spool
from tests.unit.store.test_batcher import fast_writer, points, run, running, until

BAD = Point("m", (), {"n": float("nan")}, 99.0)  # MemoryStore refuses it like InfluxDB would


class FailingCalls(MemoryStore):
    """Fail the write calls whose number (from 1) is in `failing` with a retryable error."""

    def __init__(self, failing: set[int]) -> None:
        super().__init__()
        self.failing = failing
        self.calls = 0

    async def write(self, batch: Sequence[Point]) -> None:
        self.calls += 1
        if self.calls in self.failing:
            raise RetryableStoreError("down for this call")
        await super().write(batch)


class DownStore(MemoryStore):
    """Fail every write with a retryable error while `down`."""

    def __init__(self, down: bool) -> None:
        super().__init__()
        self.down = down

    async def write(self, batch: Sequence[Point]) -> None:
        if self.down:
            raise RetryableStoreError("down")
        await super().write(batch)


def recorder(writer: BatchWriter, outcomes: dict[str, HandOff], name: str) -> object:
    def record() -> None:
        outcomes[name] = writer.current_hand_off

    return record


def add(writer: BatchWriter, outcomes: dict[str, HandOff], name: str, batch: list[Point]) -> None:
    writer.add(batch, recorder(writer, outcomes, name))  # type: ignore[arg-type]


def test_a_refused_point_marks_only_the_callback_it_belongs_to() -> None:
    writer = BatchWriter(MemoryStore(), batch_size=3, flush_interval=0.01)
    outcomes: dict[str, HandOff] = {}

    async def body() -> None:
        add(writer, outcomes, "a", points(1, 2))
        add(writer, outcomes, "b", [*points(3), BAD])  # straddles the first and second batch
        add(writer, outcomes, "c", points(5, 6))
        writer.add(points(7))  # no callback: its refusal must not leak to a later one
        add(writer, outcomes, "d", points(8))
        await until(lambda: len(outcomes) == 4)

    run(running(writer, body))
    assert outcomes == {"a": HandOff.STORED, "b": HandOff.REFUSED, "c": HandOff.STORED, "d": HandOff.STORED}


def test_a_callback_whose_points_straddle_a_stored_and_a_spooled_batch_counts_as_spooled(
    tmp_path: Path,
) -> None:
    store = FailingCalls({2})
    writer = fast_writer(store, Spool(tmp_path), batch_size=2)
    outcomes: dict[str, HandOff] = {}

    async def body() -> None:
        add(writer, outcomes, "a", points(1))
        add(writer, outcomes, "b", points(2, 3))  # 2 in the stored batch, 3 in the spooled one
        add(writer, outcomes, "none", [])  # no points inside the spooled batch: nothing was spooled
        add(writer, outcomes, "c", points(4))
        await until(lambda: len(outcomes) == 4)
        await until(lambda: writer.spool is not None and writer.spool.empty)
        add(writer, outcomes, "after", points(5, 6))  # drained: straight to the store again
        await until(lambda: "after" in outcomes)

    run(running(writer, body))
    assert outcomes == {
        "a": HandOff.STORED,
        "b": HandOff.SPOOLED,
        "none": HandOff.STORED,
        "c": HandOff.SPOOLED,
        "after": HandOff.STORED,
    }
    assert sorted(int(p.fields["n"]) for p in store.points) == [1, 2, 3, 4, 5, 6]


def test_a_refusal_while_draining_does_not_touch_later_callbacks(tmp_path: Path) -> None:
    store = DownStore(down=True)
    writer = fast_writer(store, Spool(tmp_path), batch_size=2)
    outcomes: dict[str, HandOff] = {}

    async def body() -> None:
        add(writer, outcomes, "spooled", [*points(1), BAD])
        await until(lambda: "spooled" in outcomes)
        store.down = False
        await until(lambda: writer.spool is not None and writer.spool.empty)
        add(writer, outcomes, "later", points(3, 4))
        await until(lambda: "later" in outcomes)

    run(running(writer, body))
    # the message was acked as spooled; the refusal found later goes to on_rejected and the counters
    assert outcomes == {"spooled": HandOff.SPOOLED, "later": HandOff.STORED}
    assert writer.rejected == 1


def test_points_the_spool_cannot_hold_make_their_callback_refused(tmp_path: Path) -> None:
    writer = fast_writer(DownStore(down=True), Spool(tmp_path), batch_size=4)
    outcomes: dict[str, HandOff] = {}
    huge = Point("m", (), {"n": 10**5000}, 2.0)

    async def body() -> None:
        add(writer, outcomes, "a", points(1))
        add(writer, outcomes, "b", [huge])
        add(writer, outcomes, "c", points(3, 4))
        await until(lambda: len(outcomes) == 3)

    run(running(writer, body))
    assert outcomes == {"a": HandOff.SPOOLED, "b": HandOff.REFUSED, "c": HandOff.SPOOLED}


def test_what_is_remembered_stays_bounded() -> None:
    writer = BatchWriter(MemoryStore(), batch_size=2, flush_interval=0.01)
    outcomes: dict[str, HandOff] = {}

    async def body() -> None:
        for _ in range(200):
            writer.add([BAD])  # refusals with no callback waiting for them
        add(writer, outcomes, "last", points(1))
        await until(lambda: "last" in outcomes)

    run(running(writer, body))
    assert outcomes == {"last": HandOff.STORED}
    assert not writer._refused_at and not writer._spooled_ranges
