"""The whole path on real servers: simulator → mosquitto → gateway → InfluxDB 1.x, and commands back."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.config import BatchSettings, InfluxV1Settings, MqttSettings, Settings
from rules import build_rule_set
from simulator import SimulationSummary, run_simulation
from tests.integration.influx_servers import InfluxDBServer

pytestmark = pytest.mark.integration

# Fires on each device's first reading and never clears: exactly one alert and one command per device.
RULES = """
rules:
  - id: always-hot
    when: temperature > -100
    clear: temperature < -200
    severity: critical
    on_raise:
      - alert
      - command: {name: fan, params: {on: true}}
"""


async def run_pipeline(
    broker_url: str, settings: Settings, devices: int
) -> tuple[Gateway, SimulationSummary]:
    gateway = Gateway(settings, rule_set=build_rule_set({"e2e.yaml": RULES}))
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        running = group.create_task(gateway.run(stop))
        await asyncio.wait_for(gateway.mqtt.connected.wait(), timeout=10)
        summary = await run_simulation(
            broker_url, devices=devices, rate=10, duration=3, seed=7, id_prefix="e2e"
        )
        # the last acks travel device → broker → gateway → store; wait for them, not a fixed time
        for _ in range(100):
            if gateway.commands.pending == 0:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await running
    return gateway, summary


def test_simulated_devices_to_influxdb_with_commands_acked(
    mosquitto: MosquittoBroker, influxdb_v1: InfluxDBServer
) -> None:
    database = influxdb_v1.create_database("e2e")
    settings = Settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"tidegate-e2e-{uuid.uuid4().hex[:8]}"),
        store=InfluxV1Settings(kind="influxdb_v1", url=influxdb_v1.url, database=database),
        batch=BatchSettings(flush_interval=0.2),
    )
    devices = 3
    gateway, summary = asyncio.run(run_pipeline(mosquitto.url, settings, devices))

    # every message each device sent is in the store exactly once
    rows = influxdb_v1.rows('SELECT "seq", "temperature" FROM "telemetry" GROUP BY "device"', database)
    seqs: dict[str, list[int]] = {}
    for row in rows:
        seqs.setdefault(row["device"], []).append(row["seq"])
    assert sorted(seqs) == sorted(summary.last_seq)
    for device, last in summary.last_seq.items():
        assert sorted(seqs[device]) == list(range(1, last + 1)), device
    assert all(isinstance(row["temperature"], int | float) for row in rows)  # JSON shows 25.0 as 25
    assert gateway.snapshot()["received"] == summary.sent == len(rows)

    # the threshold raised one alert per device, and each fan command was acked and recorded
    alerts = influxdb_v1.rows('SELECT * FROM "alerts" GROUP BY *', database)
    assert sorted(a["device"] for a in alerts) == sorted(summary.last_seq)
    assert {(a["rule"], a["state"], a["severity"]) for a in alerts} == {("always-hot", "raised", "critical")}
    commands = influxdb_v1.rows('SELECT * FROM "commands" GROUP BY *', database)
    assert Counter(c["status"] for c in commands) == {"sent": devices, "ok": devices}
    sent = {c["id"]: c for c in commands if c["status"] == "sent"}
    acked = {c["id"]: c for c in commands if c["status"] == "ok"}
    assert sent.keys() == acked.keys()
    assert all(sent[i]["device"] == acked[i]["device"] and acked[i]["latency_ms"] > 0 for i in sent)
    assert summary.commands_acked == devices
