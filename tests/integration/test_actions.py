"""Rule actions leave the gateway for real: a webhook reaches an HTTP server, a republish a subscriber.

The HTTP server is Python's `http.server` on a free loopback port, in a thread of the test; the
broker is the session's mosquitto. Derived points reach the store the gateway writes to.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import paho.mqtt.publish as publish
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.config import (
    ActionSettings,
    BatchSettings,
    DevicesSettings,
    HttpSettings,
    MqttSettings,
    NullSettings,
    Settings,
)
from gateway.store.memory import MemoryStore
from rules import build_rule_set

pytestmark = pytest.mark.integration


class Hooks:
    """What the test's HTTP server received: (path, JSON body) per POST; `/flaky` fails its first POST."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.failed_once = False
        self.lock = threading.Lock()


@pytest.fixture
def hooks() -> Iterator[tuple[Hooks, int]]:
    received = Hooks()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with received.lock:
                if self.path == "/flaky" and not received.failed_once:
                    received.failed_once = True
                    status = 503
                else:
                    received.posts.append((self.path, body))
                    status = 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def subscriber(mosquitto: MosquittoBroker) -> Iterator[list[tuple[str, Any, bool]]]:
    """A subscriber to `alerts/#` on the broker; yields the (topic, JSON payload, retain) it got."""
    received: list[tuple[str, Any, bool]] = []
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:6]}")
    client.on_connect = lambda c, userdata, flags, reason, properties: c.subscribe("alerts/#", qos=1)
    client.on_subscribe = lambda c, userdata, mid, reasons, properties: subscribed.set()
    client.on_message = lambda c, userdata, message: received.append(
        (message.topic, json.loads(message.payload), message.retain)
    )
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        assert subscribed.wait(10), "the test subscriber did not get its SUBACK"
        yield received
    finally:
        client.disconnect()
        client.loop_stop()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - the servers' threads have no event to wait on
            await asyncio.sleep(0.02)


def test_webhooks_and_republish_reach_real_servers(
    mosquitto: MosquittoBroker, hooks: tuple[Hooks, int], subscriber: list[tuple[str, Any, bool]]
) -> None:
    received, port = hooks
    rules = f"""\
rules:
  - id: hot
    when: temperature > 30
    clear: temperature < 26
    severity: critical
    on_raise:
      - alert
      - republish: {{topic: "alerts/{{device_id}}/{{rule}}"}}
      - webhook: {{url: "http://127.0.0.1:{port}/hook?token=abc"}}
      - webhook: {{url: "http://127.0.0.1:{port}/flaky"}}
    on_clear:
      - alert
      - webhook: {{url: "http://127.0.0.1:{port}/hook"}}
derived:
  - id: per-second
    every: 1s
    time: processing
    measurement: telemetry_1s
    fields: {{top: max(temperature), n: count(temperature)}}
"""
    settings = Settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"tg-actions-{uuid.uuid4().hex[:8]}"),
        store=NullSettings(kind="null"),
        batch=BatchSettings(flush_interval=0.05),
        actions=ActionSettings(webhook_backoff=0.05, webhook_timeout=2.0),
    )
    store = MemoryStore()
    gateway = Gateway(settings, rule_set=build_rule_set({"rules.yaml": rules}), store=store)

    def derived_points() -> list[Any]:
        return [p for p in store.points if p.measurement == "telemetry_1s"]

    def send(seq: int, temperature: float) -> None:
        payload = json.dumps({"seq": seq, "temperature": temperature})
        publish.single("devices/gh-1/telemetry", payload, qos=1, hostname=mosquitto.host, port=mosquitto.port)

    async def scenario() -> None:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            running = group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.mqtt.connected.wait(), 10)
            await asyncio.to_thread(send, 1, 31.5)
            await until(lambda: len(received.posts) == 2 and len(subscriber) == 1)
            await asyncio.to_thread(send, 2, 20.0)
            await until(lambda: len(received.posts) == 3)
            await until(lambda: sum(float(p.fields["n"]) for p in derived_points()) == 2.0)
            stop.set()
            await running

    asyncio.run(scenario())

    [(topic, payload, retain)] = subscriber
    assert (topic, retain) == ("alerts/gh-1/hot", False)
    assert {k: payload[k] for k in ("rule", "device", "state", "severity", "values")} == {
        "rule": "hot",
        "device": "gh-1",
        "state": "raised",
        "severity": "critical",
        "values": {"temperature": 31.5},
    }
    posts = sorted((path, body["state"]) for path, body in received.posts)
    assert posts == [("/flaky", "raised"), ("/hook", "cleared"), ("/hook?token=abc", "raised")]
    assert received.failed_once  # /flaky answered 503 first: the gateway tried again
    for _, body in received.posts:
        assert (body["rule"], body["device"], body["severity"]) == ("hot", "gh-1", "critical")
        expected = {"temperature": 31.5} if body["state"] == "raised" else {"temperature": 20.0}
        assert body["values"] == expected
    snapshot = gateway.snapshot()
    assert (snapshot["webhooks_sent"], snapshot["webhooks_failed"], snapshot["webhooks_retries"]) == (3, 0, 1)
    assert (snapshot["republished"], snapshot["republish_failures"]) == (1, 0)
    derived = derived_points()
    assert derived and all(dict(p.tags) == {"device": "gh-1", "rule": "per-second"} for p in derived)
    assert sum(float(p.fields["n"]) for p in derived) == 2.0
    assert max(float(p.fields["top"]) for p in derived) == 31.5
    assert snapshot["derived_points"] == len(derived)


