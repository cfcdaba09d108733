"""tidegate end to end in a child process: the real `Gateway` into a timed store, until N points are in.

The store is wrapped by `TimingStore`, which notes, when the inner store's write returns, the time
and the (device, seq) of every telemetry point: that gives publish → stored latency (the payload's
`ts` is its publish time) and an exact loss and duplicate count. The measured window runs from the
first telemetry message tidegate receives to the write that completes the expected count; CPU time
(getrusage) and the stage profile cover that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import logging
import resource
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Literal

from bench.servers import rss_kb
from bench.stages import GC, StageSampler, cprofile_summary
from bench.workload import DEVICE_PREFIX, rule_files
from gateway.app import Gateway
from gateway.config import BatchSettings, MqttSettings, Settings
from gateway.records import TELEMETRY
from gateway.store.base import Point, Query, Row, Store
from rules import build_rule_set

Profile = Literal["sample", "cprofile", "none"]
_PREFIX = len(DEVICE_PREFIX)


@dataclass(frozen=True, slots=True)
class GatewayJob:
    """One tidegate run: where to connect, which store, how many telemetry points to wait for."""

    host: str
    port: int
    client_id: str
    protocol: str
    store: Literal["null", "influx"]
    expected: int
    idle_timeout: float
    batch_size: int
    flush_interval: float
    max_pending: int
    influx_url: str = ""
    database: str = ""
    profile: Profile = "sample"
    profile_path: str = ""
    windowed: bool = False
    latency: bool = False
    gc_freeze: bool = True  # as `tidegate run` does after start-up
    gc_threshold: tuple[int, ...] = ()  # what-if: gc.set_threshold(*gc_threshold); () keeps the default
    connect_timeout: float = 15.0


class TimingStore:
    """Wrap a store; after each successful write note the time and which telemetry points it held."""

    def __init__(self, inner: Store, expected: int) -> None:
        self.inner = inner
        self.expected = expected
        self.telemetry = 0
        self.other = 0
        self.keys: array[int] = array("q")
        self.latencies: array[float] = array("d")
        self.batches: list[tuple[float, int]] = []  # (time written, telemetry points so far)
        # per batch: this wrapper's own bookkeeping, and what runs after write() returns in the same
        # step of the writer task (the batcher's on_written callbacks: one PUBACK per message)
        self.record_ms: array[float] = array("d")
        self.after_write_ms: array[float] = array("d")
        self.done = asyncio.Event()

    async def write(self, points: Sequence[Point]) -> None:
        """Write through, then record; a failed write records nothing (the batcher retries it)."""
        await self.inner.write(points)
        now = time.time()
        started = time.perf_counter()
        keys, latencies = self.keys, self.latencies
        count = 0
        for point in points:
            if point.measurement == TELEMETRY:
                # telemetry points have exactly one tag, ("device", id); see gateway/records.py
                device = int(point.tags[0][1][_PREFIX:])
                keys.append((device << 32) | int(point.fields["seq"]))  # bench.workload.message_key
                latencies.append(now - point.ts)
                count += 1
        self.other += len(points) - count
        if count:
            self.telemetry += count
            self.batches.append((now, self.telemetry))
            if self.telemetry >= self.expected:
                self.done.set()
        returned = time.perf_counter()
        self.record_ms.append((returned - started) * 1000)
        after = self.after_write_ms
        asyncio.get_running_loop().call_soon(lambda: after.append((time.perf_counter() - returned) * 1000))

    async def query(self, query: Query) -> list[Row]:
        """Read through."""
        return await self.inner.query(query)

    async def close(self) -> None:
        """Close the inner store."""
        await self.inner.close()


def percentiles_ms(values: Sequence[float] | array[float]) -> dict[str, float]:
    """Return p50/p90/p99/p99.9/max/mean of seconds, in milliseconds (empty when there are none)."""
    if not values:
        return {}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * 1000.0

    return {
        "count": n,
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": ordered[-1] * 1000.0,
        "mean": sum(ordered) / n * 1000.0,
    }


class LoopLag:
    """Measure how late the event loop runs a timer: how long it was busy with something else."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.lags: array[float] = array("d")

    async def run(self) -> None:
        """Sleep `interval` over and over, noting each overshoot, until cancelled."""
        clock = time.perf_counter
        while True:
            expected = clock() + self.interval
            await asyncio.sleep(self.interval)
            self.lags.append(max(0.0, clock() - expected))


class GcPauses:
    """Time the cyclic garbage collector's runs, per generation (it stops the event loop while it runs)."""

    def __init__(self) -> None:
        self.pauses: dict[int, array[float]] = {0: array("d"), 1: array("d"), 2: array("d")}
        self.total_s = 0.0  # CPU time, for the stage profile (a pause's wall time may include preemption)
        self._started = 0.0
        self._started_cpu = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            self._started_cpu = time.process_time()
        else:
            self.total_s += time.process_time() - self._started_cpu
            self.pauses[info["generation"]].append((time.perf_counter() - self._started) * 1000)

    def summary(self) -> dict[str, dict[str, float]]:
        """Return count, total, p99 and max pause in ms per generation."""
        return {
            f"gen{generation}": spread_ms(values) | {"total": sum(values)}
            for generation, values in self.pauses.items()
            if values
        }


