"""S3 soak (opt-in): hours at twice the normal rate with random faults; nothing lost, nothing leaks.

Run it with (the seed is printed; set it to replay the same fault sequence):

    TIDEGATE_SOAK_SECONDS=600 python3 -m pytest -m soak tests/integration/test_soak.py -s
    TIDEGATE_SOAK_SECONDS=7200 TIDEGATE_SOAK_SEED=1234 python3 -m pytest -m soak tests/integration/test_soak.py -s

`TIDEGATE_SOAK_SECONDS` defaults to 7200 (two hours). Without `-m soak` the test is skipped
(tests/conftest.py).

What runs: `tidegate run -c FILE` as a subprocess with a spool, a rule directory and the HTTP
status endpoint; a mosquitto of its own with persistence, which the gateway reaches only through
a TCP fault proxy; an influxd 1.x of its own. "Normal" is 250 msg/s from 500 devices (one message
every two seconds each); the test publishes twice that, 500 msg/s (each device once a second, its
`seq` counting from 1), at QoS 1 straight to the broker.

Faults, one at a time, at random intervals, from a seeded RNG: proxy reset; proxy blackhole for
less and for more than 1.5 x keepalive; broker graceful restart; influxd SIGSTOP/SIGCONT for a few
seconds to a minute; influxd restart; gateway SIGKILL + restart; gateway SIGTERM + restart. After
each, the gateway must be connected again (or, for store faults, have drained its spool) within
`RECOVER_WITHIN`. Durations shrink for runs shorter than 20 minutes, so that short runs still fit
their faults in; every fault is printed with its time.

What is checked:

- Loss: every (device, seq) published is in InfluxDB, or reported by the gateway as a gap (a
  `gateway_events` point, `kind=seq_gap`). The only loss the promise allows is what a broker crash
  did not persist; with graceful broker restarts only there is none, so nothing may be missing
  at all. Each (device, seq) is stored once (duplicates are written idempotently).
- Accounts: every status snapshot sampled, from every gateway process, satisfies
  `received = stored + spooled + dead-lettered + rejected + in flight` (`check_accounts`); at the
  end nothing is in flight or in the spool and nothing was rejected.
- Flat memory, fds and tasks. Every few seconds the test samples the gateway's RSS and fd count
  (/proc) and its asyncio task count (`tasks` in /status). The honest comparison has two problems
  to get around:
  1. A restart starts a new process: its numbers start afresh, so they are judged per process
     lifetime. The first half of the run has every fault, gateway restarts included; the second
     half starts with a gateway restart and has every fault but those, so its process lives through
     half the run. Earlier processes are judged too when they lived long enough.
  2. A fault raises the numbers for a while by design (a backlog fills `batch.max_pending`, a
     stalled write holds a connection), and Python keeps memory it once used, so RSS behaves as a
     high-water mark. Only settled samples count: connected, spool empty, no more in flight than a
     few seconds of traffic, no fault running and none for `SETTLE` seconds. And the second-half
     process first runs a tour: each of its fault kinds once, at its longest duration, so the high
     water marks are set before the comparison starts.
  Within a judged lifetime, after its warm-up (its first quarter, and for the last process the tour
  too), the settled samples of the first third are compared with those of the last third: the
  latter's maximum may exceed the former's by at most `TOLERANCE`. fds and tasks, exact counts, are
  judged so in every lifetime with enough settled samples; RSS only in the last one, the one that
  had the tour: in an earlier lifetime a longer outage late in its life than any before may raise
  the high-water mark without any leak (its RSS is printed all the same). A leak of a task or a
  socket per reconnect, or of memory per message, shows as a rising settled level; a bounded
  transient does not. Runs of `JUDGE_FINAL_FROM` seconds or more must have enough settled samples
  to judge the last lifetime (shorter ones are a smoke test of the machinery).
- A summary table at the end: faults by kind, messages, missing, duplicates, and RSS, fds, tasks
  and threads, first versus last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.broker import MosquittoBroker
from tests.integration.faultproxy import Mode, ThreadedFaultProxy
from tests.integration.influx_servers import InfluxDBServer, find_binary, free_port
from tests.integration.mqtt_servers import StartTunedMosquitto
from tests.integration.reliability import PacedPublisher, check_accounts, paced_publisher, process_usage
from tests.integration.test_mqtt_faults import gateway_process, until


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number of seconds, e.g. {name}=600") from None
    if value <= 0:
        raise ValueError(f"{name}={text!r}: expected a positive number of seconds")
    return value


SOAK_SECONDS = _env_number("TIDEGATE_SOAK_SECONDS", 7200.0)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.soak,
    # the run itself, then draining the backlog and reading millions of points back
    pytest.mark.timeout(int(SOAK_SECONDS * 1.25) + 900),
]

NORMAL_RATE = 250  # messages a second from the whole fleet in normal operation
RATE = 2 * NORMAL_RATE
DEVICES = [f"soak-{i:03d}" for i in range(500)]
KEEPALIVE = 5  # seconds; a silent link is dropped after 1.5 x this
DETECT = 1.5 * KEEPALIVE

# Short validation runs shrink fault durations and the pauses between faults; 20 minutes and longer
# use the full ones.
SCALE = min(1.0, SOAK_SECONDS / 1200)
SAMPLE_EVERY = min(5.0, max(1.0, SOAK_SECONDS / 150))
SETTLE = min(15.0, max(3.0, SOAK_SECONDS / 60))  # quiet seconds after a fault before a sample counts
RECOVER_WITHIN = 120.0  # reconnect backoff tops out at 30 s; influxd replays its WAL on restart
DRAIN_WITHIN = 600.0  # after the load stops: the broker's backlog and the spool into InfluxDB
STALLED = 30.0  # ...unless nothing has moved for this long
SETTLED_IN_FLIGHT = 3 * RATE  # batches flush every second, so about a second's messages are normal
PROGRESS_EVERY = max(30.0, SOAK_SECONDS / 40)
MIN_SETTLED = 3  # settled samples needed in each compared third
JUDGE_FINAL_FROM = 300.0  # runs this long or longer must judge their last process


def scaled(full: float, floor: float) -> float:
    return max(floor, full * SCALE)


# Seconds from the end of one fault to the start of the next: at least long enough to settle and take
# a few samples, so every quiet spell can be judged.
GAP = (SETTLE + 3 * SAMPLE_EVERY, max(scaled(90, 8), SETTLE + 6 * SAMPLE_EVERY))
BLACKHOLE_SHORT = (1.0, DETECT - 1.5)
BLACKHOLE_LONG = (DETECT + 1.5, scaled(45, DETECT + 3))
INFLUX_STALL = (3.0, scaled(60, 5))
GATEWAY_DOWN = (0.0, scaled(10, 1))  # seconds between a gateway's end and its restart
LONGEST_FAULT = max(BLACKHOLE_LONG[1], INFLUX_STALL[1]) + DETECT + 10  # and the recovery after it

KINDS = (
    "proxy_reset",
    "blackhole_short",
    "blackhole_long",
    "broker_restart",
    "influx_stall",
    "influx_restart",
    "gateway_kill",
    "gateway_term",
)
RESTARTS = ("gateway_kill", "gateway_term")
STEADY_KINDS = tuple(kind for kind in KINDS if kind not in RESTARTS)  # the second half's faults


@dataclass(frozen=True)
class Tolerance:
    """How much a settled maximum may rise from the early third of a lifetime to the last third.

    RSS: allocator noise and fragmentation after the tour's peaks (measured: a few MiB over the
    validation runs); a leak of a few hundred bytes per message is over 100 MiB an hour at this rate.
    fds and tasks: an HTTP request or a store connection being replaced at the moment of sampling.
    """

    rss_kib: int = 16 * 1024
    fds: int = 2
    tasks: int = 2


TOLERANCE = Tolerance()
METRICS = ("rss_kib", "fds", "tasks")
COUNTS = ("fds", "tasks")  # exact counts, not high-water marks


def payload(device: str, seq: int) -> bytes:
    # ts: when published, so a redelivery (same bytes) is the same point; t cycles so rules fire
    return json.dumps(
        {"seq": seq, "ts": round(time.time(), 3), "t": seq % 50, "temperature": 20 + (seq % 100) / 10}
    ).encode()


RULES = """\
# Alarms that raise and clear about once a minute per device, and a window over every device.
rules:
  - id: soak-hot
    when: t > 45
    clear: t < 5
    severity: info
  - id: soak-warm-average
    when: avg(temperature, 1m) > 29
    severity: info
