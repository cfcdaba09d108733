"""A gateway restarted in the middle of a `for` period, and with a raised alarm, against a real broker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
import pytest

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.config import BatchSettings, MqttSettings, NullSettings, RulesSettings, Settings
from gateway.store.memory import MemoryStore

pytestmark = pytest.mark.integration

HOT_FOR_3S = """\
rules:
  - id: hot
    when: temperature > 30
    for: 3s
"""


async def until(condition: Callable[[], bool], limit: float = 10) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - counters have no event to wait on
            await asyncio.sleep(0.02)


def send(broker: MosquittoBroker, seq: int, ts: float, temperature: float) -> None:
    payload = json.dumps({"seq": seq, "ts": ts, "temperature": temperature})
    publish.single("devices/d-1/telemetry", payload, qos=1, hostname=broker.host, port=broker.port)


def alerts(store: MemoryStore) -> list[tuple[str, Any]]:
    return [(dict(p.tags)["state"], p.ts) for p in store.points if p.measurement == "alerts"]


def test_a_restart_during_a_for_period_raises_once_on_time_and_never_again(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "hot.yaml").write_text(HOT_FOR_3S)
    state_file = tmp_path / "rules-state.json"
    settings = Settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"tg-restart-{uuid.uuid4().hex[:8]}"),
        store=NullSettings(kind="null"),
        batch=BatchSettings(flush_interval=0.05),
        rules=RulesSettings(dir=rules_dir, checkpoint_file=state_file),
    )
    stores = [MemoryStore(), MemoryStore(), MemoryStore()]
    t0 = time.time()

    async def run(store: MemoryStore, steps: Callable[[Gateway], object]) -> Gateway:
        gateway = Gateway(settings, store=store)
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.mqtt.connected.wait(), 10)
            await steps(gateway)  # type: ignore[misc]
            stop.set()
        return gateway

    async def before(gateway: Gateway) -> None:
        nonlocal t0
        t0 = time.time()
        await asyncio.to_thread(send, mosquitto, 1, t0, 35)
        await until(lambda: gateway.ingest.stats.written == 1)
        await asyncio.sleep(max(t0 + 1 - time.time(), 0))  # stopped 1 s into the 3 s period

    async def after(gateway: Gateway) -> None:
        await until(lambda: alerts(stores[1]) != [], limit=6)
        raised_at = time.time()
        # the period went on counting from t0 while the gateway was down: not 3 s from the restart
        assert t0 + 3 <= raised_at < t0 + 3 + 1.5
        assert alerts(stores[1]) == [("raised", pytest.approx(t0 + 3, abs=1e-3))]
        await asyncio.to_thread(send, mosquitto, 1, t0, 35)  # a redelivery of the first message
        await asyncio.to_thread(send, mosquitto, 2, t0 + 4, 36)
        await until(lambda: gateway.ingest.stats.written == 2)
        assert gateway.ingest.stats.duplicates == 1
        assert len(alerts(stores[1])) == 1

    async def later(gateway: Gateway) -> None:
        await asyncio.to_thread(send, mosquitto, 3, time.time(), 37)
        await until(lambda: gateway.ingest.stats.written == 1)
        assert [(a.rule_id, a.since) for a in gateway.engine.active_alarms()] == [  # type: ignore[comparison-overlap]
            ("hot", pytest.approx(t0 + 3, abs=1e-3))
        ]

    async def scenario() -> None:
        first = await run(stores[0], before)
        assert alerts(stores[0]) == []
        assert first.snapshot()["checkpoints_written"] >= 1
        assert state_file.exists()
        await run(stores[1], after)
        third = await run(stores[2], later)
        assert alerts(stores[2]) == []  # raised before the restart: not raised again
        assert third.snapshot()["checkpoint_failures"] == 0

    asyncio.run(scenario())
    assert sum(len(alerts(store)) for store in stores) == 1
