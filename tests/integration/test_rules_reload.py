"""Hot reload of rule files in a running gateway, and alarms listed and acknowledged over HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import paho.mqtt.publish as publish
import pytest

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.cli import main
from gateway.config import BatchSettings, HttpSettings, MqttSettings, NullSettings, RulesSettings, Settings
from gateway.store.memory import MemoryStore
from rules.engine import RULE_CHANGED_MESSAGE

pytestmark = pytest.mark.integration

HOT = """\
rules:
  - id: hot
    when: temperature > 30
    clear: temperature < 26
"""
INVALID = """\
rules:
  - id: hot
    when: temperature >
"""
HOT_AND_WET = (
    HOT
    + """\
  - id: wet
    when: humidity > 90
"""
)
HOTTER = HOT_AND_WET.replace("temperature > 30", "temperature > 35")


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - counters have no event to wait on
            await asyncio.sleep(0.02)


def send(broker: MosquittoBroker, device: str, seq: int, **fields: float) -> None:
    payload = json.dumps({"seq": seq, **fields})
    publish.single(f"devices/{device}/telemetry", payload, qos=1, hostname=broker.host, port=broker.port)


def test_reload_keeps_unchanged_rules_refuses_bad_files_and_alarms_are_acknowledged(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rule_file = tmp_path / "rules" / "greenhouse.yaml"
    rule_file.parent.mkdir()
    rule_file.write_text(HOT)
    settings = Settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"tg-reload-{uuid.uuid4().hex[:8]}"),
        store=NullSettings(kind="null"),
        batch=BatchSettings(flush_interval=0.05),
        rules=RulesSettings(dir=rule_file.parent),
        http=HttpSettings(listen="127.0.0.1:0"),
    )
    store = MemoryStore()
    gateway = Gateway(settings, store=store, rule_poll_interval=0.1)
    caplog.set_level(logging.INFO, logger="gateway.app")

    def alerts() -> list[tuple[str, str, str]]:
        return [
            (dict(p.tags)["rule"], dict(p.tags)["state"], str(p.fields["message"]))
            for p in store.points
            if p.measurement == "alerts"
        ]

    async def written(count: int) -> None:
        await until(lambda: gateway.ingest.stats.written == count)

    async def scenario() -> None:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            running = group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.mqtt.connected.wait(), 10)
            await asyncio.to_thread(send, mosquitto, "d-1", 1, temperature=31)
            await until(lambda: alerts() == [("hot", "raised", "temperature > 30")])
            since = gateway.engine.active_alarms()[0].since

            # (a) an invalid file: refused with its location, the running rules stay in force
            rule_file.write_text(INVALID)
            await until(lambda: gateway.rule_reload_failures == 1)
            assert gateway.rule_reloads == 0
            assert any(
                "greenhouse.yaml:3:" in record.getMessage() and record.levelno == logging.ERROR
                for record in caplog.records
            )
            assert [a.rule_id for a in gateway.engine.active_alarms()] == ["hot"]

            # (b) the same rule plus a new one: the alarm stays raised, nothing is recorded again
            rule_file.write_text(HOT_AND_WET)
            await until(lambda: gateway.rule_reloads == 1)
            assert "reloaded 2 rules (1 unchanged, 0 changed, 1 added, 0 removed)" in caplog.text
            await asyncio.to_thread(send, mosquitto, "d-1", 2, temperature=33)
            await written(2)
            assert [(a.rule_id, a.since) for a in gateway.engine.active_alarms()] == [("hot", since)]
            assert alerts() == [("hot", "raised", "temperature > 30")]

            # (c) a changed threshold: the old alarm is closed with the documented record
            rule_file.write_text(HOTTER)
            await until(lambda: gateway.rule_reloads == 2)
            assert "reloaded 2 rules (1 unchanged, 1 changed, 0 added, 0 removed)" in caplog.text
            await until(lambda: len(alerts()) == 2)
            assert alerts()[1] == ("hot", "cleared", RULE_CHANGED_MESSAGE)
            assert gateway.engine.active_alarms() == []

            # SIGHUP's path: a reload on request, with nothing changed
            gateway.request_reload()
            await until(lambda: gateway.rule_reloads == 3)
            assert "reloaded 2 rules (2 unchanged, 0 changed, 0 added, 0 removed)" in caplog.text

            # raise under the new rule, then list and acknowledge over HTTP
            await asyncio.to_thread(send, mosquitto, "d-1", 3, temperature=36, humidity=95)
            await until(lambda: len(gateway.engine.active_alarms()) == 2)
            assert gateway.status_server is not None
            url = f"http://127.0.0.1:{gateway.status_server.port}"
            async with httpx.AsyncClient() as client:
                listed = (await client.get(f"{url}/alarms")).json()
                assert [(a["rule"], a["device"], a["acknowledged"]) for a in listed] == [
                    ("hot", "d-1", False),
                    ("wet", "d-1", False),
                ]
                assert listed[0]["values"] == {"temperature": 36}
                status = (await client.get(f"{url}/status")).json()
                assert (status["rule_reloads"], status["rule_reload_failures"]) == (3, 1)

            capsys.readouterr()
            assert await asyncio.to_thread(main, ["alerts", "--url", url]) == 0
            table = capsys.readouterr().out
            assert "hot" in table and "wet" in table and "2 active alarm(s), 0 acknowledged" in table
            assert await asyncio.to_thread(main, ["alerts", "ack", "hot", "d-1", "--url", url]) == 0
            assert await asyncio.to_thread(main, ["alerts", "ack", "hot", "d-9", "--url", url]) == 1
            assert "no active alarm for rule 'hot' on device 'd-9'" in capsys.readouterr().err
            assert await asyncio.to_thread(main, ["alerts", "--url", url, "--json"]) == 0
            shown = json.loads(capsys.readouterr().out)
            assert [(a["rule"], a["acknowledged"]) for a in shown] == [("hot", True), ("wet", False)]
            await until(lambda: ("hot", "acknowledged", "acknowledged") in alerts())

            stop.set()
            await running

    asyncio.run(scenario())
    assert gateway.snapshot()["rules_loaded"] == 2