"""


# -- the gateway process, sampled --------------------------------------------------------------------


@dataclass
class Run:
    """One `tidegate run` process: started and ended in seconds since the soak started."""

    index: int
    process: subprocess.Popen[bytes]
    started: float
    ended: float | None = None
    end: str = "running"
    last: dict[str, Any] = field(default_factory=dict)  # its last status snapshot


@dataclass(frozen=True)
class Sample:
    at: float
    run: int
    rss_kib: int
    fds: int
    threads: int
    tasks: int
    settled: bool


@dataclass
class Fault:
    kind: str
    started: float
    ended: float = 0.0
    detail: str = ""
    recovered_in: float = 0.0


class Soak:
    """The processes under test, the clock, the fault log and the samples."""

    def __init__(
        self,
        *,
        config: Path,
        log_path: Path,
        http_port: int,
        proxy: ThreadedFaultProxy,
        broker: MosquittoBroker,
        influx: InfluxDBServer,
        rng: random.Random,
    ) -> None:
        self.config, self.log_path = config, log_path
        self.status_url = f"http://127.0.0.1:{http_port}/status"
        self.proxy, self.broker, self.influx, self.rng = proxy, broker, influx, rng
        self.t0 = time.monotonic()
        self.runs: list[Run] = []
        self.faults: list[Fault] = []
        self.active: Fault | None = None
        self.quiet_since = 0.0
        self.samples: list[Sample] = []
        self.tour_ended = 0.0
        self.reported = 0.0  # when the last progress line was printed

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f"[{self.now():8.1f}s] {text}", flush=True)

    # -- the gateway --

    @property
    def current(self) -> Run:
        return self.runs[-1]

    def start_gateway(self) -> Run:
        run = Run(len(self.runs), gateway_process(self.config, self.log_path), self.now())
        self.runs.append(run)
        return run

    def status(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(self.status_url, timeout=3.0)
            response.raise_for_status()
            result: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return result

    async def status_now(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.status)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def wait_for(self, condition: Callable[[dict[str, Any]], bool], what: str) -> float:
        """Poll /status until `condition` holds; return the seconds it took or fail naming `what`."""
        started = time.monotonic()
        while True:
            snapshot = await self.status_now()
            if snapshot is not None and condition(snapshot):
                return time.monotonic() - started
            if self.current.process.poll() is not None:
                raise AssertionError(f"{what}: the gateway exited\n{self.log_tail()}")
            if time.monotonic() - started > RECOVER_WITHIN:
                raise AssertionError(f"{what}: not within {RECOVER_WITHIN:.0f}s\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    async def stop_gateway(self, sig: signal.Signals, end: str) -> None:
        run = self.current
        run.last = await self.status_now() or run.last  # its final counters, as far as they can be read
        run.process.send_signal(sig)
        code = await asyncio.to_thread(run.process.wait, 60)
        run.ended, run.end = self.now(), f"{end} (exit {code})"
        if sig is signal.SIGTERM and code != 0:
            raise AssertionError(f"gateway run {run.index} exited {code} on SIGTERM\n{self.log_tail()}")

    # -- sampling --

    async def sample(self) -> None:
        run = self.current
        usage = process_usage(run.process.pid)
        snapshot = await self.status_now()
        if usage is None or snapshot is None or run is not self.current or run.process.poll() is not None:
            return  # between processes
        check_accounts(snapshot)
        run.last = snapshot
        at = self.now()
        settled = (
            self.active is None
            and at - self.quiet_since >= SETTLE
            and bool(snapshot["mqtt_connected"])
            and snapshot["spool_points"] == 0
            and snapshot["in_flight"] <= SETTLED_IN_FLIGHT
            and snapshot["pending_points"] <= SETTLED_IN_FLIGHT
        )
        self.samples.append(
            Sample(at, run.index, usage.rss_kib, usage.fds, usage.threads, int(snapshot["tasks"]), settled)
        )
        if at - self.reported >= PROGRESS_EVERY:
            self.reported = at
            self.say(
                f"run {run.index}: received {snapshot['received']}, in flight {snapshot['in_flight']}, "
                f"spool {snapshot['spool_points']}, RSS {usage.rss_kib / 1024:.1f} MiB, {usage.fds} fds, "
                f"{snapshot['tasks']} tasks, {usage.threads} threads{'' if settled else ' (not settled)'}"
            )

    async def sample_until(self, done: asyncio.Event) -> None:
        while not done.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), SAMPLE_EVERY)

    # -- faults --

    def draw(self, low_high: tuple[float, float], worst: bool) -> float:
        low, high = low_high
        return high if worst else self.rng.uniform(low, high)

    async def inject(self, kind: str, *, worst: bool = False, note: str = "") -> None:
        before = await self.status_now()
        if before is None:
            raise AssertionError(f"{kind}: the gateway does not answer before the fault\n{self.log_tail()}")
        reconnects = before["mqtt_reconnects"]
        fault = Fault(kind, self.now())
        self.active = fault
        try:
            detail = await self._do(kind, worst)
        finally:
            fault.ended = self.now()
        if kind in ("influx_stall", "influx_restart"):
            what = "the spool drained"
            recovered = await self.wait_for(lambda s: s["spool_points"] == 0, f"{kind}: {what}")
        elif kind in RESTARTS:
            what = "the new gateway connected"
            recovered = await self.wait_for(lambda s: bool(s["mqtt_connected"]), f"{kind}: {what}")
        else:
            what = "reconnected"

            def back(snapshot: dict[str, Any]) -> bool:
                return bool(snapshot["mqtt_connected"]) and snapshot["mqtt_reconnects"] > reconnects

            recovered = await self.wait_for(back, f"{kind}: {what}")
        fault.detail = detail + (f"; {note}" if note else "")
        fault.recovered_in = recovered
        self.faults.append(fault)
        self.active = None
        self.quiet_since = self.now()
        self.say(
            f"{kind}{' (worst case)' if worst else ''}: {fault.detail}; "
            f"{what} {recovered:.1f}s after it ended"
        )

    async def _do(self, kind: str, worst: bool) -> str:
        if kind == "proxy_reset":
            count = await asyncio.to_thread(self.proxy.reset_connections)
            return f"RST {count} connection(s)"
        if kind in ("blackhole_short", "blackhole_long"):
            seconds = self.draw(BLACKHOLE_SHORT if kind == "blackhole_short" else BLACKHOLE_LONG, worst)
            await asyncio.to_thread(self.proxy.set_mode, Mode.BLACKHOLE)
            try:
                await asyncio.sleep(seconds)
            finally:
                await asyncio.to_thread(self.proxy.set_mode, Mode.PASS)
            return f"blackhole {seconds:.1f}s (keepalive {KEEPALIVE}s, detection at {DETECT:.1f}s)"
        if kind == "broker_restart":
            started = time.monotonic()
            await asyncio.to_thread(self.broker.restart)  # SIGTERM: mosquitto saves, then starts again
            return f"mosquitto down and up in {time.monotonic() - started:.2f}s"
        if kind == "influx_stall":
            seconds = self.draw(INFLUX_STALL, worst)
            self.influx.process.pause()
            try:
                await asyncio.sleep(seconds)
            finally:
                self.influx.process.resume()
            return f"influxd SIGSTOP for {seconds:.1f}s"
        if kind == "influx_restart":
            started = time.monotonic()
            await asyncio.to_thread(self.influx.process.restart)
            return f"influxd down and up in {time.monotonic() - started:.2f}s"
        if kind in RESTARTS:
            sig = signal.SIGKILL if kind == "gateway_kill" else signal.SIGTERM
            await self.stop_gateway(sig, "killed" if sig is signal.SIGKILL else "terminated")
            down = self.draw(GATEWAY_DOWN, worst)
            await asyncio.sleep(down)
            run = self.start_gateway()
            return (
                f"{sig.name} run {run.index - 1}, down {down:.1f}s, run {run.index} (pid {run.process.pid})"
            )
        raise AssertionError(f"unknown fault {kind}")

    async def inject_until(self, end: float) -> None:
        """First half: any fault; then a gateway restart, the tour, and faults other than restarts."""
        half = end / 2
        while True:
            gap = self.rng.uniform(*GAP)
            if self.now() + gap >= half:
                break
            await asyncio.sleep(gap)
            await self.inject(self.rng.choice(KINDS))
        await asyncio.sleep(max(0.0, half - self.now()))
        await self.inject("gateway_term", note="second half: this process runs to the end")
        for kind in self.rng.sample(STEADY_KINDS, len(STEADY_KINDS)):
            await asyncio.sleep(SETTLE)
            await self.inject(kind, worst=True)
        self.tour_ended = self.now()
        self.say("tour of worst cases done")
        while True:
            gap = self.rng.uniform(*GAP)
            # leave the end quiet, so the last third has settled samples
            if self.now() + gap + LONGEST_FAULT + 2 * SETTLE >= end:
                break
            await asyncio.sleep(gap)
            await self.inject(self.rng.choice(STEADY_KINDS))


# -- reading InfluxDB back ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    rows: int
    seqs: int  # distinct
    low: int
    high: int


def rows(influx: InfluxDBServer, statement: str, database: str) -> list[dict[str, Any]]:
    """Run a SELECT like `InfluxDBServer.rows`, with time for millions of points."""
    response = httpx.post(
        f"{influx.url}/query", data={"q": statement, "db": database, "epoch": "u"}, timeout=300.0
    )
    body = response.json()
    assert response.status_code == 200 and "error" not in body, body
    [result] = body["results"]
    assert "error" not in result, result["error"]
    found = []
    for series in result.get("series", []):
        for values in series["values"]:
            found.append({**(series.get("tags") or {}), **dict(zip(series["columns"], values, strict=True))})
    return found


def stored_counts(influx: InfluxDBServer, database: str) -> dict[str, Stored]:
    """Per device: rows, distinct seqs, lowest and highest seq in `telemetry` (aggregated by influxd)."""
    counts = {}
    query = (
        'SELECT count("seq") AS "rows", count(distinct("seq")) AS "seqs", min("seq") AS "low", '
        'max("seq") AS "high" FROM "telemetry" GROUP BY "device"'
    )
    for row in rows(influx, query, database):
        counts[row["device"]] = Stored(int(row["rows"]), int(row["seqs"]), int(row["low"]), int(row["high"]))
    return counts


def complete(counts: dict[str, Stored], last: dict[str, int]) -> bool:
    """Tell whether every device's seqs 1..last are stored (distinct seqs within 1..last, all there)."""
    for device, high in last.items():
        stored = counts.get(device)
        if stored is None or (stored.seqs, stored.low, stored.high) != (high, 1, high):
            return False
    return True


