"""BatchWriter.add_grouped: one call per run of items handed off together, in order, outcomes kept apart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import gateway.store.batcher as batcher_module
from gateway.store.batcher import BatchWriter, HandOff
from gateway.store.memory import MemoryStore
from gateway.store.spool import Spool
from tests.unit.store.test_batcher import points, run, running, until
from tests.unit.store.test_batcher_handoff import BAD, FailingCalls
from tests.unit.store.test_batcher_handoff import add as add_single

Calls = list[tuple[str, HandOff, list[int]]]


class Grouped:
    """Record each call as (callback name, current_hand_off, items) in one shared list."""

    def __init__(self, writer: BatchWriter, calls: Calls, name: str) -> None:
        self.writer, self.calls, self.name = writer, calls, name

    def __call__(self, items: list[int]) -> None:
        self.calls.append((self.name, self.writer.current_hand_off, list(items)))


def test_items_handed_off_in_one_batch_come_in_one_call_in_order() -> None:
    writer = BatchWriter(MemoryStore(), batch_size=4, flush_interval=60)
    calls: Calls = []
    acks = Grouped(writer, calls, "acks")

    async def body() -> None:
        writer.add_grouped(points(1), acks, 1)
        writer.add_grouped(points(2, 3), acks, 2)
        writer.add_grouped([], acks, 3)  # no points: waits behind the others all the same
        assert calls == []
        writer.add_grouped(points(4), acks, 4)  # fills the batch
        await until(lambda: len(calls) == 1)
        writer.add_grouped(points(5), acks, 5)  # waits for the next batch (written by close)

    run(running(writer, body))
    assert calls == [("acks", HandOff.STORED, [1, 2, 3, 4]), ("acks", HandOff.STORED, [5])]


def test_an_item_with_nothing_pending_is_reported_at_once() -> None:
    writer = BatchWriter(MemoryStore(), batch_size=4, flush_interval=60)
    calls: Calls = []
    writer.add_grouped([], Grouped(writer, calls, "acks"), 7)
    assert calls == [("acks", HandOff.STORED, [7])]


def test_add_callbacks_and_other_groups_split_the_lists_and_keep_the_order() -> None:
    writer = BatchWriter(MemoryStore(), batch_size=6, flush_interval=60)
    calls: Calls = []
    acks, other = Grouped(writer, calls, "acks"), Grouped(writer, calls, "other")

    async def body() -> None:
        writer.add_grouped(points(1), acks, 1)
        writer.add_grouped(points(2), acks, 2)
        writer.add(points(3), lambda: calls.append(("single", writer.current_hand_off, [])))
        writer.add_grouped(points(4), acks, 4)
        writer.add_grouped(points(5), other, 5)
        writer.add_grouped(points(6), acks, 6)
        await until(lambda: len(calls) == 5)

    run(running(writer, body))
    assert calls == [
        ("acks", HandOff.STORED, [1, 2]),
        ("single", HandOff.STORED, []),
        ("acks", HandOff.STORED, [4]),
        ("other", HandOff.STORED, [5]),
        ("acks", HandOff.STORED, [6]),
    ]


def test_a_refused_point_splits_its_item_out_with_its_own_outcome() -> None:
    writer = BatchWriter(MemoryStore(), batch_size=5, flush_interval=0.01)
    calls: Calls = []
    acks = Grouped(writer, calls, "acks")

    async def body() -> None:
        writer.add_grouped(points(1), acks, 1)
        writer.add_grouped(points(2), acks, 2)
        writer.add_grouped([*points(3), BAD], acks, 3)
        writer.add_grouped(points(5), acks, 5)
        await until(lambda: len(calls) == 3)

    run(running(writer, body))
    assert calls == [
        ("acks", HandOff.STORED, [1, 2]),
        ("acks", HandOff.REFUSED, [3]),
        ("acks", HandOff.STORED, [5]),
    ]


def test_items_straddling_a_spooled_batch_count_as_spooled_like_add_callbacks(tmp_path: Path) -> None:
    store = FailingCalls({2})
    writer = BatchWriter(store, batch_size=2, flush_interval=60, spool=Spool(tmp_path), retry_initial=0.001)
    calls: Calls = []
    singles: dict[str, HandOff] = {}
    acks = Grouped(writer, calls, "acks")

    async def body() -> None:
        writer.add_grouped(points(1), acks, 1)
        writer.add_grouped(points(2, 3), acks, 2)  # 2 in the stored batch, 3 in the spooled one
        add_single(writer, singles, "none", [])  # no points inside the spooled batch: stored
        writer.add_grouped(points(4), acks, 4)
        await until(lambda: len(calls) == 3)
        await until(lambda: writer.spool is not None and writer.spool.empty)  # close does not drain

    run(running(writer, body))
    assert calls == [
        ("acks", HandOff.STORED, [1]),
        ("acks", HandOff.SPOOLED, [2]),
        ("acks", HandOff.SPOOLED, [4]),
    ]
    assert singles == {"none": HandOff.STORED}
    assert sorted(int(p.fields["n"]) for p in store.points) == [1, 2, 3, 4]


def test_a_big_batch_makes_its_callbacks_over_several_loop_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "CALLBACKS_PER_TURN", 2)
    writer = BatchWriter(MemoryStore(), batch_size=6, flush_interval=60)
    calls: Calls = []
    acks = Grouped(writer, calls, "acks")
    turns: list[int] = []  # len(calls) each time another task got the loop

    async def watch() -> None:
        while True:
            turns.append(len(calls))
            await asyncio.sleep(0)

    async def body() -> None:
        watcher = asyncio.create_task(watch())
        for n in (1, 2, 3):
            writer.add_grouped(points(n), acks, n)
        writer.add(points(4), lambda: calls.append(("single", writer.current_hand_off, [])))
        writer.add_grouped(points(5), acks, 5)
        writer.add_grouped(points(6), acks, 6)  # fills the batch
        await until(lambda: len(calls) == 4)
        watcher.cancel()

    run(running(writer, body))
    assert calls == [
        ("acks", HandOff.STORED, [1, 2]),
        ("acks", HandOff.STORED, [3]),
        ("single", HandOff.STORED, []),
        ("acks", HandOff.STORED, [5, 6]),
    ]
    assert {1, 3} <= set(turns)  # the loop ran other tasks after each chunk of two callbacks
