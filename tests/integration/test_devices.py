"""Devices against a real mosquitto: birth and last will, status changes stored, per-type validation,
and `/devices` listing them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import httpx
import pytest

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.config import (
    BatchSettings,
    DeadLetterSettings,
    DevicesSettings,
    HttpSettings,
    MqttSettings,
    NullSettings,
    Settings,
)
from gateway.records import DEVICE_STATUS
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from simulator import run_simulation
from simulator.runner import device_ids
from tests.integration.faultproxy import FaultProxy, Mode

pytestmark = pytest.mark.integration


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - gateway state has no event to wait on
            await asyncio.sleep(0.02)


def registry_text(ids: list[str]) -> str:
    devices = "\n".join(
        f"  - {{id: {device_id}, type: greenhouse, tags: {{site: north}}}}" for device_id in ids
    )
    return f"""
types:
  greenhouse:
    fields:
      temperature: {{type: number, unit: "°C", min: -40, max: 85}}
      humidity: {{type: number, unit: "%RH", min: 0, max: 100}}
      fan: {{type: bool}}
devices:
{devices}
"""


def test_devices_come_online_go_offline_by_last_will_and_are_listed(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Unique ids: the broker is shared by the session and keeps retained status messages.
    run = uuid.uuid4().hex[:6]
    steady, doomed = device_ids(2, f"steady{run}"), device_ids(1, f"doomed{run}")
    registry = tmp_path / "devices.yaml"
    registry.write_text(registry_text([*steady, *doomed]), encoding="utf-8")
    dead_letter = tmp_path / "dead-letter.jsonl"
    settings = Settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"tg-{run}"),
        store=NullSettings(kind="null"),
        batch=BatchSettings(flush_interval=0.05),
        http=HttpSettings(listen="127.0.0.1:0"),
        dead_letter=DeadLetterSettings(file=dead_letter),
        devices=DevicesSettings(file=registry, unknown="reject"),
    )
    store = MemoryStore()
    gateway = Gateway(settings, rule_set=build_rule_set({}), store=store)
    tracker = gateway.ingest.tracker

    def status(device_id: str) -> str:
        return tracker.view(device_id, 0.0).status

    async def scenario() -> list[dict[str, object]]:
        stop, stop_sims = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as group, FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.ready.wait(), timeout=10)
            await asyncio.wait_for(gateway.mqtt.connected.wait(), timeout=10)
            group.create_task(
                run_simulation(
                    mosquitto.url,
                    devices=2,
                    rate=5,
                    duration=None,
                    seed=1,
                    id_prefix=f"steady{run}",
                    stop=stop_sims,
                )
            )
            group.create_task(
                run_simulation(
                    f"mqtt://{proxy.host}:{proxy.port}",
                    devices=1,
                    rate=5,
                    duration=None,
                    seed=2,
                    id_prefix=f"doomed{run}",
                    stop=stop_sims,
                )
            )
            await until(lambda: all(status(d) == "online" for d in [*steady, *doomed]))
            await until(lambda: all((tracker.view(d, 0.0).last_seen or 0) > 0 for d in steady))

            # Killed without a DISCONNECT: the broker publishes the device's last will.
            proxy.set_mode(Mode.RESET)
            await until(lambda: status(doomed[0]) == "offline")

            # A registered device sending an out-of-range value is dead-lettered with the reason.
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"probe-{run}") as probe:
                payload = json.dumps({"temperature": 150.0, "humidity": 40.0}).encode()
                await probe.publish(f"devices/{steady[0]}/telemetry", payload, qos=1)
                await probe.publish(f"devices/stranger{run}/telemetry", b'{"temperature": 20}', qos=1)
            await until(lambda: gateway.ingest.stats.rejected >= 2)

            assert gateway.status_server is not None
            async with httpx.AsyncClient() as http:
                response = await http.get(f"http://127.0.0.1:{gateway.status_server.port}/devices")
            listed: list[dict[str, object]] = response.json()

            stop_sims.set()  # a clean stop publishes offline itself
            await until(lambda: all(status(d) == "offline" for d in steady))
            await until(lambda: sum(p.measurement == DEVICE_STATUS for p in store.points) >= 6)
            stop.set()
        # Leave the shared broker as found: an empty retained message clears a retained status.
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"cleaner-{run}") as cleaner:
            for device_id in [*steady, *doomed]:
                await cleaner.publish(f"devices/{device_id}/status", b"", qos=1, retain=True)
        return listed

    listed = asyncio.run(asyncio.wait_for(scenario(), timeout=25))

    by_id = {row["device"]: row for row in listed}
    assert by_id[doomed[0]]["status"] == "offline"
    for device_id in steady:
        row = by_id[device_id]
        assert (row["status"], row["type"], row["tags"]) == ("online", "greenhouse", {"site": "north"})
        assert isinstance(row["rate"], float) and row["rate"] > 0
        assert row["alarms"] == 0
    changes = [
        (dict(p.tags)["device"], dict(p.tags)["status"])
        for p in store.points
        if p.measurement == DEVICE_STATUS
    ]
    for device_id in [*steady, *doomed]:
        assert changes.count((device_id, "online")) == 1, changes
        assert changes.count((device_id, "offline")) == 1, changes
    reasons = [json.loads(line)["reason"] for line in dead_letter.read_text().splitlines()]
    assert any("field 'temperature': 150.0 is outside the allowed range [-40, 85]" in r for r in reasons), (
        reasons
    )
    assert f"device 'stranger{run}' is not in the registry" in reasons
