"""The durable spool against a real InfluxDB 1.x that hangs, dies or stops under load, and a tidegate that crashes.

Every point is numbered `(device, seq)` with its own timestamp; afterwards the database is read back
and each device must hold every number exactly once. Each outage test runs its own `influxd` (the
session's is shared and must not be signalled).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.store.base import Point
from gateway.store.batcher import BatchWriter
from gateway.store.influx_v1 import InfluxV1Store
from gateway.store.spool import Spool
from tests.integration.influx_servers import InfluxDBServer, find_binary, free_port

pytestmark = pytest.mark.integration

T = TypeVar("T")
T0 = 1_700_000_000.0
DEVICES = 5
RATE = 500  # points per second, one point per message
TICK = 0.02
BEFORE, OUTAGE, AFTER = 2.0, 6.0, 2.0
MAX_PENDING = 2_000
BATCH = 200


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.fixture
def own_influxd(tmp_path: Path) -> Iterator[InfluxDBServer]:
    """Yield an influxd for this test alone, free to be paused, killed and restarted."""
    executable = find_binary("TIDEGATE_INFLUXD", "influxd", "/usr/bin/influxd")
    if executable is None:
        pytest.skip("influxd is not installed (apt-get install influxdb); CI installs it")
    with InfluxDBServer(executable, tmp_path / "influxdb") as server:
        yield server


def telemetry(n: int) -> Point:
    device, seq = f"d{n % DEVICES}", n // DEVICES
    return Point("outage", (("device", device),), {"seq": seq, "v": n / 3}, T0 + n * 0.001)


def read_back(server: InfluxDBServer, database: str) -> dict[str, list[int]]:
    """Return each device's seq values as stored (one per stored point)."""
    seqs: dict[str, list[int]] = {}
    for row in server.rows("SELECT seq FROM outage GROUP BY device", database):
        seqs.setdefault(row["device"], []).append(row["seq"])
    return seqs


