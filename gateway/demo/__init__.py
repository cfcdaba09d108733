"""`tidegate demo`: the whole system on one machine with nothing else installed.

An embedded broker (mosquitto from PATH, else the pure-Python amqtt), the gateway writing to a local
SQLite store, the sample rule file, and simulated devices that the rule cools down with fan commands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.broker import Backend, embedded_broker, find_mosquitto
from gateway.config import MqttSettings, Settings, SqliteSettings
from rules import build_rule_set
from simulator import run_simulation

log = logging.getLogger(__name__)
DEMO_RULES = "rules.yaml"
SETTLE_SECONDS = 2.0  # after the devices stop: let the last acks and commands arrive before draining


def demo_rules_text() -> str:
    """Return the sample rule file shipped with tidegate."""
    return resources.files(__package__).joinpath(DEMO_RULES).read_text(encoding="utf-8")


async def run_demo(
    *,
    duration: float | None,
    devices: int,
    rate: float,
    workdir: Path,
    live_view: bool,
    stop: asyncio.Event,
    seed: int | None = 1,
    broker: Backend = "auto",
) -> dict[str, Any]:
    """Run broker, gateway and simulator until `duration` passes (or Ctrl-C) and return the summary."""
    db_path = workdir / "tidegate.db"
    started = time.monotonic()
    if broker == "auto":
        broker = "mosquitto" if find_mosquitto() else "amqtt"
    async with embedded_broker(backend=broker) as broker_url:
        log.info("embedded %s broker at %s", broker, broker_url)
        settings = Settings(
            # amqtt speaks MQTT 3.1.1 only
            mqtt=MqttSettings(
                url=broker_url, client_id="tidegate-demo", protocol="5" if broker == "mosquitto" else "3.1.1"
            ),
            store=SqliteSettings(kind="sqlite", path=db_path),
        )
        rule_set = build_rule_set({"<demo>/rules.yaml": demo_rules_text()})
        gateway = Gateway(settings, rule_set=rule_set)
        stop_gateway = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            gateway_task = group.create_task(gateway.run(stop_gateway), name="gateway")
            await asyncio.wait_for(gateway.mqtt.connected.wait(), timeout=15)
            simulation = group.create_task(
                run_simulation(
                    broker_url,
                    devices=devices,
                    rate=rate,
                    duration=duration,
                    seed=seed,
                    id_prefix="greenhouse",
                    stop=stop,
                ),
                name="simulator",
            )
            view = None
            if live_view:
                from gateway.demo.view import LiveView

                view = group.create_task(LiveView(gateway, started).run(), name="live-view")
            simulated = await simulation  # ends after `duration`, or early when `stop` is set (Ctrl-C)
            await asyncio.sleep(SETTLE_SECONDS)
            stop_gateway.set()
            await gateway_task
            if view is not None:
                view.cancel()
    summary = gateway.snapshot()
    summary.update(
        {
            "seconds": round(time.monotonic() - started, 1),
            "devices": devices,
            "sent_by_devices": simulated.sent,
            "commands_acked_by_devices": simulated.commands_acked,
            "store": str(db_path),
            "broker": f"{broker} {broker_url}",
        }
    )
    return summary