def device_seqs(influx: InfluxDBServer, database: str, device: str) -> set[int]:
    found = rows(influx, f'SELECT "seq" FROM "telemetry" WHERE "device" = \'{device}\'', database)
    return {int(row["seq"]) for row in found}


def reported_gaps(influx: InfluxDBServer, database: str, kind: str) -> dict[str, set[int]]:
    gaps: dict[str, set[int]] = defaultdict(set)
    query = f'SELECT "first", "last" FROM "gateway_events" WHERE "kind" = \'{kind}\' GROUP BY "device"'
    for row in rows(influx, query, database):
        gaps[row["device"]] |= set(range(int(row["first"]), int(row["last"]) + 1))
    return dict(gaps)


# -- judging the samples ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One lifetime's settled samples: early third against last third, per metric."""

    run: int
    window: tuple[float, float]
    early: Sequence[Sample]
    late: Sequence[Sample]
    toured: bool  # the worst case of every fault ran before `window`

    @property
    def judged(self) -> bool:
        return len(self.early) >= MIN_SETTLED and len(self.late) >= MIN_SETTLED

    def peak(self, samples: Sequence[Sample], metric: str) -> int:
        return max(int(getattr(s, metric)) for s in samples)

    @property
    def metrics(self) -> tuple[str, ...]:
        # RSS is a high-water mark: only after the tour has every fault's peak been reached
        return METRICS if self.toured else COUNTS

    def failures(self) -> list[str]:
        found = []
        for metric in self.metrics:
            early, late = self.peak(self.early, metric), self.peak(self.late, metric)
            if late > early + getattr(TOLERANCE, metric):
                found.append(
                    f"run {self.run}: settled {metric} rose from max {early} ({self.window[0]:.0f}s..) "
                    f"to max {late} (..{self.window[1]:.0f}s), more than the tolerance "
                    f"{getattr(TOLERANCE, metric)}"
                )
        return found


