"""The gateway against a real mosquitto: bad input never stops it, and its session survives restarts."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import paho.mqtt.client as paho
import paho.mqtt.publish as publish
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.config import (
    BatchSettings,
    DeadLetterSettings,
    InfluxV1Settings,
    MqttSettings,
    NullSettings,
    Settings,
)
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from tests.integration.influx_servers import InfluxDBServer

pytestmark = pytest.mark.integration
DEAD_LETTER = "tidegate/dead-letter"


def settings_for(broker: MosquittoBroker, client_id: str, protocol: Literal["5", "3.1.1"] = "5") -> Settings:
    return Settings(
        mqtt=MqttSettings(url=broker.url, client_id=client_id, protocol=protocol),
        store=NullSettings(kind="null"),  # replaced by a MemoryStore the test can read
        batch=BatchSettings(flush_interval=0.05),
    )


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - counters have no event to wait on
            await asyncio.sleep(0.02)


class Collector:
    """A paho subscriber on a background thread, collecting payloads of one topic filter."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.payloads: list[bytes] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.payloads.append(bytes(m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def send(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> None:
    publish.multiple(
        [{"topic": t, "payload": p, "qos": 1} for t, p in messages], hostname=broker.host, port=broker.port
    )


def test_bad_payloads_are_dead_lettered_and_the_flow_goes_on(mosquitto: MosquittoBroker) -> None:
    store = MemoryStore()
    gateway = Gateway(
        settings_for(mosquitto, f"tg-{uuid.uuid4().hex[:8]}"), rule_set=build_rule_set({}), store=store
    )
    collector = Collector(mosquitto, DEAD_LETTER)
    bad = [b"", b"not json", b'{"t": NaN}', b'{"t": 1e400}', b"\xff\xfe", b"[" * 5000, b'{"t": {"x": 1}}']
    messages = [("devices/d-1/telemetry", b'{"seq": 1, "t": 1}')]
    messages += [("devices/d-1/telemetry", payload) for payload in bad]
    messages += [("devices/bad id/telemetry", b'{"t": 1}'), ("devices/d-1/telemetry", b'{"seq": 2, "t": 2}')]

    async def scenario() -> None:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            running = group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.mqtt.connected.wait(), 10)
            await asyncio.to_thread(send, mosquitto, messages)
            await until(
                lambda: gateway.ingest.stats.received == len(messages) and len(collector.payloads) == 8
            )
            await until(lambda: gateway.ingest.stats.written == 2)
            stop.set()
            await running

    try:
        asyncio.run(scenario())
    finally:
        collector.close()
    stats = gateway.ingest.stats
    assert (stats.received, stats.written, stats.rejected) == (10, 2, 8)
    assert [p.fields["seq"] for p in store.points if p.measurement == "telemetry"] == [1, 2]
    records = [json.loads(p) for p in collector.payloads]
    assert all(r["reason"] for r in records)
    assert {r["device_id"] for r in records} == {"d-1", "bad id"}
    assert all(
        len(r["payload"].encode()) <= 1024 * 3 for r in records
    )  # truncated (replacement chars may widen)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_messages_published_while_the_gateway_is_down_arrive_after_restart(
    mosquitto: MosquittoBroker, protocol: Literal["5", "3.1.1"]
) -> None:
    client_id = f"tg-session-{protocol}-{uuid.uuid4().hex[:6]}"
    store = MemoryStore()

    async def run_once(messages: list[tuple[str, bytes]], expect_written: int) -> Gateway:
        gateway = Gateway(
            settings_for(mosquitto, client_id, protocol), rule_set=build_rule_set({}), store=store
        )
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            running = group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.mqtt.connected.wait(), 10)
            if messages:
                await asyncio.to_thread(send, mosquitto, messages)
            await until(lambda: gateway.ingest.stats.written == expect_written)
            stop.set()
            await running
        return gateway

    first = asyncio.run(run_once([("devices/d-1/telemetry", b'{"seq": 1, "t": 1}')], 1))
    assert first.mqtt.stats.sessions_lost == 0
    # gateway down: the broker queues these for our persistent session
    send(mosquitto, [("devices/d-1/telemetry", f'{{"seq": {i}, "t": {i}}}'.encode()) for i in range(2, 52)])
    second = asyncio.run(run_once([], 50))
    assert second.mqtt.stats.sessions_lost == 0
    assert sorted(int(p.fields["seq"]) for p in store.points if p.measurement == "telemetry") == list(
        range(1, 52)
    )


def test_field_type_conflict_goes_to_the_dead_letter_file_and_the_rest_is_stored(
    mosquitto: MosquittoBroker, influxdb_v1: InfluxDBServer, tmp_path: Path
) -> None:
    database = influxdb_v1.create_database("conflict")
    settings = Settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"tg-{uuid.uuid4().hex[:8]}"),
        store=InfluxV1Settings(kind="influxdb_v1", url=influxdb_v1.url, database=database),
        batch=BatchSettings(flush_interval=0.2),
        dead_letter=DeadLetterSettings(file=tmp_path / "dead.jsonl"),
    )
    gateway = Gateway(settings, rule_set=build_rule_set({}))
    messages = [
        ("devices/d-1/telemetry", b'{"seq": 1, "level": 1.5}'),
        ("devices/d-1/telemetry", b'{"seq": 2, "level": "high"}'),  # string where InfluxDB has a float
        ("devices/d-1/telemetry", b'{"seq": 3, "level": 2.5}'),
    ]

    async def scenario() -> None:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            running = group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.mqtt.connected.wait(), 10)
            await asyncio.to_thread(send, mosquitto, messages[:1])
            await until(lambda: gateway.ingest.stats.written == 1)  # the float type is now established
            await asyncio.to_thread(send, mosquitto, messages[1:])
            await until(lambda: gateway.ingest.stats.written == 3)
            stop.set()
            await running

    asyncio.run(scenario())
    rows = influxdb_v1.rows('SELECT "seq", "level" FROM "telemetry"', database)
    assert sorted((r["seq"], r["level"]) for r in rows) == [(1, 1.5), (3, 2.5)]
    assert gateway.snapshot()["points_rejected"] == 1
    [record] = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert record["kind"] == "point" and record["fields"]["level"] == "high"
    assert "field type conflict" in record["reason"]
