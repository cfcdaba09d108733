"""Spool: segment format, FIFO order across restarts, torn and corrupt segments, the byte cap, threads."""

from __future__ import annotations

import asyncio
import math
import os
import struct
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store.base import Point
from gateway.store.spool import (
    CorruptSegmentError,
    Spool,
    SpoolFullError,
    SpoolLockedError,
    UnspoolablePointsError,
    decode_segment,
    encode_segment,
)

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def points(*numbers: int) -> list[Point]:
    return [Point("m", (("device", "d"),), {"n": n}, float(n)) for n in numbers]


def numbers(batch: list[Point]) -> list[int]:
    return [int(p.fields["n"]) for p in batch]


def same_value(a: object, b: object) -> bool:
    """Equal with the same type; floats compared by repr (-0.0 and NaN included)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


def same_points(a: list[Point], b: list[Point]) -> bool:
    return len(a) == len(b) and all(
        x.measurement == y.measurement
        and x.tags == y.tags
        and type(x.tags) is type(y.tags)
        and same_value(x.ts, y.ts)
        and list(x.fields) == list(y.fields)
        and all(same_value(x.fields[k], y.fields[k]) for k in x.fields)
        for x, y in zip(a, b, strict=True)
    )


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.seg"))


def spool_files(directory: Path) -> list[str]:
    """Segments and temporary files."""
    return sorted(p.name for p in directory.glob("*.seg*"))


async def drain_all(spool: Spool) -> list[list[int]]:
    batches = []
    while (segment := await spool.oldest()) is not None:
        batches.append(numbers(segment.points))
        await spool.remove(segment)
    return batches


ALL_TYPES = [
    Point(
        "telemetry",
        (("device", "d-1"), ("site", 'nörth "x"\n,=\\')),
        {
            "f": 21.5,
            "whole_float": 3.0,
            "neg_zero": -0.0,
            "tiny": 5e-324,
            "big_float": 1.7976931348623157e308,
            "i": 42,
            "neg": -(2**63),
            "big_int": 2**64 + 1,
            "t": True,
            "no": False,
            "s": "line\nbreak \u2603 \ud800 \x00",
            "empty": "",
            "digits": "12",
        },
        1_700_000_000.123456,
    ),
    Point("m", (), {"nan": math.nan, "inf": math.inf, "ninf": -math.inf}, 0.0),
    Point("int_ts", (), {"x": 1}, 5),  # an int ts must stay an int
]


def test_every_field_type_round_trips_exactly() -> None:
    decoded = decode_segment(encode_segment(ALL_TYPES))
    assert same_points(decoded, ALL_TYPES)
    assert type(decoded[0].fields["whole_float"]) is float and type(decoded[0].fields["t"]) is bool
    assert type(decoded[2].ts) is int


field_values = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=())),
    st.integers(),
    st.floats(),
    st.booleans(),
)
names = st.text(st.characters(exclude_categories=()), max_size=20)
point_strategy = st.builds(
    Point,
    measurement=names,
    tags=st.lists(st.tuples(names, names), max_size=4).map(tuple),
    fields=st.dictionaries(names, field_values, min_size=1, max_size=6),
    ts=st.floats() | st.integers(-(2**63), 2**63),
)


@settings(deadline=None)
@given(st.lists(point_strategy, max_size=20))
def test_the_segment_format_round_trips(batch: list[Point]) -> None:
    data = encode_segment(batch)
    assert same_points(decode_segment(data), batch)


@settings(deadline=None)
@given(st.lists(point_strategy, min_size=1, max_size=5), st.data())
def test_any_single_byte_change_or_truncation_is_detected(batch: list[Point], data: st.DataObject) -> None:
    encoded = encode_segment(batch)
    position = data.draw(st.integers(0, len(encoded) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = bytearray(encoded)
    changed[position] ^= flip
    with pytest.raises(CorruptSegmentError):
        decode_segment(bytes(changed))
    with pytest.raises(CorruptSegmentError, match="torn"):
        decode_segment(encoded[: data.draw(st.integers(0, len(encoded) - 1))])


def test_integers_beyond_the_conversion_limit_are_named() -> None:
    huge = Point("m", (), {"n": 10**5000}, 1.0)
    with pytest.raises(UnspoolablePointsError) as caught:
        encode_segment([*points(1), huge, *points(3)])
    assert caught.value.points == [huge]


def test_batches_come_back_in_order_across_restarts(tmp_path: Path) -> None:
    async def first() -> None:
        spool = Spool(tmp_path)
        await spool.open()
        for n in range(1, 4):
            await spool.append(points(n, n * 10))
        segment = await spool.oldest()
        assert segment is not None and numbers(segment.points) == [1, 10]
        await spool.remove(segment)
        await spool.close()

    async def second() -> list[list[int]]:
        spool = Spool(tmp_path)
        await spool.open()
        assert (spool.stats.batches, spool.stats.points, spool.stats.recovered_batches) == (2, 4, 2)
        await spool.append(points(4))  # numbered after the recovered ones
        batches = await drain_all(spool)
        assert spool.empty and spool.stats.bytes == 0
        await spool.close()
        return batches

    run(first())
    assert run(second()) == [[2, 20], [3, 30], [4]]
    assert segment_files(tmp_path) == []


def test_counters_follow_appends_and_removals(tmp_path: Path) -> None:
    async def body() -> None:
        spool = Spool(tmp_path)
        await spool.open()
        size = await spool.append(points(1, 2, 3))
        await spool.append(points(4))
        stats = spool.stats
        assert (stats.batches, stats.points, stats.spooled_batches, stats.spooled_points) == (2, 4, 2, 4)
        assert stats.bytes == size + (tmp_path / "0000000000000002.seg").stat().st_size
        await drain_all(spool)
        assert (stats.batches, stats.points, stats.bytes) == (0, 0, 0)
        assert (stats.drained_batches, stats.drained_points, stats.corrupt_segments) == (2, 4, 0)
        await spool.close()

    run(body())


def write_segments(directory: Path, *batches: list[Point]) -> None:
    async def body() -> None:
        spool = Spool(directory)
        await spool.open()
        for batch in batches:
            await spool.append(batch)
        await spool.close()

    run(body())


def test_a_torn_segment_is_moved_aside_at_startup_and_the_others_drain(tmp_path: Path) -> None:
    write_segments(tmp_path, points(1), points(2), points(3))
    torn = tmp_path / "0000000000000002.seg"
    torn.write_bytes(torn.read_bytes()[:-5])
    (tmp_path / "0000000000000004.seg").write_bytes(b"TG")  # shorter than a header
    (tmp_path / "0000000000000005.seg").write_bytes(b"XXXX" + bytes(12))  # not a segment

    async def body() -> list[list[int]]:
        spool = Spool(tmp_path)
        await spool.open()
        assert spool.stats.corrupt_segments == 3 and spool.stats.batches == 2
        batches = await drain_all(spool)
        await spool.close()
        return batches

    assert run(body()) == [[1], [3]]
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [
        "0000000000000002.seg",
        "0000000000000004.seg",
        "0000000000000005.seg",
    ]


def test_a_corrupt_segment_is_moved_aside_when_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_segments(tmp_path, points(1), points(2), points(3))
    damaged = tmp_path / "0000000000000002.seg"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x01  # same size, so only the CRC can tell
    damaged.write_bytes(bytes(data))

    async def body() -> list[list[int]]:
        spool = Spool(tmp_path)
        await spool.open()
        assert spool.stats.corrupt_segments == 0 and spool.stats.batches == 3
        batches = await drain_all(spool)
        assert spool.stats.corrupt_segments == 1 and spool.stats.bytes == 0
        await spool.close()
        return batches

    assert run(body()) == [[1], [3]]
    assert (tmp_path / "corrupt" / "0000000000000002.seg").read_bytes() == bytes(data)
    assert "CRC mismatch" in caplog.text and "1 point(s) not drained" in caplog.text


def test_a_quarantined_name_that_exists_already_gets_a_suffix(tmp_path: Path) -> None:
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "0000000000000001.seg").write_bytes(b"older")
    (tmp_path / "0000000000000001.seg").write_bytes(b"junk")

    async def body() -> None:
        spool = Spool(tmp_path)
        await spool.open()
        await spool.close()

    run(body())
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [
        "0000000000000001.seg",
        "0000000000000001.seg.1",
    ]


def test_incomplete_writes_are_removed_at_startup(tmp_path: Path) -> None:
    write_segments(tmp_path, points(1))
    (tmp_path / "0000000000000002.seg.tmp").write_bytes(b"half a segm")

    async def body() -> None:
        spool = Spool(tmp_path)
        await spool.open()
        assert spool.stats.temp_files_removed == 1 and spool.stats.corrupt_segments == 0
        assert await drain_all(spool) == [[1]]
        await spool.close()

    run(body())
    assert not list(tmp_path.glob("*.tmp"))


def test_max_bytes_is_respected_and_room_wakes_the_writer(tmp_path: Path) -> None:
    size = len(encode_segment(points(1)))

    async def body() -> None:
        spool = Spool(tmp_path, max_bytes=3 * size)
        await spool.open()
        for n in range(3):
            await spool.append(points(n))
        with pytest.raises(SpoolFullError) as caught:
            await spool.append(points(9))
        assert (caught.value.used, caught.value.max_bytes) == (3 * size, 3 * size)
        assert spool.stats.batches == 3 and spool.stats.bytes == 3 * size
        assert len(segment_files(tmp_path)) == 3  # nothing written for the refused batch
        waiter = asyncio.create_task(spool.wait_for_room())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        segment = await spool.oldest()
        assert segment is not None
        await spool.remove(segment)
        await asyncio.wait_for(waiter, 1)
        await spool.append(points(9))
        assert spool.stats.bytes == 3 * size
        await spool.close()

    run(body())


def test_an_empty_spool_takes_one_segment_bigger_than_max_bytes(tmp_path: Path) -> None:
    async def body() -> None:
        spool = Spool(tmp_path, max_bytes=10)
        await spool.open()
        await spool.append(points(1, 2, 3))
        with pytest.raises(SpoolFullError):
            await spool.append(points(4))
        await spool.close()

    run(body())


def test_a_second_spool_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        first = Spool(tmp_path)
        await first.open()
        second = Spool(tmp_path)
        with pytest.raises(SpoolLockedError):
            await second.open()
        assert not second.is_open
        await first.close()
        await second.open()  # released on close
        await second.close()

    run(body())


def test_a_failed_write_leaves_no_file_and_no_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            real_fsync(fd)
            return
        raise OSError(28, "No space left on device")

    async def body() -> None:
        spool = Spool(tmp_path)
        await spool.open()
        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="No space"):
            await spool.append(points(1))
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert spool.empty and spool.stats.bytes == 0
        assert spool_files(tmp_path) == []
        await spool.append(points(2))
        assert await drain_all(spool) == [[2]]
        await spool.close()

    run(body())


def test_file_io_never_blocks_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With fsync made to take 100 ms, the event loop keeps running while each fsync waits.

    Counting loop iterations during each slow fsync proves where the I/O runs without depending on
    how busy the machine is; a lag bound would (a full garbage collection or a loaded CI runner
    stalls every thread, whichever one does the I/O).
    """
    real_fsync = os.fsync
    on_loop_thread: list[bool] = []
    beats_during_fsync: list[int] = []
    beats = 0

    def slow_fsync(fd: int) -> None:
        on_loop_thread.append(threading.current_thread() is threading.main_thread())
        before = beats
        time.sleep(0.1)
        beats_during_fsync.append(beats - before)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    big = [Point("m", (("device", f"d{n % 50}"),), {"n": n, "v": n / 7}, float(n)) for n in range(5000)]

    async def body() -> None:
        nonlocal beats
        spool = Spool(tmp_path)
        await spool.open()
        done = False

        async def heartbeat() -> None:
            nonlocal beats
            while not done:
                await asyncio.sleep(0.002)
                beats += 1

        beat = asyncio.create_task(heartbeat())
        for _ in range(3):
            await spool.append(big)
        while (segment := await spool.oldest()) is not None:
            await spool.remove(segment)
        done = True
        await beat
        await spool.close()

    run(body())
    assert len(on_loop_thread) == 6 and not any(on_loop_thread)  # a file and a directory fsync each
    assert min(beats_during_fsync) >= 3, beats_during_fsync


def test_the_header_layout_is_as_documented() -> None:
    data = encode_segment(points(7))
    magic, count, length = struct.unpack_from(">4sII", data)
    assert (magic, count, length) == (b"TGS1", 1, len(data) - 16)
    assert data[16:].startswith(b'[["m",[["device","d"]],{"n":7},7.0]]')