REGISTRY = """\
types:
  greenhouse:
    fields:
      temperature: {type: number}
devices:
  - {id: gh-1, type: greenhouse, tags: {site: north}}
  - {id: gh-2, type: greenhouse, tags: {site: north}}
"""
GROUP_RULES = """\
rules:
  - id: site-warm
    devices: {type: greenhouse}
    group_by: site
    when: avg(temperature, 5m) > 28
    severity: critical
    on_raise:
      - alert
      - republish: {topic: "alerts/{group}/{rule}"}
"""


def test_a_group_alarm_from_registry_tags_is_listed_acknowledged_and_stored_by_group(
    mosquitto: MosquittoBroker, tmp_path: Path, subscriber: list[tuple[str, Any, bool]]
) -> None:
    registry = tmp_path / "devices.yaml"
    registry.write_text(REGISTRY)
    settings = Settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"tg-group-{uuid.uuid4().hex[:8]}"),
        store=NullSettings(kind="null"),
        batch=BatchSettings(flush_interval=0.05),
        devices=DevicesSettings(file=registry),
        http=HttpSettings(listen="127.0.0.1:0"),
    )
    store = MemoryStore()
    gateway = Gateway(settings, rule_set=build_rule_set({"rules.yaml": GROUP_RULES}), store=store)

    def alerts() -> list[dict[str, str]]:
        return [dict(p.tags) for p in store.points if p.measurement == "alerts"]

    def send(device: str, temperature: float) -> None:
        payload = json.dumps({"temperature": temperature})
        publish.single(
            f"devices/{device}/telemetry", payload, qos=1, hostname=mosquitto.host, port=mosquitto.port
        )

    async def scenario() -> None:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            running = group.create_task(gateway.run(stop))
            await asyncio.wait_for(gateway.ready.wait(), 10)
            await asyncio.wait_for(gateway.mqtt.connected.wait(), 10)
            await asyncio.to_thread(send, "gh-1", 27.0)
            await asyncio.to_thread(send, "gh-2", 31.0)  # north: 29 on average
            await until(lambda: len(alerts()) == 1 and len(subscriber) == 1)
            assert gateway.status_server is not None
            url = f"http://127.0.0.1:{gateway.status_server.port}"
            async with httpx.AsyncClient() as client:
                [alarm] = (await client.get(f"{url}/alarms")).json()
                assert (alarm["rule"], alarm["device"], alarm["values"]) == (
                    "site-warm",
                    "site=north",
                    {"avg(temperature, 5m)": 29.0},
                )
                response = await client.post(
                    f"{url}/alarms/ack", json={"rule": "site-warm", "device": "site=north"}
                )
                assert response.status_code == 200
            await until(lambda: len(alerts()) == 2)
            stop.set()
            await running

    asyncio.run(scenario())
    assert alerts() == [
        {
            "group": "north",
            "group_by": "site",
            "rule": "site-warm",
            "severity": "critical",
            "state": "raised",
        },
        {
            "group": "north",
            "group_by": "site",
            "rule": "site-warm",
            "severity": "critical",
            "state": "acknowledged",
        },
    ]
    [(topic, payload, _)] = subscriber
    assert (
        topic == "alerts/north/site-warm"
        and payload["group"] == {"site": "north"}
        and "device" not in payload
    )
