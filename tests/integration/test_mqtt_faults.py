"""MQTT faults from the reliability matrix (../shared/RELIABILITY.md), against a real mosquitto.

Loss is counted the same way everywhere: publishers put `(device, seq, ts)` in each message and remember
what the broker acknowledged; the gateway writes to a `MemoryStore`; `Tally` compares distinct `seq`
per device in the store with what was sent. Duplicates are allowed (redelivery is at least once) and
printed, so `pytest -rP` shows them. Network faults go through `faultproxy.FaultProxy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from gateway.app import Gateway
from gateway.broker import MosquittoBroker, find_mosquitto
from gateway.config import BatchSettings, MqttSettings, NullSettings, Settings
from gateway.mqtt import MISC_INTERVAL
from gateway.store.base import Point
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from tests.integration.faultproxy import FaultProxy, Mode, ThreadedFaultProxy
from tests.integration.influx_servers import InfluxDBServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Protocol = Literal["5", "3.1.1"]
KEEPALIVE = 5  # the smallest MqttSettings allows
T0 = float(int(time.time()) - 3600)  # payload timestamps: T0 + seq ms, distinct per (device, seq)
PASSWORD = "pw-7f3c9e-never-log-me"


# -- helpers ------------------------------------------------------------------------------------------


def settings_for(host: str, port: int, client_id: str, protocol: Protocol = "5", **mqtt: object) -> Settings:
    return Settings(
        mqtt=MqttSettings.model_validate(
            {"url": f"mqtt://{host}:{port}", "client_id": client_id, "protocol": protocol, **mqtt}
        ),
        store=NullSettings(kind="null"),  # replaced by a MemoryStore the test reads
        batch=BatchSettings(flush_interval=0.05),
    )


def new_gateway(settings: Settings, store: MemoryStore) -> Gateway:
    return Gateway(settings, rule_set=build_rule_set({}), store=store)


_persistent_sessions: list[str] = []


def client_id(name: str) -> str:
    """Return a fresh gateway client id; its session on the shared broker is removed after the test."""
    cid = f"tg-{name}-{uuid.uuid4().hex[:6]}"
    _persistent_sessions.append(cid)
    return cid


@pytest.fixture(autouse=True)
def _forget_sessions(request: pytest.FixtureRequest) -> Iterable[None]:
    """Remove the test's persistent sessions from the shared broker.

    Each would otherwise stay subscribed to devices/+/telemetry and queue every message later tests
    publish, for the rest of the session.
    """
    _persistent_sessions.clear()
    yield
    if "mosquitto" not in request.fixturenames:
        return
    broker: MosquittoBroker = request.getfixturevalue("mosquitto")
    for cid in _persistent_sessions:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
        with contextlib.suppress(OSError):
            client.connect(broker.host, broker.port, clean_start=True)  # session expiry 0: gone on close
            client.loop_start()
            client.disconnect()
            client.loop_stop()
    _persistent_sessions.clear()


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> float:
    """Poll `condition` until true; return the seconds it took, or fail saying what did not happen.

    Counters have no event to wait on, hence polling; `within` rather than asyncio.timeout so the
    failure names what did not happen.
    """
    started = time.monotonic()
    deadline = started + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def running(gateway: Gateway, *, wait_connected: bool = True) -> AsyncIterator[Gateway]:
    """Run the gateway for the block; stop it gracefully (drain, DISCONNECT) at the end."""
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(gateway.run(stop), name="gateway")
        try:
            if wait_connected:
                await until(gateway.mqtt.connected.is_set, "gateway connected")
            yield gateway
        finally:
            stop.set()


def payload(seq: int) -> bytes:
    return json.dumps({"seq": seq, "ts": T0 + seq / 1000, "t": seq % 50}).encode()


class Publisher:
    """A paho QoS 1 publisher on its own network thread: reconnects by itself and resends what was not acked.

    `sent` holds, per device, the seqs published; `unacked()` tells how many the broker has not
    acknowledged yet (after `flush`, 0 means the broker has them all).
    """

    def __init__(self, host: str, port: int) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv311
        )
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # paho annotates int, takes float
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)  # no limit: hold everything while disconnected
        self.sent: dict[str, set[int]] = defaultdict(set)
        self._published = 0
        self._acked = 0  # PUBACKs, counted on paho's thread (the only writer)
        self.client.on_publish = self._on_publish
        self._next: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.client.connect(host, port, keepalive=5)
        self.client.loop_start()

    def publish(self, devices: Iterable[str], per_device: int, interval: float = 0.0) -> None:
        """Publish `per_device` messages to each device in turn (blocking; run it in a thread)."""
        devices = list(devices)
        for _ in range(per_device):
            for device in devices:
                with self._lock:
                    self._next[device] += 1
                    seq = self._next[device]
                    info = self.client.publish(f"devices/{device}/telemetry", payload(seq), qos=1)
                    if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                        raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
                    self._published += 1
                    self.sent[device].add(seq)
            if interval:
                time.sleep(interval)

    def _on_publish(
        self, client: paho.Client, userdata: object, mid: int, reason: object, props: object
    ) -> None:
        self._acked += 1

    def unacked(self) -> int:
        # MQTTMessageInfo is no help here: a message queued while disconnected keeps rc NO_CONN (and
        # is_published() raises) even after it was sent and acked on the next connection.
        return self._published - self._acked

    def total(self) -> int:
        return sum(len(seqs) for seqs in self.sent.values())

    async def flush(self, within: float = 10.0) -> None:
        await until(lambda: self.unacked() == 0, f"broker acked all {self.total()} publishes", within)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.asynccontextmanager
async def publisher(host: str, port: int) -> AsyncIterator[Publisher]:
    pub = await asyncio.to_thread(Publisher, host, port)
    try:
        yield pub
    finally:
        await asyncio.to_thread(pub.close)


def telemetry_seqs(points: Iterable[Point]) -> dict[str, set[int]]:
    stored: dict[str, set[int]] = defaultdict(set)
    for point in points:
        if point.measurement == "telemetry" and "seq" in point.fields:
            stored[dict(point.tags)["device"]].add(int(point.fields["seq"]))
    return stored


@dataclass
class Tally:
    """Sent versus stored, per device."""

    sent: int
    stored: int
    deliveries: int  # telemetry messages the gateways received, redeliveries included
    missing: dict[str, list[int]] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return max(self.deliveries - self.stored, 0)

    def __str__(self) -> str:
        missing = sum(len(seqs) for seqs in self.missing.values())
        detail = {device: seqs[:10] for device, seqs in self.missing.items()}
        return (
            f"sent {self.sent}, stored {self.stored}, missing {missing} {detail}, "
            f"deliveries {self.deliveries}, duplicates {self.duplicates}"
        )


def tally(sent: Mapping[str, set[int]], store: MemoryStore, gateways: Sequence[Gateway]) -> Tally:
    stored = telemetry_seqs(store.points)
    missing = {
        d: sorted(seqs - stored.get(d, set())) for d, seqs in sent.items() if seqs - stored.get(d, set())
    }
    return Tally(
        sent=sum(len(s) for s in sent.values()),
        stored=sum(len(stored.get(d, set()) & s) for d, s in sent.items()),
        deliveries=sum(g.ingest.stats.received for g in gateways),
        missing=missing,
    )


async def all_stored(
    sent: Mapping[str, set[int]], store: MemoryStore, what: str, within: float = 10.0
) -> None:
    def complete() -> bool:
        stored = telemetry_seqs(store.points)
        return all(seqs <= stored.get(device, set()) for device, seqs in sent.items())

    try:
        await until(complete, what, within)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {tally(sent, store, [])}") from None


def devices(n: int) -> list[str]:
    return [f"d-{i}" for i in range(n)]


# -- M1 broker graceful restart -----------------------------------------------------------------------


def test_m1_broker_graceful_restart_under_load(mosquitto_fresh: MosquittoBroker) -> None:
    broker = mosquitto_fresh
    store = MemoryStore()
    gateway = new_gateway(settings_for(broker.host, broker.port, client_id("m1")), store)

    async def scenario() -> tuple[Tally, float]:
        async with running(gateway), publisher(broker.host, broker.port) as pub:
            load = asyncio.create_task(asyncio.to_thread(pub.publish, devices(3), 1000, 0.002))
            await until(lambda: gateway.ingest.stats.received >= 600, "load reached the gateway")
            await asyncio.to_thread(broker.restart)  # SIGTERM: mosquitto saves sessions and queues
            back_at = time.monotonic()
            await until(lambda: gateway.mqtt.stats.connects == 2, "gateway reconnected")
            reconnect = time.monotonic() - back_at
            await load
            await pub.flush()
            await all_stored(pub.sent, store, "everything published arrived")
            return tally(pub.sent, store, [gateway]), reconnect

    result, reconnect = asyncio.run(scenario())
    print(f"M1: {result}; reconnected {reconnect:.2f}s after the broker was back")
    assert not result.missing, str(result)
    assert result.sent == 3000
    assert reconnect < 5.0
    assert gateway.mqtt.stats.sessions_lost == 0


# -- M3 tidegate graceful restart ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_m3_gateway_graceful_restart_under_load(mosquitto: MosquittoBroker, protocol: Protocol) -> None:
    store = MemoryStore()
    settings = settings_for(mosquitto.host, mosquitto.port, client_id(f"m3-{protocol}"), protocol)
    first, second = new_gateway(settings, store), new_gateway(settings, store)

    async def scenario() -> Tally:
        async with publisher(mosquitto.host, mosquitto.port) as pub:
            async with running(first):  # its first connection creates the session and subscriptions
                load = asyncio.create_task(asyncio.to_thread(pub.publish, devices(2), 1000, 0.002))
                await until(lambda: first.ingest.stats.received >= 300, "load reached the first gateway")
            # stopped mid-stream (drained and disconnected); the broker queues for our session
            await asyncio.sleep(0.5)
            async with running(second):
                await load
                await pub.flush()
                await all_stored(pub.sent, store, "everything published arrived")
            return tally(pub.sent, store, [first, second])

    result = asyncio.run(scenario())
    print(f"M3 MQTT {protocol}: {result}")
    assert not result.missing, str(result)
    assert second.mqtt.stats.sessions_lost == 0
    assert second.ingest.stats.received > 0  # the second gateway did receive what was queued


# -- M4 (light) crash between receive and write -------------------------------------------------------


class StuckStore(MemoryStore):
    """A store whose writes never finish: the gateway receives, never writes, so never acks."""

    async def write(self, points: Sequence[Point]) -> None:
        self.writes += 1
        await asyncio.Event().wait()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_m4_crash_before_write_redelivers_everything(mosquitto: MosquittoBroker, protocol: Protocol) -> None:
    cid = client_id(f"m4-{protocol}")
    store = MemoryStore()

    async def scenario() -> tuple[Gateway, Gateway, Tally]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            doomed = new_gateway(settings_for(proxy.host, proxy.port, cid, protocol), StuckStore())
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                task = group.create_task(doomed.run(stop))
                await until(doomed.mqtt.connected.is_set, "doomed gateway connected")
                async with publisher(mosquitto.host, mosquitto.port) as pub:
                    await asyncio.to_thread(pub.publish, devices(2), 200)
                    await pub.flush()
                await until(lambda: doomed.ingest.stats.received == 400, "doomed gateway received all")
                assert doomed.ingest.stats.written == 0
                # "crash": no drain and no DISCONNECT; its TCP connection dies with an RST
                task.cancel()
            proxy.reset_connections()
        fresh = new_gateway(settings_for(mosquitto.host, mosquitto.port, cid, protocol), store)
        async with running(fresh):
            await all_stored(pub.sent, store, "every message redelivered to the fresh gateway")
        return doomed, fresh, tally(pub.sent, store, [fresh])

    _, fresh, result = asyncio.run(scenario())
    print(f"M4 light MQTT {protocol}: {result}")
    assert not result.missing, str(result)
    assert fresh.mqtt.stats.sessions_lost == 0


# -- M4 SIGKILL of a `tidegate run` process, repeated, into a real InfluxDB -----------------------------


def gateway_process(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    # TIDEGATE_* variables override the config file: keep the developer's out of the test
    env = {name: value for name, value in os.environ.items() if not name.startswith("TIDEGATE_")}
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )


def connections_logged(log_path: Path) -> int:
    return log_path.read_text(encoding="utf-8", errors="replace").count("connected to ")


def stored_seqs(influx: InfluxDBServer, database: str) -> dict[str, set[int]]:
    stored: dict[str, set[int]] = defaultdict(set)
    for row in influx.rows('SELECT "seq" FROM "telemetry" GROUP BY "device"', database):
        stored[row["device"]].add(int(row["seq"]))
    return stored


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(20, id="20-kills", marks=pytest.mark.timeout(180)),
    ],
)
def test_m4_sigkill_at_random_moments_loses_nothing(
    mosquitto: MosquittoBroker, influxdb_v1: InfluxDBServer, tmp_path: Path, kills: int
) -> None:
    database = influxdb_v1.create_database("m4kill")
    config = tmp_path / "tidegate.yaml"
    config.write_text(
        "mqtt:\n"
        f"  url: {mosquitto.url}\n"
        f"  client_id: {client_id('m4kill')}\n"
        "store:\n"
        "  kind: influxdb_v1\n"
        f"  url: {influxdb_v1.url}\n"
        f"  database: {database}\n"
        "batch:\n"
        "  flush_interval: 0.1\n",
        encoding="utf-8",
    )
    log_path = tmp_path / "tidegate.log"
    rng = random.Random(4)  # reproducible kill moments
    print(f"M4 kill moments seed 4, log {log_path}")

    async def scenario() -> tuple[dict[str, set[int]], dict[str, set[int]]]:
        first = gateway_process(config, log_path)
        try:
            # the first run creates the session; what is published before it subscribed is not ours
            await until(lambda: connections_logged(log_path) == 1, "first gateway connected", 15)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        async with publisher(mosquitto.host, mosquitto.port) as pub:
            load = asyncio.create_task(asyncio.to_thread(pub.publish, devices(2), 200 * kills, 0.005))
            for kill in range(1, kills + 1):
                process = gateway_process(config, log_path)
                try:
                    # connected: from here on it receives (a backlog first), writes and acks
                    await until(
                        functools.partial(_logged_connections_are, log_path, kill + 1),
                        f"run {kill} connected",
                    )
                    await asyncio.sleep(rng.uniform(0.0, 1.0))
                finally:
                    process.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(process.wait)
            await load
            await pub.flush()
        last = gateway_process(config, log_path)
        try:
            sent = dict(pub.sent)
            await until(
                lambda: all(s <= stored_seqs(influxdb_v1, database).get(d, set()) for d, s in sent.items()),
                "everything published is in InfluxDB",
                20,
            )
        finally:
            last.send_signal(signal.SIGTERM)
            await asyncio.to_thread(last.wait, 10)
        return sent, stored_seqs(influxdb_v1, database)

    sent, stored = asyncio.run(scenario())
    missing = {d: sorted(s - stored.get(d, set())) for d, s in sent.items() if s - stored.get(d, set())}
    print(f"M4 {kills} SIGKILLs: sent {sum(map(len, sent.values()))}, missing {missing}")
    assert not missing


# -- M5 network partition without reset ---------------------------------------------------------------


def test_m5_blackhole_is_detected_and_nothing_published_meanwhile_is_lost(mosquitto: MosquittoBroker) -> None:
    store = MemoryStore()

    async def scenario() -> tuple[Gateway, Tally, float, float]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            gateway = new_gateway(
                settings_for(proxy.host, proxy.port, client_id("m5"), keepalive=KEEPALIVE), store
            )
            async with running(gateway), publisher(mosquitto.host, mosquitto.port) as pub:
                await asyncio.to_thread(pub.publish, devices(2), 100)
                await all_stored(pub.sent, store, "before the partition")
                await asyncio.sleep(0.3)  # let their PUBACKs through, or they are redelivered later
                proxy.set_mode(Mode.BLACKHOLE)
                load = asyncio.create_task(asyncio.to_thread(pub.publish, devices(2), 100, 0.02))
                detected = await until(
                    lambda: not gateway.mqtt.connected.is_set(), "partition detected", 2 * KEEPALIVE + 3
                )
                proxy.set_mode(Mode.PASS)
                reconnected = await until(gateway.mqtt.connected.is_set, "reconnected after the partition")
                await load
                await asyncio.to_thread(pub.publish, devices(2), 100)
                await pub.flush()
                await all_stored(pub.sent, store, "everything published arrived")
                return gateway, tally(pub.sent, store, [gateway]), detected, reconnected

    gateway, result, detected, reconnected = asyncio.run(scenario())
    print(
        f"M5: {result}; partition detected after {detected:.1f}s, reconnected {reconnected:.1f}s after heal"
    )
    assert not result.missing, str(result)
    # the gateway drops a link silent for 1.5 x keepalive, checked every MISC_INTERVAL
    assert detected <= 1.5 * KEEPALIVE + 2 * MISC_INTERVAL
    assert gateway.mqtt.stats.connects == 2
    assert gateway.mqtt.stats.sessions_lost == 0


def test_m5_blackhole_right_after_traffic_is_detected_within_one_and_a_half_keepalives(
    mosquitto: MosquittoBroker,
) -> None:
    # Under load the last inbound packet is always just before the partition starts; an idle
    # gateway whose last packet (the SUBACK) came just before is the same case, without the load.
    async def scenario() -> float:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            gateway = new_gateway(
                settings_for(proxy.host, proxy.port, client_id("m5w"), keepalive=KEEPALIVE), MemoryStore()
            )
            async with running(gateway):
                await asyncio.sleep(0.2)  # the SUBACK is the last inbound packet
                proxy.set_mode(Mode.BLACKHOLE)
                detected = await until(
                    lambda: not gateway.mqtt.connected.is_set(), "partition detected", 2 * KEEPALIVE + 3
                )
                proxy.set_mode(Mode.PASS)
                return detected

    detected = asyncio.run(scenario())
    print(f"M5 worst phase: partition detected after {detected:.1f}s (keepalive {KEEPALIVE}s)")
    assert detected <= 1.5 * KEEPALIVE + MISC_INTERVAL


# -- M6 flapping connection ---------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_m6_flapping_connection_leaks_nothing_and_does_not_duplicate_subscriptions(
    mosquitto: MosquittoBroker,
) -> None:
    store = MemoryStore()
    flaps = 10

    async def scenario() -> tuple[Gateway, Tally, tuple[int, int], tuple[int, int]]:
        with ThreadedFaultProxy(mosquitto.host, mosquitto.port) as proxy:
            gateway = new_gateway(settings_for(proxy.host, proxy.port, client_id("m6")), store)
            async with running(gateway), publisher(mosquitto.host, mosquitto.port) as pub:
                await asyncio.to_thread(pub.publish, devices(1), 10)
                await all_stored(pub.sent, store, "before flapping")
                baseline = (len(asyncio.all_tasks()), open_fds())
                for flap in range(1, flaps + 1):
                    assert await asyncio.to_thread(proxy.reset_connections) == 1
                    await until(functools.partial(_connects_are, gateway, flap + 1), f"reconnect {flap}")
                await asyncio.sleep(0.2)  # the last SUBACK
                now = (len(asyncio.all_tasks()), open_fds())
                if now != baseline:  # closed sockets and finished tasks may take a moment
                    with contextlib.suppress(AssertionError):
                        await until(lambda: (len(asyncio.all_tasks()), open_fds()) == baseline, "settle", 3)
                    now = (len(asyncio.all_tasks()), open_fds())
                before = gateway.ingest.stats.received
                await asyncio.to_thread(pub.publish, devices(2), 50)
                await pub.flush()
                await all_stored(pub.sent, store, "after flapping")
                await asyncio.sleep(0.3)  # a duplicate subscription would deliver a second copy by now
                assert gateway.ingest.stats.received - before == 100, "each message delivered once"
                assert (gateway.mqtt.stats.connects, gateway.mqtt.stats.disconnects) == (flaps + 1, flaps)
                return gateway, tally(pub.sent, store, [gateway]), baseline, now

    _, result, baseline, now = asyncio.run(scenario())
    # Duplicates here are the first messages redelivered on connections reset before their PUBACK left.
    print(f"M6: {result}; (tasks, fds) before {baseline}, after {flaps} flaps {now}")
    assert not result.missing, str(result)
    assert now == baseline


# -- M7 bad credentials -------------------------------------------------------------------------------


class AuthMosquitto(MosquittoBroker):
    """mosquitto with a second listener that requires a password (`auth_port`).

    The first listener stays anonymous because `MosquittoBroker` probes it with an anonymous CONNECT
    to know the broker is up; per-listener settings must come first in mosquitto.conf.
    """

    def __init__(self, *, password_file: Path, **options: object) -> None:
        self.auth_port = free_port()
        lines = [
            f"listener {self.auth_port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {password_file}",
        ]
        super().__init__(extra_config=lines, **options)  # type: ignore[arg-type]

    def config_text(self) -> str:
        return "per_listener_settings true\n" + super().config_text()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def auth_mosquitto(tmp_path: Path) -> Iterable[AuthMosquitto]:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip("mosquitto is not installed")
    password_file = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(password_file), "tidegate", "right-password"],
        check=True,
        capture_output=True,
    )
    with AuthMosquitto(
        executable=executable, data_dir=tmp_path / "mosquitto", password_file=password_file
    ) as b:
        yield b


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_m7_bad_credentials_are_reported_retried_with_backoff_and_never_logged(
    auth_mosquitto: AuthMosquitto, protocol: Protocol, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    observe = 5.0

    async def scenario() -> tuple[Gateway, int]:
        async with FaultProxy(auth_mosquitto.host, auth_mosquitto.auth_port) as proxy:  # counts attempts
            settings = settings_for(
                proxy.host, proxy.port, client_id("m7"), protocol, username="tidegate", password=PASSWORD
            )
            gateway = new_gateway(settings, MemoryStore())
            async with running(gateway, wait_connected=False):
                await until(lambda: "refused" in gateway.mqtt.stats.last_error, "refusal reported")
                await asyncio.sleep(observe)
                assert not gateway.mqtt.connected.is_set()
                return gateway, proxy.accepted

    gateway, attempts = asyncio.run(scenario())
    refusals = [r for r in caplog.records if r.levelno >= logging.ERROR and "refused" in r.getMessage()]
    print(
        f"M7 MQTT {protocol}: {attempts} attempts in ~{observe}s; first error: {refusals[0].getMessage()!r}"
    )
    assert "not authori" in refusals[0].getMessage().lower()
    # backoff 0.5 s doubling, with jitter: about 5 attempts in 5 s; a tight loop would make hundreds
    assert 2 <= attempts <= 8
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(gateway.snapshot())
    assert PASSWORD not in gateway.mqtt.stats.last_error


# -- M8 session expired during an outage --------------------------------------------------------------


def test_m8_session_expired_during_outage_is_detected_and_subscriptions_restored(
    mosquitto: MosquittoBroker,
) -> None:
    store = MemoryStore()

    async def scenario() -> tuple[Gateway, Tally]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            gateway = new_gateway(
                settings_for(proxy.host, proxy.port, client_id("m8"), session_expiry=1), store
            )
            async with running(gateway), publisher(mosquitto.host, mosquitto.port) as pub:
                await asyncio.to_thread(pub.publish, devices(1), 10)
                await all_stored(pub.sent, store, "before the outage")
                proxy.set_mode(Mode.RESET)  # the connection dies, reconnects are refused
                await until(lambda: not gateway.mqtt.connected.is_set(), "outage noticed")
                await asyncio.sleep(2.5)  # longer than the session expiry (1 s)
                proxy.set_mode(Mode.PASS)
                await until(lambda: gateway.mqtt.stats.connects == 2, "reconnected after the outage")
                before = {device: set(seqs) for device, seqs in pub.sent.items()}
                received = gateway.ingest.stats.received
                await asyncio.to_thread(pub.publish, devices(1), 10)
                await pub.flush()
                after = {d: seqs - before[d] for d, seqs in pub.sent.items()}
                await all_stored(after, store, "messages published after the new session arrive")
                result = tally(after, store, [gateway])
                result.deliveries -= received
                return gateway, result

    gateway, result = asyncio.run(scenario())
    print(f"M8: {result}")
    assert gateway.mqtt.stats.sessions_lost == 1
    [event] = [p for p in store.points if p.measurement == "gateway_events"]
    assert dict(event.tags)["kind"] == "session_lost"
    assert float(event.fields["since"]) < float(event.fields["until"])  # the possible-loss window
    assert not result.missing, str(result)


# -- I1 malformed payloads are acked ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_i1_malformed_payloads_are_acked_not_redelivered(
    mosquitto: MosquittoBroker, protocol: Protocol
) -> None:
    cid = client_id(f"i1-{protocol}")
    store = MemoryStore()
    bad = [b"", b"not json", b'{"t": NaN}', b"\xff\xfe", b"[" * 5000, b'{"seq": "x"}', b'{"t": 1e400}']

    async def scenario() -> tuple[Gateway, Gateway]:
        settings = settings_for(mosquitto.host, mosquitto.port, cid, protocol)
        first, second = new_gateway(settings, store), new_gateway(settings, store)
        async with publisher(mosquitto.host, mosquitto.port) as pub:
            async with running(first):
                for body in bad:
                    pub.client.publish("devices/d-1/telemetry", body, qos=1)
                await asyncio.to_thread(pub.publish, ["d-1"], 1)  # a good one after the bad ones
                await all_stored(pub.sent, store, "the good message after the bad ones")
                await until(lambda: first.ingest.stats.rejected == len(bad), "all bad payloads rejected")
            async with running(second):
                await asyncio.to_thread(pub.publish, ["d-1"], 1)  # a marker: all before it came first
                await all_stored(pub.sent, store, "the marker")
                await asyncio.sleep(0.2)
        return first, second

    first, second = asyncio.run(scenario())
    assert (first.ingest.stats.received, first.ingest.stats.rejected) == (len(bad) + 1, len(bad))
    assert (second.ingest.stats.received, second.ingest.stats.rejected) == (1, 0), "nothing redelivered"


def _logged_connections_are(log_path: Path, count: int) -> bool:
    return bool(connections_logged(log_path) == count)


def _connects_are(gateway: Gateway, count: int) -> bool:
    return gateway.mqtt.stats.connects == count