def judge(soak: Soak, load_ended: float) -> list[Verdict]:
    verdicts = []
    final = soak.current.index
    for run in soak.runs:
        end = min(run.ended if run.ended is not None else load_ended, load_ended)
        warm = run.started + (end - run.started) / 4
        if run.index == final:
            warm = max(warm, soak.tour_ended)
        third = (end - warm) / 3
        settled = [s for s in soak.samples if s.run == run.index and s.settled]
        early = [s for s in settled if warm <= s.at < warm + third]
        late = [s for s in settled if end - third <= s.at <= end]
        verdicts.append(Verdict(run.index, (warm, end), early, late, toured=run.index == final))
    return verdicts


# -- the test -----------------------------------------------------------------------------------------


@pytest.fixture
def soak_influxd(tmp_path: Path) -> Iterator[InfluxDBServer]:
    """Yield an influxd of this test's own, free to stop, continue and restart."""
    executable = find_binary("TIDEGATE_INFLUXD", "influxd", "/usr/bin/influxd")
    if executable is None:
        pytest.skip("influxd is not installed (apt-get install influxdb); CI installs it")
    with InfluxDBServer(executable, tmp_path / "influxdb") as server:
        yield server


@dataclass
class Outcome:
    last: dict[str, int] = field(default_factory=dict)
    published: int = 0
    counts: dict[str, Stored] = field(default_factory=dict)
    missing: dict[str, set[int]] = field(default_factory=dict)
    gaps: dict[str, set[int]] = field(default_factory=dict)
    unverified_gaps: dict[str, set[int]] = field(default_factory=dict)
    drained_in: float = 0.0
    final: dict[str, Any] = field(default_factory=dict)
    load_ended: float = 0.0