def spread_ms(values: Sequence[float] | array[float]) -> dict[str, float]:
    """Return mean, p99 and max of values already in milliseconds."""
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max": ordered[-1],
    }


def steady_batch_rate(batches: list[tuple[float, int]], expected: int) -> float:
    """Return points/s between the writes that pass 10 % and 90 % of `expected` (0 if too coarse)."""
    low = next(((t, c) for t, c in batches if c >= expected * 0.1), None)
    high = next(((t, c) for t, c in batches if c >= expected * 0.9), None)
    if low is None or high is None or high[0] <= low[0] or high[1] - low[1] < expected * 0.5:
        return 0.0
    return (high[1] - low[1]) / (high[0] - low[0])


def gateway_main(job: GatewayJob, ready: Event, conn: Connection) -> None:
    """Run tidegate for `job` and send its figures to the parent."""
    logging.basicConfig(level=logging.WARNING, format="gateway: %(levelname)s %(name)s: %(message)s")
    try:
        result = asyncio.run(_run(job, ready))
    except Exception as exc:  # reported to the parent
        result = {"error": f"{type(exc).__name__}: {exc}"}
    ready.set()
    conn.send(result)
    conn.close()


class _Window:
    """The measured window: opened by the first telemetry message, closed when all points are in."""

    def __init__(self, job: GatewayJob, gc_pauses: GcPauses) -> None:
        self.job = job
        self.gc_pauses = gc_pauses
        self.gc_at_open = 0.0
        self.first_at = 0.0
        self.start_usage: resource.struct_rusage | None = None
        self.rss_start_kb = 0
        self.sampler = StageSampler() if job.profile == "sample" else None
        self.profiler = cProfile.Profile() if job.profile == "cprofile" else None

    def open(self) -> None:
        self.first_at = time.time()
        self.gc_at_open = self.gc_pauses.total_s
        self.start_usage = resource.getrusage(resource.RUSAGE_SELF)
        self.rss_start_kb = rss_kb()
        if self.sampler is not None:
            self.sampler.start()
        if self.profiler is not None:
            self.profiler.enable()

    def close(self) -> dict[str, Any]:
        if self.sampler is not None:
            self.sampler.stop()
        if self.profiler is not None:
            self.profiler.disable()
        end = resource.getrusage(resource.RUSAGE_SELF)
        begin = self.start_usage or end
        figures: dict[str, Any] = {
            "first_at": self.first_at,
            "cpu_user_s": end.ru_utime - begin.ru_utime,
            "cpu_sys_s": end.ru_stime - begin.ru_stime,
            "rss_start_kb": self.rss_start_kb,
            "rss_peak_kb": end.ru_maxrss,
        }
        figures["cpu_s"] = figures["cpu_user_s"] + figures["cpu_sys_s"]
        figures["gc_s"] = self.gc_pauses.total_s - self.gc_at_open
        if self.sampler is not None:
            figures["profile"] = with_measured_gc(self.sampler.summary(), figures["gc_s"], figures["cpu_s"])
        if self.profiler is not None and self.job.profile_path:
            self.profiler.dump_stats(self.job.profile_path)
            figures["profile"] = cprofile_summary(self.job.profile_path)
            figures["profile"]["pstats_file"] = self.job.profile_path
        return figures


def with_measured_gc(profile: dict[str, Any], gc_s: float, cpu_s: float) -> dict[str, Any]:
    """Replace the sampled share of the garbage collector by the time gc.callbacks measured.

    Signals do not queue: however many SIGPROFs fall inside one 50 ms collection, Python handles one,
    so sampling undercounts long collections. The other stages keep their proportions.
    """
    stages: dict[str, float] = profile["stages"]
    sampled = stages.get(GC, 0.0)
    measured = min(gc_s / cpu_s, 1.0) if cpu_s > 0 else 0.0
    if sampled >= 1.0:
        return profile
    scale = (1.0 - measured) / (1.0 - sampled)
    adjusted = {stage: share * scale for stage, share in stages.items() if stage != GC}
    adjusted[GC] = measured
    profile["stages"] = {stage: adjusted[stage] for stage in [*stages, GC] if stage in adjusted}
    profile["gc_share_sampled"] = sampled
    profile["gc_share_measured"] = measured
    return profile


