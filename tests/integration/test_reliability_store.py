"""The message accounts add up, and a stopped InfluxDB is waited out within bounds (M10).

Accounting (gateway/ingest.py `IngestStats`): every telemetry message received is, at every moment,
in exactly one of `messages_stored`, `messages_spooled`, `messages_dead_lettered`, `rejected` or
`in_flight`. Checked here with good, bad, duplicate, store-refused and spooled messages, through a
real mosquitto into a real InfluxDB 1.x, while points sit in the spool and after it drained.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import Gateway
from gateway.config import (
    BatchSettings,
    DeadLetterSettings,
    InfluxV1Settings,
    MqttSettings,
    Settings,
    SpoolSettings,
)
from gateway.store.base import Point
from gateway.store.batcher import BatchWriter
from gateway.store.influx_v1 import InfluxV1Store
from rules import build_rule_set
from tests.integration.faultproxy import FaultProxy, Mode
from tests.integration.influx_servers import InfluxDBServer, find_binary, free_port
from tests.integration.mqtt_servers import StartTunedMosquitto
from tests.integration.reliability import check_accounts, paced_publisher
from tests.integration.test_mqtt_faults import (
    gateway_process,
    payload,
    publisher,
    running,
    stored_seqs,
    until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

T0 = float(int(time.time()) - 3600)


@pytest.fixture
def own_influxd(tmp_path: Path) -> Iterator[InfluxDBServer]:
    """Yield an influxd for this test alone, free to be stopped (SIGSTOP) and continued."""
    executable = find_binary("TIDEGATE_INFLUXD", "influxd", "/usr/bin/influxd")
    if executable is None:
        pytest.skip("influxd is not installed (apt-get install influxdb); CI installs it")
    with InfluxDBServer(executable, tmp_path / "influxdb") as server:
        yield server


def body(seq: int, **fields: object) -> bytes:
    return json.dumps({"seq": seq, "ts": T0 + seq / 1000, **fields}).encode()


# -- the accounting identity --------------------------------------------------------------------------


def test_every_message_is_accounted_for_through_rejections_duplicates_refusals_and_the_spool(
    mosquitto_tuned: StartTunedMosquitto, influxdb_v1: InfluxDBServer, tmp_path: Path
) -> None:
    broker = mosquitto_tuned()
    database = influxdb_v1.create_database("accounts")
    dead_letter = tmp_path / "dead-letter.jsonl"

    async def scenario() -> list[dict[str, Any]]:
        snapshots: list[dict[str, Any]] = []
        async with FaultProxy("127.0.0.1", influxdb_v1.port) as proxy:  # RESET: the store is down
            settings = Settings(
                mqtt=MqttSettings(url=broker.url, client_id=f"tg-acc-{uuid.uuid4().hex[:6]}"),
                store=InfluxV1Settings(
                    kind="influxdb_v1",
                    url=f"http://{proxy.host}:{proxy.port}",
                    database=database,
                    timeout=2.0,
                ),
                batch=BatchSettings(flush_interval=0.05),
                spool=SpoolSettings(dir=tmp_path / "spool"),
                dead_letter=DeadLetterSettings(file=dead_letter),
            )
            gateway = Gateway(settings, rule_set=build_rule_set({}))

            def settled(received: int) -> bool:
                stats = gateway.ingest.stats
                return stats.received == received and stats.in_flight == 0

            async with running(gateway), publisher(broker.host, broker.port) as pub:
                client = pub.client

                def send(device: str, payload: bytes) -> None:
                    client.publish(f"devices/{device}/telemetry", payload, qos=1)

                await asyncio.to_thread(pub.publish, ["acc-1", "acc-2"], 10)  # 20 good
                for bad in (b"not json", b'{"seq": 90, "t": NaN}', b'{"seq": "x", "t": 1}'):
                    send("acc-1", bad)  # 3 refused by the gateway
                send("acc-1", payload(5))  # the publisher's seq 5 again: a duplicate
                send("acc-3", body(1, level=1.5))
                await until(lambda: settled(25), "the first messages handed off")
                send("acc-3", body(2, level="high"))  # InfluxDB refuses it: field type conflict
                send("acc-3", body(3, level=2.5))
                await until(lambda: settled(27), "the conflict handed off")
                snapshots.append(gateway.snapshot())

                proxy.set_mode(Mode.RESET)
                await asyncio.to_thread(pub.publish, ["acc-1", "acc-2"], 10)  # 20 to the spool
                await until(lambda: settled(47), "the messages for the spool handed off")
                snapshots.append(gateway.snapshot())

                proxy.set_mode(Mode.PASS)
                await until(lambda: gateway.snapshot()["spool_points"] == 0, "the spool drained", 20)
                snapshots.append(gateway.snapshot())
        return snapshots

    before, spooling, drained = asyncio.run(scenario())
    for snapshot in (before, spooling, drained):
        check_accounts(snapshot)
    assert {k: before[k] for k in ("received", "rejected", "duplicates", "messages_dead_lettered")} == {
        "received": 27,
        "rejected": 3,
        "duplicates": 1,
        "messages_dead_lettered": 1,
    }
    assert (before["messages_stored"], before["messages_spooled"]) == (23, 0)
    assert (spooling["messages_stored"], spooling["messages_spooled"]) == (23, 20)
    assert spooling["spool_points"] == spooling["points_spooled"] == 20  # sitting in the spool, acked
    assert drained["points_drained"] == drained["points_spooled"] == 20
    assert {k: drained[k] for k in ("messages_spooled", "messages_stored", "in_flight")} == {
        "messages_spooled": 20,
        "messages_stored": 23,
        "in_flight": 0,
    }
    # What the counters say is what InfluxDB holds, each (device, seq) once; the rest is dead-lettered.
    stored = stored_seqs(influxdb_v1, database)
    assert stored == {"acc-1": set(range(1, 21)), "acc-2": set(range(1, 21)), "acc-3": {1, 3}}
    rows = influxdb_v1.rows('SELECT "seq" FROM "telemetry" GROUP BY "device"', database)
    assert len(rows) == 42
    records = [json.loads(line) for line in dead_letter.read_text().splitlines()]
    assert sorted(r["kind"] for r in records) == ["payload", "payload", "payload", "point"]
    assert drained["points_rejected"] == 1 and drained["dead_letter_records"] == 4


# -- M10 InfluxDB stopped under 1000 msg/s ------------------------------------------------------------

RATE = 1000  # messages a second
MAX_PENDING = 1000
SPOOL_BYTES = 1 << 20  # the smallest spool.max_bytes allowed
NOTE = "n" * 700  # ~0.8 KB a point in the spool: the 1 MiB spool fills in about a second
DEVICES = [f"m10-{i}" for i in range(10)]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def spool_on_disk(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.seg")) if directory.exists() else 0


@dataclass
class Watch:
    """What was seen of the gateway process while InfluxDB was stopped."""

    rss_before: int = 0
    rss_peak: int = 0
    spool_peak: int = 0  # bytes of segment files, measured on disk
    pending_peak: int = 0
    received: list[tuple[float, int]] = field(default_factory=list)  # (seconds into the stall, received)


@pytest.mark.timeout(240)
def test_m10_a_stopped_influxdb_holds_the_flow_within_bounds_and_loses_nothing(
    mosquitto_tuned: StartTunedMosquitto, own_influxd: InfluxDBServer, tmp_path: Path
) -> None:
    broker = mosquitto_tuned()
    database = own_influxd.create_database("m10")
    port = free_port()
    spool_dir = tmp_path / "spool"
    config = tmp_path / "tidegate.yaml"
    config.write_text(
        f"mqtt:\n  url: {broker.url}\n  client_id: tg-m10-{uuid.uuid4().hex[:6]}\n"
        f"store:\n  kind: influxdb_v1\n  url: {own_influxd.url}\n  database: {database}\n  timeout: 1.0\n"
        f"batch:\n  size: 500\n  flush_interval: 0.1\n  max_pending: {MAX_PENDING}\n"
        f"spool:\n  dir: {spool_dir}\n  max_bytes: {SPOOL_BYTES}\n"
        f"http:\n  listen: 127.0.0.1:{port}\n",
        encoding="utf-8",
    )
    log_path = tmp_path / "tidegate.log"
    watch = Watch()
    stall = 60.0  # the store answers nothing for a minute (issue 4); reading stops after about 3.5 s of it

    def status() -> dict[str, Any]:
        response = httpx.get(f"http://127.0.0.1:{port}/status", timeout=2.0)
        result: dict[str, Any] = response.json()
        return result

    def make(device: str, seq: int) -> bytes:
        return json.dumps({"seq": seq, "ts": T0 + seq / 1000, "t": seq % 50, "note": NOTE}).encode()

    async def scenario() -> tuple[dict[str, set[int]], dict[str, Any], float]:
        process = gateway_process(config, log_path)
        try:

            def up() -> bool:
                try:
                    return bool(status()["mqtt_connected"])
                except httpx.HTTPError:
                    return False

            await until(up, "the gateway is up", 20)
            async with paced_publisher(broker.host, broker.port, make) as pub:
                await asyncio.to_thread(pub.run, DEVICES, RATE, 1.0)  # warm up with the store running
                await until(lambda: status()["in_flight"] == 0, "warm-up stored")
                watch.rss_before = watch.rss_peak = rss_kib(process.pid)
                own_influxd.process.pause()  # SIGSTOP: connections stay open, nothing is answered
                load = asyncio.create_task(asyncio.to_thread(pub.run, DEVICES, RATE, stall))
                started = time.monotonic()
                while not load.done():
                    now = status()
                    watch.rss_peak = max(watch.rss_peak, rss_kib(process.pid))
                    watch.spool_peak = max(watch.spool_peak, spool_on_disk(spool_dir))
                    watch.pending_peak = max(watch.pending_peak, now["pending_points"])
                    watch.received.append((time.monotonic() - started, now["received"]))
                    await asyncio.sleep(0.1)
                await load
                published = pub.published
                await until(lambda: pub.unacked() == 0, "the broker took every message", 10)
                own_influxd.process.resume()  # SIGCONT
                resumed = time.monotonic()
                sent = {device: set(seqs) for device, seqs in pub.sent.items()}

                def complete() -> bool:
                    stored = stored_seqs(own_influxd, database)
                    return all(seqs <= stored.get(d, set()) for d, seqs in sent.items())

                await until(complete, f"all {published} messages in InfluxDB", 90)
                drain = time.monotonic() - resumed
                await until(lambda: status()["in_flight"] == 0 and status()["spool_points"] == 0, "settled")
                final = status()
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 15)
        return sent, final, drain

    sent, final, drain = asyncio.run(scenario())
    total = sum(map(len, sent.values()))
    plateau = [received for at, received in watch.received if at >= stall - 1.5]
    print(
        f"M10: {total} messages at ~{RATE}/s, InfluxDB stopped {stall:.0f}s: RSS {watch.rss_before // 1024} MB "
        f"-> peak {watch.rss_peak // 1024} MB; spool peak {watch.spool_peak} bytes on disk "
        f"(cap {SPOOL_BYTES}); pending peak {watch.pending_peak}; received during the last 1.5 s "
        f"{plateau[0]}..{plateau[-1]}; backpressure pauses {final['backpressure_pauses']}; "
        f"all stored {drain:.1f}s after SIGCONT"
    )
    stored = stored_seqs(own_influxd, database)
    assert not {d: s - stored.get(d, set()) for d, s in sent.items() if s - stored.get(d, set())}
    assert watch.spool_peak <= SPOOL_BYTES
    assert watch.pending_peak <= MAX_PENDING + 1  # the bound, overshot by at most the message that hit it
    assert watch.rss_peak - watch.rss_before < 64 * 1024, "memory grew with the backlog"
    # reading stopped: the broker held the rest (it acknowledged every publish meanwhile)
    assert final["backpressure_pauses"] >= 1
    assert plateau[-1] == plateau[0] and plateau[-1] < total
    check_accounts(final)
    assert final["rejected"] == final["messages_dead_lettered"] == final["points_rejected"] == 0
    assert final["messages_spooled"] > 0 and final["points_drained"] == final["points_spooled"]


# -- D3 5xx, 429 and resets from in front of a real InfluxDB: the same batch is retried -----------------


class StatusInjector:
    """An HTTP fault injector in front of a real server: answers the first requests with `statuses`.

    Each faulty answer closes its connection (`Connection: close`), so the client reconnects for the
    next try; once the statuses are used up, connections are piped to the server unchanged.
    """

    def __init__(self, upstream_port: int, statuses: list[int]) -> None:
        self.upstream_port = upstream_port
        self.statuses = list(statuses)
        self.answered: list[int] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> StatusInjector:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # piped connections the client keeps alive
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)
        try:
            if self.statuses:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                status = self.statuses.pop(0)
                self.answered.append(status)
                text = json.dumps({"error": f"injected {status}"}).encode()
                writer.write(
                    f"HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n".encode()
                    + text
                )
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(up_writer)

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                sink.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._handlers.discard(handler)


def test_d3_server_errors_and_throttling_retry_the_same_batch_until_it_is_stored(
    influxdb_v1: InfluxDBServer,
) -> None:
    database = influxdb_v1.create_database("d3")
    statuses = [503, 429, 500, 502]

    async def scenario() -> tuple[StatusInjector, BatchWriter, list[int]]:
        async with StatusInjector(influxdb_v1.port, statuses) as injector:
            store = InfluxV1Store(f"http://127.0.0.1:{injector.port}", database, timeout=2.0)
            writer = BatchWriter(
                store, batch_size=50, flush_interval=0.01, retry_initial=0.01, retry_max=0.05
            )
            acked: list[int] = []
            try:
                async with asyncio.TaskGroup() as group:
                    running_writer = group.create_task(writer.run())
                    for n in range(100):
                        point = Point("d3", (("device", "d"),), {"seq": n}, T0 + n / 1000)
                        writer.add([point], functools.partial(acked.append, n))
                    await until(lambda: len(acked) == 100, "every point acknowledged")
                    await writer.close()
                    await running_writer
            finally:
                await store.close()
            return injector, writer, acked

    injector, writer, acked = asyncio.run(scenario())
    assert injector.answered == statuses  # each one was met, by a retry of the same batch
    assert writer.retries == len(statuses) and writer.rejected == 0
    assert acked == list(range(100))  # in order, none before it was stored
    rows = influxdb_v1.rows('SELECT "seq" FROM "d3"', database)
    assert sorted(row["seq"] for row in rows) == list(range(100))  # each exactly once


# -- D6 the database is missing: spool, alarm in the log and the counters, nothing dropped --------------


def test_d6_a_missing_database_spools_everything_until_it_exists(
    mosquitto_tuned: StartTunedMosquitto,
    influxdb_v1: InfluxDBServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = mosquitto_tuned()
    database = f"d6_{uuid.uuid4().hex[:8]}"  # not created yet
    settings = Settings(
        mqtt=MqttSettings(url=broker.url, client_id=f"tg-d6-{uuid.uuid4().hex[:6]}"),
        store=InfluxV1Settings(kind="influxdb_v1", url=influxdb_v1.url, database=database),
        batch=BatchSettings(flush_interval=0.05),
        spool=SpoolSettings(dir=tmp_path / "spool"),
    )
    gateway = Gateway(settings, rule_set=build_rule_set({}))

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with running(gateway), publisher(broker.host, broker.port) as pub:
            await asyncio.to_thread(pub.publish, ["d6-1", "d6-2"], 10)
            await until(lambda: gateway.ingest.stats.messages_spooled == 20, "all 20 spooled")
            missing = gateway.snapshot()
            await asyncio.to_thread(influxdb_v1.query, f'CREATE DATABASE "{database}"')
            await until(lambda: gateway.snapshot()["spool_points"] == 0, "the spool drained", 20)
            return missing, gateway.snapshot()

    missing, drained = asyncio.run(scenario())
    assert (
        f'database not found: "{database}"' in caplog.text
        or f"database '{database}' not found" in caplog.text
    )
    assert missing["spool_points"] == 20 and missing["store_retries"] >= 1
    check_accounts(missing)
    check_accounts(drained)
    assert drained["points_drained"] == 20
    assert stored_seqs(influxdb_v1, database) == {"d6-1": set(range(1, 11)), "d6-2": set(range(1, 11))}