def test_s3_soak_at_twice_the_normal_rate_with_random_faults(
    mosquitto_tuned: StartTunedMosquitto, soak_influxd: InfluxDBServer, tmp_path: Path
) -> None:
    seed = int(os.environ.get("TIDEGATE_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))
    print(
        f"\nS3 soak: {SOAK_SECONDS:.0f}s at {RATE} msg/s (2 x {NORMAL_RATE}) from {len(DEVICES)} devices, "
        f"seed {seed} (TIDEGATE_SOAK_SEED={seed} replays the faults), files in {tmp_path}",
        flush=True,
    )
    # Graceful restarts save the broker's database; the interval matters only for a crash.
    broker = mosquitto_tuned(autosave_interval=60)
    database = soak_influxd.create_database("soak")
    http_port = free_port()
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "soak.yaml").write_text(RULES, encoding="utf-8")
    config = tmp_path / "tidegate.yaml"
    log_path = tmp_path / "tidegate.log"
    outcome = Outcome()

    async def scenario(soak: Soak) -> None:
        soak.start_gateway()
        await soak.wait_for(lambda s: bool(s["mqtt_connected"]), "the first gateway connected")
        metrics = await asyncio.to_thread(httpx.get, soak.status_url.replace("/status", "/metrics"))
        assert "\ntidegate_tasks " in metrics.text, "/metrics has no tidegate_tasks"
        async with paced_publisher(broker.host, broker.port, payload, keep_seqs=False) as pub:
            pub.client.reconnect_delay_set(1, 2)  # back soon after a broker restart
            stop = threading.Event()
            load = asyncio.create_task(asyncio.to_thread(pub.run, DEVICES, RATE, SOAK_SECONDS, stop))
            try:
                sampled = asyncio.Event()
                async with asyncio.TaskGroup() as group:
                    group.create_task(soak.sample_until(sampled))
                    await soak.inject_until(SOAK_SECONDS)
                    await asyncio.shield(load)
                    outcome.load_ended = soak.now()
                    sampled.set()
            finally:
                stop.set()
                await load
            await drain(soak, pub)

    async def drain(soak: Soak, pub: PacedPublisher) -> None:
        soak.say(f"load stopped after {pub.published} messages; waiting for the broker's acks")
        await until(lambda: pub.unacked() == 0, "the broker acknowledged every publish", 60)
        outcome.last, outcome.published = pub.last_seqs(), pub.published
        started = changed = time.monotonic()
        progress: tuple[int, int] = (-1, -1)  # rows stored, messages received
        while True:
            counts = await asyncio.to_thread(stored_counts, soak_influxd, database)
            if complete(counts, outcome.last) or time.monotonic() - started > DRAIN_WITHIN:
                break
            # Something is missing. Wait while anything moves; once connected, idle and still for
            # STALLED seconds, what is missing is not coming.
            snapshot = await soak.status_now() or {}
            now = (sum(c.rows for c in counts.values()), int(snapshot.get("received", -1)))
            if now != progress:
                progress, changed = now, time.monotonic()
            idle = snapshot.get("mqtt_connected") and snapshot["in_flight"] == snapshot["spool_points"] == 0
            if idle and time.monotonic() - changed > STALLED:
                break
            await asyncio.sleep(5)
        outcome.drained_in = time.monotonic() - started
        await soak.wait_for(lambda s: s["in_flight"] == 0 and s["spool_points"] == 0, "settled at the end")
        outcome.final = await soak.status_now() or {}
        outcome.counts = await asyncio.to_thread(stored_counts, soak_influxd, database)
        for device, high in outcome.last.items():
            stored = outcome.counts.get(device)
            if stored is None or (stored.seqs, stored.low, stored.high) != (high, 1, high):
                seqs = await asyncio.to_thread(device_seqs, soak_influxd, database, device)
                outcome.missing[device] = set(range(1, high + 1)) - seqs
        outcome.gaps = reported_gaps(soak_influxd, database, "seq_gap")
        outcome.unverified_gaps = reported_gaps(soak_influxd, database, "seq_gap_unverified")

    with ThreadedFaultProxy(broker.host, broker.port) as proxy:
        config.write_text(
            f"mqtt:\n  url: mqtt://{proxy.host}:{proxy.port}\n  client_id: tg-soak-{uuid.uuid4().hex[:6]}\n"
            f"  keepalive: {KEEPALIVE}\n"
            f"store:\n  kind: influxdb_v1\n  url: {soak_influxd.url}\n  database: {database}\n"
            f"spool:\n  dir: {tmp_path / 'spool'}\n  max_bytes: {256 << 20}\n"
            f"dead_letter:\n  file: {tmp_path / 'dead-letter.jsonl'}\n"
            f"rules:\n  dir: {tmp_path / 'rules'}\n"
            f"http:\n  listen: 127.0.0.1:{http_port}\n",
            encoding="utf-8",
        )
        soak = Soak(
            config=config,
            log_path=log_path,
            http_port=http_port,
            proxy=proxy,
            broker=broker,
            influx=soak_influxd,
            rng=random.Random(seed),
        )
        try:
            asyncio.run(scenario(soak))
        finally:
            soak_influxd.process.resume()  # in case a stall was interrupted
            run = soak.current if soak.runs else None
            if run is not None and run.process.poll() is None:
                run.process.send_signal(signal.SIGTERM)
                try:
                    run.process.wait(60)
                except subprocess.TimeoutExpired:
                    run.process.kill()
                    run.process.wait()
                run.ended, run.end = soak.now(), f"stopped at the end (exit {run.process.returncode})"

    verdicts = judge(soak, outcome.load_ended)
    print(summary(soak, outcome, verdicts), flush=True)

    # Loss: graceful faults only, so nothing may be missing; gaps would explain, not excuse, a loss.
    unexplained = {d: s - outcome.gaps.get(d, set()) for d, s in outcome.missing.items()}
    assert not {d: sorted(s)[:10] for d, s in unexplained.items() if s}, "lost without a gap report"
    assert not outcome.missing, f"missing {sum(map(len, outcome.missing.values()))} (reported as gaps)"
    duplicates = {d: c.rows - c.seqs for d, c in outcome.counts.items() if c.rows != c.seqs}
    assert not duplicates, f"stored more than once: {duplicates}"
    # Accounts: every sample was checked as it was taken; at the end everything is handed off.
    final = outcome.final
    check_accounts(final)
    assert final["in_flight"] == final["spool_points"] == 0
    assert final["rejected"] == final["messages_dead_lettered"] == final["points_rejected"] == 0
    assert final["spool_corrupt_segments"] == 0
    # Flat: every lifetime long enough to judge, and the last one in runs long enough to hold it.
    if SOAK_SECONDS >= JUDGE_FINAL_FROM:
        assert verdicts[-1].judged, "the last gateway process had too few settled samples to judge"
    failures = [text for verdict in verdicts if verdict.judged for text in verdict.failures()]
    assert not failures, "\n".join(failures)
    assert Counter(f.kind for f in soak.faults).keys() >= set(STEADY_KINDS), "a fault kind never ran"


# -- the summary --------------------------------------------------------------------------------------


def summary(soak: Soak, outcome: Outcome, verdicts: list[Verdict]) -> str:
    lines = ["", "S3 soak summary", ""]
    lines.append(f"{'fault':<18}{'count':>6}{'seconds':>10}{'max recovery s':>16}")
    for kind in KINDS:
        faults = [f for f in soak.faults if f.kind == kind]
        if faults:
            lines.append(
                f"{kind:<18}{len(faults):>6}{sum(f.ended - f.started for f in faults):>10.1f}"
                f"{max(f.recovered_in for f in faults):>16.1f}"
            )
    lines.append(f"{'total':<18}{len(soak.faults):>6}")
    stored = sum(min(c.seqs, outcome.last.get(d, 0)) for d, c in outcome.counts.items())
    duplicates = {d: c.rows - c.seqs for d, c in outcome.counts.items() if c.rows != c.seqs}
    missing = {d: len(s) for d, s in outcome.missing.items() if s}

    def total(counter: str) -> int:
        return sum(int(run.last.get(counter, 0)) for run in soak.runs)

    redeliveries, received = total("duplicates"), total("received")
    lines += [
        "",
        f"{'messages published':<34}{outcome.published:>12}",
        f"{'stored (distinct device, seq)':<34}{stored:>12}",
        f"{'missing':<34}{sum(missing.values()):>12}  per device: {missing or 'none'}",
        f"{'stored twice':<34}{sum(duplicates.values()):>12}  per device: {duplicates or 'none'}",
        f"{'received by the gateways':<34}{received:>12}  (counters: the last sample of each process)",
        f"{'redeliveries (duplicates counter)':<34}{redeliveries:>12}",
        f"{'gaps reported (seqs)':<34}{sum(map(len, outcome.gaps.values())):>12}"
        f"  unverified after a crash: {sum(map(len, outcome.unverified_gaps.values()))} (not losses)",
        f"{'stored after the load stopped in':<34}{outcome.drained_in:>11.1f}s",
        f"{'points spooled / drained':<34}{total('points_spooled'):>12} / {total('points_drained')}",
        f"{'store retries':<34}{total('store_retries'):>12}",
        f"{'MQTT reconnects':<34}{total('mqtt_reconnects'):>12}  sessions lost: {total('sessions_lost')}",
        f"{'backpressure pauses':<34}{total('backpressure_pauses'):>12}",
        "",
        f"{'process':<8}{'lived s':>16} {'end':<34}  {'settled':<9}"
        f"{'RSS MiB early -> late':>24}{'fds':>12}{'tasks':>12}{'threads':>12}  verdict",
    ]
    for verdict in verdicts:
        run = soak.runs[verdict.run]
        samples = [s for s in soak.samples if s.run == run.index]
        settled = [s for s in samples if s.settled]
        life = f"{run.started:.0f}..{run.ended if run.ended is not None else 0:.0f}"
        if verdict.judged:
            e, late = verdict.early, verdict.late
            cells = [
                f"{verdict.peak(e, 'rss_kib') / 1024:.1f} -> {verdict.peak(late, 'rss_kib') / 1024:.1f}",
                f"{verdict.peak(e, 'fds')} -> {verdict.peak(late, 'fds')}",
                f"{verdict.peak(e, 'tasks')} -> {verdict.peak(late, 'tasks')}",
                f"{verdict.peak(e, 'threads')} -> {verdict.peak(late, 'threads')}",
                ("flat" if not verdict.failures() else "ROSE") + ("" if verdict.toured else " (fds, tasks)"),
            ]
        else:
            cells = ["", "", "", "", "not judged (too few settled samples)"]
        lines.append(
            f"{run.index:<8}{life:>16} {run.end:<34}  {len(settled):>4}/{len(samples):<4}"
            f"{cells[0]:>24}{cells[1]:>12}{cells[2]:>12}{cells[3]:>12}  {cells[4]}"
        )
    settled = [s for s in soak.samples if s.settled]
    if settled:
        first, last = settled[0], settled[-1]
        lines.append(
            f"first settled sample (run {first.run}, {first.at:.0f}s): RSS {first.rss_kib / 1024:.1f} MiB, "
            f"{first.fds} fds, {first.tasks} tasks, {first.threads} threads; last (run {last.run}, "
            f"{last.at:.0f}s): RSS {last.rss_kib / 1024:.1f} MiB, {last.fds} fds, {last.tasks} tasks, "
            f"{last.threads} threads"
        )
    lines.append(
        f"(peaks of settled samples: early = first third after warm-up, late = last third; "
        f"tolerance RSS {TOLERANCE.rss_kib // 1024} MiB, fds {TOLERANCE.fds}, tasks {TOLERANCE.tasks})"
    )
    return "\n".join(lines)