async def _run(job: GatewayJob, ready: Event) -> dict[str, Any]:
    inner: Store
    if job.store == "influx":
        from gateway.store.influx_v1 import InfluxV1Store

        inner = InfluxV1Store(job.influx_url, job.database, create_database=True)
    else:
        from gateway.store.memory import NullStore

        inner = NullStore()
    store = TimingStore(inner, job.expected)
    settings = Settings(
        mqtt=MqttSettings(
            url=f"mqtt://{job.host}:{job.port}",
            client_id=job.client_id,
            protocol="5" if job.protocol == "5" else "3.1.1",
        ),
        batch=BatchSettings(
            size=job.batch_size, flush_interval=job.flush_interval, max_pending=job.max_pending
        ),
        log_level="WARNING",
    )
    gateway = Gateway(settings, rule_set=build_rule_set(rule_files(job.windowed)), store=store)
    if job.gc_freeze:
        # as `tidegate run` (gateway/cli.py cmd_run) does once the gateway is built: what is alive
        # after start-up (modules, settings, compiled rules) stays out of every later collection
        gc.freeze()
    if job.gc_threshold:
        gc.set_threshold(*job.gc_threshold)
    gc_pauses = GcPauses()
    window = _Window(job, gc_pauses)
    ingest = gateway.ingest

    def first_message(message: Any) -> None:
        # Open the window on the first telemetry message, then get out of the way: deleting the
        # instance attribute puts the class's own on_message back for every later message.
        delattr(ingest, "on_message")
        window.open()
        ingest.on_message(message)

    setattr(ingest, "on_message", first_message)  # noqa: B010 (mypy refuses assigning to a method)
    stop = asyncio.Event()
    runner = asyncio.create_task(gateway.run(stop), name="gateway")
    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run(), name="loop-lag") if job.latency else None
    figures: dict[str, Any] = {}
    try:
        async with asyncio.timeout(job.connect_timeout):
            await gateway.mqtt.connected.wait()
        ready.set()
        with gc_pauses:
            await _until_done_or_idle(job, gateway, store, window)
        figures = window.close()
        figures["gc_pauses_ms"] = gc_pauses.summary()
        if lag_task is not None:
            lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
            figures["loop_lag_ms"] = spread_ms([value * 1000 for value in lag.lags])
        figures["commands_at_done"] = _outgoing(gateway)
        # Outside the window: let commands still queued in paho go out and their acks come back, so
        # the command counts say what a gateway that keeps running would deliver.
        figures["command_settle_s"] = await _settle_commands(gateway, job.idle_timeout)
    finally:
        stop.set()
        try:
            async with asyncio.timeout(30):
                await runner
        except TimeoutError:
            runner.cancel()
    last_at = store.batches[-1][0] if store.batches else 0.0
    first_at: float = figures.get("first_at", 0.0)
    distinct = len(set(store.keys))
    seconds = last_at - first_at if first_at else 0.0
    result: dict[str, Any] = {
        "received": gateway.snapshot()["received"],
        "stored": store.telemetry,
        "distinct": distinct,
        "lost": job.expected - distinct,
        "duplicates": store.telemetry - distinct,
        "other_points": store.other,
        "first_at": first_at,
        "last_at": last_at,
        "seconds": seconds,
        "rate": store.telemetry / seconds if seconds > 0 else 0.0,
        "steady_rate": steady_batch_rate(store.batches, job.expected),
        "batches": len(store.batches),
        "bench_record_ms_per_batch": spread_ms(store.record_ms),
        "after_write_ms_per_batch": spread_ms(store.after_write_ms),
        "snapshot": gateway.snapshot(),
        **figures,
    }
    if job.latency:
        result["stored_latency_ms"] = percentiles_ms(store.latencies)
    return result


def _outgoing(gateway: Gateway) -> dict[str, int]:
    """Return commands awaiting a device ack, and QoS 1 publishes paho still holds (sent or queued)."""
    client = getattr(gateway.mqtt, "_client", None)  # diagnostic only: paho's own outgoing queue
    held = getattr(client, "_out_messages", None)
    in_client = len(held) if held is not None else getattr(gateway.mqtt, "unconfirmed_publishes", -1)
    return {"awaiting_ack": gateway.commands.pending, "in_paho": in_client}


async def _settle_commands(gateway: Gateway, limit: float) -> float:
    """Wait until no command awaits a device ack (at most `limit` seconds); return how long it took."""
    started = time.monotonic()
    # CommandDispatcher has no "all acked" event to wait on; polling outside the window costs nothing.
    while gateway.commands.pending and time.monotonic() - started < limit:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _until_done_or_idle(job: GatewayJob, gateway: Gateway, store: TimingStore, window: _Window) -> None:
    """Return once every expected point is stored, or nothing moved for `idle_timeout` seconds."""
    progress = (-1, -1)
    quiet_since = time.monotonic()
    while not store.done.is_set():
        try:
            async with asyncio.timeout(0.05):
                await store.done.wait()
        except TimeoutError:
            pass
        now = (gateway.ingest.stats.received, store.telemetry)
        if now != progress:
            progress, quiet_since = now, time.monotonic()
        limit = job.idle_timeout if window.first_at else job.idle_timeout + job.connect_timeout
        if time.monotonic() - quiet_since > limit:
            logging.getLogger(__name__).warning(
                "gave up waiting: %d of %d points stored, nothing moved for %.0fs",
                store.telemetry,
                job.expected,
                limit,
            )
            return


def profile_path(directory: Path, name: str) -> str:
    """Return where a cProfile dump for run `name` goes."""
    return str(directory / f"{name}.pstats")
