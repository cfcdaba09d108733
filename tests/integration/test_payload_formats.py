"""Payload formats through the real gateway and mosquitto: SenML, MQTT 5 content type, identity.

Telemetry goes through the broker to a gateway writing to a SQLite store, and is read back from it;
refused messages are read back from the dead-letter file. On an MQTT 3.1.1 connection the broker
drops the publisher's content type, so each device type's `format` decides instead.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.config import (
    BatchSettings,
    DeadLetterSettings,
    DevicesSettings,
    MqttSettings,
    Settings,
    SqliteSettings,
)
from gateway.store.base import Query
from gateway.store.sqlite import SqliteStore
from rules import build_rule_set

pytestmark = pytest.mark.integration
T0 = 1_764_000_000.0

REGISTRY = """
types:
  greenhouse:
    fields:
      temperature: {{type: number, min: -40, max: 85}}
      fan: {{type: bool}}
  meter:
    format: senml
    fields:
      temperature: {{type: number, min: -40, max: 85}}
      energy_sum: {{type: number}}
devices:
  - {{id: {gh}, type: greenhouse}}
  - {{id: {meter}, type: meter}}
"""


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - gateway counters have no event to wait on
            await asyncio.sleep(0.02)


def content_type(value: str) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ContentType = value
    return properties


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_senml_content_types_and_spoofed_identity(
    mosquitto: MosquittoBroker, tmp_path: Path, protocol: Literal["5", "3.1.1"]
) -> None:
    run = uuid.uuid4().hex[:6]
    gh, meter = f"gh-{run}", f"meter-{run}"
    registry = tmp_path / "devices.yaml"
    registry.write_text(REGISTRY.format(gh=gh, meter=meter), encoding="utf-8")
    db, dead_letter = tmp_path / "telemetry.db", tmp_path / "dead-letter.jsonl"
    settings = Settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"tg-{run}", protocol=protocol),
        store=SqliteSettings(kind="sqlite", path=db),
        batch=BatchSettings(flush_interval=0.05),
        dead_letter=DeadLetterSettings(file=dead_letter),
        devices=DevicesSettings(file=registry, unknown="reject"),
    )
    gateway = Gateway(settings, rule_set=build_rule_set({}), store=None)
    senml = [
        {"bn": f"{meter}:", "bt": T0, "n": "temperature", "u": "Cel", "v": 21.5},
        {"n": "energy", "u": "J", "s": 7},
        {"n": "seq", "v": 1},
        {"n": "temperature", "t": 10, "v": 22},
    ]
    messages: list[tuple[str, bytes, Properties | None]] = [
        # 0: the meter's own format, no content type needed
        (f"devices/{meter}/telemetry", json.dumps(senml).encode(), None),
        # 1: a spoofed JSON object: the greenhouse claims to be the meter
        (
            f"devices/{gh}/telemetry",
            json.dumps({"device": meter, "seq": 1, "temperature": 30}).encode(),
            None,
        ),
        # 2: a spoofed SenML base name: the meter writes for the greenhouse
        (
            f"devices/{meter}/telemetry",
            json.dumps([{"bn": f"{gh}:", "n": "temperature", "v": 99}]).encode(),
            None,
        ),
        # 3: JSON from the SenML device, labelled as such
        (
            f"devices/{meter}/telemetry",
            json.dumps({"ts": T0 + 20, "seq": 2, "temperature": 23}).encode(),
            content_type("application/json"),
        ),
        # 4: SenML from the JSON device, labelled as such; relative time 0 = "now"
        (
            f"devices/{gh}/telemetry",
            json.dumps([{"n": f"{gh}:fan", "vb": True}]).encode(),
            content_type("application/senml+json"),
        ),
        # 5: a content type tidegate does not read
        (
            f"devices/{gh}/telemetry",
            json.dumps({"ts": T0 + 5, "temperature": 20}).encode(),
            content_type("text/plain"),
        ),
        # 6: plain JSON, as ever
        (f"devices/{gh}/telemetry", json.dumps({"ts": T0, "seq": 7, "temperature": 19.5}).encode(), None),
    ]

    async def scenario() -> tuple[float, float]:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            running = group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.mqtt.connected.wait(), 10)
            sent_from = time.time()
            async with aiomqtt.Client(
                mosquitto.host, mosquitto.port, identifier=f"dev-{run}", protocol=aiomqtt.ProtocolVersion.V5
            ) as device:
                for topic, payload, properties in messages:
                    await device.publish(topic, payload, qos=1, properties=properties)
            stats = gateway.ingest.stats
            await until(
                lambda: stats.received == len(messages) and stats.written + stats.rejected == len(messages)
            )
            sent_until = time.time()
            stop.set()
            await running
        return sent_from, sent_until

    sent_from, sent_until = asyncio.run(scenario())

    async def read(device_id: str) -> list[tuple[float, dict[str, object]]]:
        async with SqliteStore(db) as store:
            rows = await store.query(Query(measurement="telemetry", device_id=device_id))
        return [(row.ts, {k: v for k, v in row.fields.items() if v is not None}) for row in rows]

    meter_rows, gh_rows = asyncio.run(read(meter)), asyncio.run(read(gh))
    dead = [json.loads(line) for line in dead_letter.read_text(encoding="utf-8").splitlines()]
    reasons = {record["payload"]: record["reason"] for record in dead}

    def reason(index: int) -> str:
        return str(reasons.pop(messages[index][1].decode()))

    assert reason(1) == f"'device' names device '{meter}', but the topic is for device '{gh}'"
    assert reason(2) == (
        f"[0] SenML name '{gh}:temperature' names device '{gh}', but the topic is for device '{meter}'"
        f" (expected 'temperature', '{meter}:temperature' or '{meter}/temperature')"
    )
    assert meter_rows[:2] == [
        (T0, {"temperature": 21.5, "energy_sum": 7.0, "seq": 1}),
        (T0 + 10, {"temperature": 22.0}),
    ]
    stats = gateway.ingest.stats
    if protocol == "5":
        assert (
            reason(5)
            == "unsupported content type 'text/plain' (expected application/json or application/senml+json)"
        )
        assert meter_rows[2:] == [(T0 + 20, {"temperature": 23.0, "seq": 2})]
        [(fan_ts, fan_fields)] = [row for row in gh_rows if "fan" in row[1]]
        assert fan_fields == {"fan": True} and sent_from <= fan_ts <= sent_until
        assert [row for row in gh_rows if "fan" not in row[1]] == [(T0, {"temperature": 19.5, "seq": 7})]
        assert (stats.written, stats.rejected) == (4, 3)
    else:  # 3.1.1: no content type arrives, so each device's type decides
        assert reason(3) == "a SenML pack must be a JSON array of records, got dict"
        assert (
            reason(4)
            == "field 'n': not a field of type 'greenhouse'; field 'vb': not a field of type 'greenhouse'"
        )
        assert meter_rows[2:] == []
        assert gh_rows == [(T0, {"temperature": 19.5, "seq": 7}), (T0 + 5, {"temperature": 20.0})]
        assert (stats.written, stats.rejected) == (3, 4)
    assert reasons == {}  # nothing else was dead-lettered
    assert stats.received == len(messages)