def expected(points: int) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for n in range(points):
        seqs.setdefault(f"d{n % DEVICES}", []).append(n // DEVICES)
    return seqs


@dataclass
class Outcome:
    sent: int
    acked: list[int]
    max_pending: int
    max_spooled_batches: int
    max_spooled_bytes: int
    held: float  # seconds the load waited for the writer (the broker would have kept the messages)
    spool: Spool
    writer: BatchWriter


async def steady_load(
    server: InfluxDBServer,
    database: str,
    spool_dir: Path,
    fail: Callable[[], None],
    recover: Callable[[], None],
    max_bytes: int = 64 << 20,
    max_pending: int = MAX_PENDING,
) -> Outcome:
    """Send RATE points/s for BEFORE + OUTAGE + AFTER seconds, failing the store in the middle."""
    store = InfluxV1Store(server.url, database, timeout=1.0)
    spool = Spool(spool_dir, max_bytes=max_bytes)
    writer = BatchWriter(
        store,
        spool=spool,
        batch_size=BATCH,
        flush_interval=0.1,
        max_pending=max_pending,
        retry_initial=0.1,
        retry_max=1.0,
    )
    acked: list[int] = []
    sent = most_pending = most_batches = most_bytes = 0
    held = 0.0

    async def fault() -> None:
        await asyncio.sleep(BEFORE)
        await asyncio.to_thread(fail)
        await asyncio.sleep(OUTAGE)
        await asyncio.to_thread(recover)  # a restart blocks until influxd answers

    async def load() -> None:
        nonlocal sent, held
        loop = asyncio.get_running_loop()
        end = loop.time() + BEFORE + OUTAGE + AFTER
        per_tick = int(RATE * TICK)
        while loop.time() < end:
            for _ in range(per_tick):
                if writer.is_full:  # what the ingest does: stop reading, the broker keeps the rest
                    waited = loop.time()
                    try:
                        async with asyncio.timeout_at(end):
                            await writer.wait_until_not_full()
                    except TimeoutError:
                        return
                    finally:
                        held += loop.time() - waited
                n = sent
                writer.add([telemetry(n)], partial(acked.append, n))
                sent += 1
            await asyncio.sleep(TICK)

    async def monitor() -> None:
        nonlocal most_pending, most_batches, most_bytes
        while True:
            most_pending = max(most_pending, writer.pending)
            most_batches = max(most_batches, spool.stats.batches)
            most_bytes = max(most_bytes, spool.stats.bytes)
            await asyncio.sleep(0.01)

    try:
        async with asyncio.TaskGroup() as group:
            running = group.create_task(writer.run())
            watching = group.create_task(monitor())
            faulting = group.create_task(fault())
            await load()
            await faulting
            deadline = time.monotonic() + 20
            while not (spool.is_open and spool.empty and writer.pending == 0 and len(acked) == sent):
                assert time.monotonic() < deadline, f"spool still holds {spool.stats}"
                await asyncio.sleep(0.05)
            await writer.close()
            await running
            watching.cancel()
    finally:
        await store.close()
    return Outcome(sent, acked, most_pending, most_batches, most_bytes, held, spool, writer)


@pytest.mark.parametrize("fault", ["hung", "killed", "stopped"])
def test_every_point_arrives_exactly_once_through_an_outage(
    own_influxd: InfluxDBServer, tmp_path: Path, fault: str
) -> None:
    server = own_influxd
    database = server.create_database("outage")
    process = server.process
    fail, recover = {
        "hung": (process.pause, process.resume),  # SIGSTOP: connections open, nothing answers
        "killed": (process.kill, process.start),  # SIGKILL, then the same ports and data
        "stopped": (process.stop, process.start),  # SIGTERM
    }[fault]

    outcome = run(steady_load(server, database, tmp_path / "spool", fail, recover))

    assert outcome.sent >= RATE * (BEFORE + OUTAGE + AFTER) * 0.8
    assert outcome.acked == list(range(outcome.sent))  # every message acked, in arrival order
    stats = outcome.spool.stats
    assert outcome.max_spooled_batches >= 5, "the spool should have taken the outage"
    assert stats.spooled_points > 0 and stats.drained_points == stats.spooled_points
    assert (stats.batches, stats.bytes, stats.corrupt_segments) == (0, 0, 0)
    assert not list((tmp_path / "spool").glob("*.seg*"))
    assert outcome.max_pending <= MAX_PENDING  # memory stayed bounded
    assert outcome.writer.written == outcome.sent and outcome.writer.rejected == 0
    stored = read_back(server, database)
    assert {device: sorted(seqs) for device, seqs in stored.items()} == expected(outcome.sent)


CHILD = """
import asyncio, sys
from gateway.store.base import Point
from gateway.store.batcher import BatchWriter
from gateway.store.influx_v1 import InfluxV1Store
from gateway.store.spool import Spool

url, spool_dir, first = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    writer = BatchWriter(
        InfluxV1Store(url, "nowhere", timeout=0.5), spool=Spool(spool_dir),
        batch_size=50, flush_interval=0.02, retry_initial=0.05, retry_max=0.2,
    )
    def acked(n):
        sys.stdout.write(f"{n}\\n")
        sys.stdout.flush()
    async with asyncio.TaskGroup() as group:
        group.create_task(writer.run())
        n = first
        while True:
            for _ in range(25):
                writer.add([Point("crash", (("device", "d"),), {"seq": n}, 1_700_000_000 + n / 1000)],
                           lambda n=n: acked(n))
                n += 1
            await asyncio.sleep(0.005)

asyncio.run(main())
"""


def crash_after_acks(url: str, spool_dir: Path, first: int, acks: int) -> list[int]:
    """Run a writer in a child process until it acked `acks` points, SIGKILL it, return what it acked."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(spool_dir), str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acked: list[int] = []
    assert child.stdout is not None
    with child.stdout:
        try:
            deadline = time.monotonic() + 15
            while len(acked) < acks:
                line = child.stdout.readline()
                assert line, f"the child exited with {child.poll()} after {len(acked)} acks"
                acked.append(int(line))
                assert time.monotonic() < deadline
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        # acks written before the kill but not yet read
        acked += [int(line) for line in child.stdout.read().split()]
    return acked


def test_what_a_crashed_tidegate_acked_from_its_spool_reaches_the_store(
    influxdb_v1: InfluxDBServer, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    dead_url = f"http://127.0.0.1:{free_port()}"  # the store is down while the child runs
    acked: list[int] = []
    for round_ in range(3):  # crash, restart over the same spool, crash again
        acked += crash_after_acks(dead_url, spool_dir, round_ * 1_000_000, 800 + 300 * round_)
    assert len(acked) == len(set(acked))

    database = influxdb_v1.create_database("crash")

    async def drain() -> Spool:
        spool = Spool(spool_dir)
        store = InfluxV1Store(influxdb_v1.url, database)
        writer = BatchWriter(store, spool=spool)
        try:
            async with asyncio.TaskGroup() as group:
                running = group.create_task(writer.run())
                deadline = time.monotonic() + 20
                while not (spool.is_open and spool.empty):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                await writer.close()
                await running
        finally:
            await store.close()
        return spool

    spool = run(drain())
    assert spool.stats.corrupt_segments == 0 and spool.stats.recovered_points >= len(acked)
    stored = [row["seq"] for row in influxdb_v1.rows("SELECT seq FROM crash", database)]
    assert len(stored) == len(set(stored))
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acked points lost, e.g. {sorted(missing)[:5]}"
    # stored but never acked is fine: the broker would have delivered those again


def test_a_full_spool_stops_acking_and_loses_nothing(own_influxd: InfluxDBServer, tmp_path: Path) -> None:
    server = own_influxd
    database = server.create_database("full")
    # ~575 points in the spool and 500 in memory hold about 2 s of the 6 s outage
    max_bytes, max_pending = 32 << 10, 500
    process = server.process
    outcome = run(
        steady_load(server, database, tmp_path / "spool", process.kill, process.start, max_bytes, max_pending)
    )

    assert outcome.writer.spool_full_waits >= 1
    assert outcome.held >= 2.0, f"the load was held back for only {outcome.held:.1f}s"
    assert outcome.max_pending <= max_pending  # memory stayed bounded
    assert outcome.max_spooled_bytes <= max_bytes
    assert outcome.acked == list(range(outcome.sent))
    stats = outcome.spool.stats
    assert stats.drained_points == stats.spooled_points and stats.batches == 0
    stored = read_back(server, database)
    assert {device: sorted(seqs) for device, seqs in stored.items()} == expected(outcome.sent)
