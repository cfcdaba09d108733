"""The command lifecycle against a real mosquitto (RELIABILITY C1, C2, C3) and `tidegate command send`.

The devices here are small paho clients that speak the device protocol (README "Commands"): they
subscribe to their command topic, then publish a retained birth message, keep a retained last will,
and ack each command by id (a repeated id is answered again, not run again). A separate subscriber
on `devices/+/commands` sees everything the gateway publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.command import EXPIRED_DETAIL, Command, CommandAck
from devices.status import encode_status
from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.cli import main
from gateway.config import (
    BatchSettings,
    CommandSettings,
    DevicesSettings,
    HttpSettings,
    MqttSettings,
    NullSettings,
    Settings,
)
from gateway.store.memory import MemoryStore
from rules import build_rule_set

pytestmark = pytest.mark.integration
WAIT = 10.0
Answer = Literal["ok", "error", "silent", "ignore_first"]


def registry_file(tmp_path: Path, *device_ids: str) -> Path:
    devices = "\n".join(f"  - {{id: {d}, type: greenhouse}}" for d in device_ids)
    path = tmp_path / "devices.yaml"
    path.write_text(
        "types:\n  greenhouse:\n    fields: {temperature: {type: number}}\n"
        "    commands:\n      fan: {params: {on: {type: bool}}}\n"
        f"devices:\n{devices}\n",
        encoding="utf-8",
    )
    return path


def settings_for(
    broker: MosquittoBroker, registry: Path, protocol: Literal["5", "3.1.1"] = "5", **commands: Any
) -> Settings:
    return Settings(
        mqtt=MqttSettings(
            url=broker.url,
            client_id=f"tg-cmd-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
            reconnect_min_delay=0.1,
            reconnect_max_delay=0.5,
        ),
        store=NullSettings(kind="null"),  # replaced by a MemoryStore the test reads
        batch=BatchSettings(flush_interval=0.05),
        devices=DevicesSettings(file=registry),
        commands=CommandSettings(**{"retry_interval": 1.0, "ack_timeout": 5.0, **commands}),
        http=HttpSettings(listen="127.0.0.1:0"),
    )


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not condition():  # noqa: ASYNC110 - counters have no event to wait on
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


@contextlib.asynccontextmanager
async def running(gateway: Gateway) -> AsyncIterator[str]:
    """Run the gateway; yield its HTTP endpoint's URL."""
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await asyncio.wait_for(gateway.mqtt.connected.wait(), WAIT)
        await until(lambda: gateway.status_server is not None and gateway.status_server.port != 0, "http up")
        assert gateway.status_server is not None
        yield f"http://127.0.0.1:{gateway.status_server.port}"
    finally:
        stop.set()
        await task


def audit(store: MemoryStore, command_id: str | None = None) -> list[dict[str, Any]]:
    rows = [
        {**dict(p.tags), **p.fields, "ts": p.ts}
        for p in store.points
        if p.measurement == "commands" and (command_id is None or p.fields["id"] == command_id)
    ]
    return sorted(rows, key=lambda r: r["ts"])


class CommandWatcher:
    """Records every command the gateway publishes (`devices/+/commands`), with MQTT 5 properties."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.seen: list[tuple[str, Command, Any]] = []
        self._subscribed = threading.Event()
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        client.on_connect = lambda c, u, f, rc, p: c.subscribe("devices/+/commands", qos=1)
        client.on_subscribe = lambda *a: self._subscribed.set()
        client.on_message = self._on_message
        client.connect(broker.host, broker.port)
        client.loop_start()
        self.client = client
        assert self._subscribed.wait(WAIT)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        device_id = message.topic.split("/")[1]
        self.seen.append((device_id, Command.decode(device_id, bytes(message.payload)), message.properties))

    def ids(self, device_id: str) -> list[str]:
        return [command.id for device, command, _ in self.seen if device == device_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FakeDevice:
    """A device on its own paho connection: birth, last will, commands in, acks out."""

    def __init__(self, broker: MosquittoBroker, device_id: str, answer: Answer = "ok") -> None:
        self.device_id, self.answer = device_id, answer
        self.received: list[Command] = []
        self.executed: list[str] = []
        self._answers: dict[str, CommandAck] = {}
        self.online = threading.Event()
        self._status = f"devices/{device_id}/status"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv311)
        client.will_set(self._status, encode_status("offline", time.time()), qos=1, retain=True)
        client.reconnect_delay_set(1, 1)
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"devices/{device_id}/commands", qos=1)
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client
        self._broker = broker

    def start(self) -> FakeDevice:
        self.client.connect(self._broker.host, self._broker.port, keepalive=5)
        self.client.loop_start()
        assert self.online.wait(WAIT)
        return self

    def stop(self) -> None:
        self.client.publish(
            self._status, encode_status("offline", time.time()), qos=1, retain=True
        ).wait_for_publish(WAIT)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_subscribe(self, client: paho.Client, *args: Any) -> None:
        # subscribed first, then born: whatever the gateway sends on our birth reaches us
        client.publish(self._status, encode_status("online", time.time()), qos=1, retain=True)
        self.online.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        command = Command.decode(self.device_id, bytes(message.payload))
        self.received.append(command)
        ack = self._answers.get(command.id)  # a repeated id is the same command: answer, do not run
        if ack is None:
            if self.answer == "silent" or (self.answer == "ignore_first" and len(self.received) == 1):
                return
            if command.is_expired(time.time()):
                ack = CommandAck(command.id, self.device_id, "error", EXPIRED_DETAIL)
            else:
                self.executed.append(command.id)
                ack = CommandAck(
                    command.id,
                    self.device_id,
                    "ok" if self.answer != "error" else "error",
                    "fan jammed" if self.answer == "error" else "",
                )
            self._answers[command.id] = ack
        client.publish(f"devices/{self.device_id}/commands/ack", ack.encode(), qos=1)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- C1: never sent unless on the allow-list ---------------------------------------------------------

C1_RULES = """
rules:
  - id: hot
    when: temperature > 30
    on_raise:
      - alert
      - command: {name: self_destruct}
      - command: {name: fan, params: {on: "yes"}}
  - id: cold
    when: temperature < 0
    on_raise: [{command: {name: fan, params: {on: true}}}]
"""


def test_c1_commands_off_the_allow_list_are_never_published_and_are_audited(
    mosquitto: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, stranger = unique("c1"), unique("stranger")
    store = MemoryStore()
    gateway = Gateway(
        settings_for(mosquitto, registry_file(tmp_path, device_id)),
        rule_set=build_rule_set({"c1.yaml": C1_RULES}),
        store=store,
    )
    watcher = CommandWatcher(mosquitto)

    async def scenario() -> list[int]:
        async with running(gateway) as url:
            # from a rule: the hot rule fires two refused commands
            await asyncio.to_thread(
                publish, mosquitto, f"devices/{device_id}/telemetry", b'{"temperature": 35}'
            )
            await until(lambda: gateway.commands.stats.rejected == 2, "the rule's commands were rejected")
            # from the CLI, through the gateway: not on the list, bad param, unregistered device
            codes = [
                await asyncio.to_thread(
                    main, ["command", "send", "--url", url, device_id, "self_destruct", "--wait"]
                ),
                await asyncio.to_thread(
                    main, ["command", "send", "--url", url, device_id, "fan", "on=1", "--wait"]
                ),
                await asyncio.to_thread(main, ["command", "send", "--url", url, stranger, "fan", "on=true"]),
            ]
            # --direct checks the same allow-list before it publishes anything
            config = tmp_path / "config.yaml"
            config.write_text(
                f"mqtt: {{url: '{mosquitto.url}'}}\ndevices: {{file: '{tmp_path / 'devices.yaml'}'}}\n",
                encoding="utf-8",
            )
            codes.append(
                await asyncio.to_thread(
                    main, ["command", "send", "-c", str(config), "--direct", device_id, "reboot", "--wait"]
                )
            )
            # an allowed command afterwards: once it has been seen, anything published before it has been too
            await asyncio.to_thread(
                publish, mosquitto, f"devices/{device_id}/telemetry", b'{"temperature": -5}'
            )
            await until(lambda: len(watcher.seen) >= 1, "the allowed command was published")
            return codes

    try:
        codes = asyncio.run(scenario())
    finally:
        watcher.close()
    _, err = capsys.readouterr()
    assert codes == [1, 1, 1, 1]
    assert "rejected, not sent: command 'self_destruct' is not on the allow-list" in err
    assert "param 'on': expected a bool, got number 1" in err
    assert f"device '{stranger}' is not in the registry" in err
    assert "command 'reboot' is not on the allow-list" in err  # the --direct one
    [(seen_device, allowed, _)] = watcher.seen
    assert seen_device == device_id and allowed.name == "fan" and allowed.params == {"on": True}
    rejected = [row for row in audit(store) if row["status"] == "rejected"]
    assert len(rejected) == 5  # 2 from the rule, 3 through the gateway (--direct is not the gateway's)
    # an operator's command has an empty rule tag, which the store leaves out
    assert sorted(row.get("rule", "") for row in rejected) == ["", "", "", "hot", "hot"]
    assert all(row["detail"] for row in rejected)
    assert {row["name"] for row in rejected} == {"self_destruct", "fan"}
    # nobody acked the allowed one: stopping the gateway ends it on record rather than forgetting it
    assert [row["status"] for row in audit(store, allowed.id)] == ["sent", "timed_out"]
    assert "gateway stopped" in audit(store, allowed.id)[-1]["detail"]


def publish(broker: MosquittoBroker, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)
    finally:
        client.disconnect()
        client.loop_stop()


# -- C2: offline devices -------------------------------------------------------------------------------


def test_c2_a_command_for_an_offline_device_is_delivered_once_when_it_is_back_or_expires(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    device_id = unique("c2")
    store = MemoryStore()
    gateway = Gateway(
        settings_for(mosquitto, registry_file(tmp_path, device_id)), rule_set=build_rule_set({}), store=store
    )
    watcher = CommandWatcher(mosquitto)
    device = FakeDevice(mosquitto, device_id)

    async def scenario() -> tuple[str, str]:
        async with running(gateway) as url:
            # what the broker publishes for a device that vanished: its retained last will
            await asyncio.to_thread(
                publish,
                mosquitto,
                f"devices/{device_id}/status",
                encode_status("offline", time.time()),
                retain=True,
            )
            await until(
                lambda: gateway.ingest.tracker.view(device_id, time.time()).status == "offline",
                "the device is known offline",
            )
            async with httpx.AsyncClient() as http:
                held = (
                    await http.post(
                        f"{url}/commands", json={"device": device_id, "name": "fan", "params": {"on": True}}
                    )
                ).json()
                doomed = (
                    await http.post(
                        f"{url}/commands",
                        json={"device": device_id, "name": "fan", "params": {"on": False}, "ttl": 0.5},
                    )
                ).json()
            assert held["status"] == doomed["status"] == "queued" and held["detail"] == "device is offline"
            await until(lambda: gateway.commands.stats.expired == 1, "the short-lived command expired")
            assert watcher.seen == [] and gateway.commands.get(held["id"]).state == "queued"  # type: ignore[union-attr]
            await asyncio.to_thread(device.start)  # subscribes, then its birth message
            await until(lambda: gateway.commands.stats.acked_ok == 1, "the held command was acked")
            await asyncio.sleep(1.5)  # past a retry interval: nothing more goes out
            return held["id"], doomed["id"]

    try:
        held_id, doomed_id = asyncio.run(scenario())
    finally:
        device.stop()
        watcher.close()
    assert watcher.ids(device_id) == [held_id]  # exactly once; the expired one never
    assert [c.id for c in device.received] == [held_id]
    assert [row["status"] for row in audit(store, held_id)] == ["queued", "sent", "ok"]
    expired = audit(store, doomed_id)
    assert [row["status"] for row in expired] == ["queued", "expired"]
    assert "device is offline" in expired[1]["detail"]


# -- C3: the broker is away --------------------------------------------------------------------------


def test_c3_commands_wait_in_a_bounded_queue_while_disconnected_and_go_out_after(
    mosquitto_fresh: MosquittoBroker, tmp_path: Path
) -> None:
    broker = mosquitto_fresh
    device_id = unique("c3")
    store = MemoryStore()
    gateway = Gateway(
        settings_for(broker, registry_file(tmp_path, device_id), max_queued_per_device=2),
        rule_set=build_rule_set({}),
        store=store,
    )
    device = FakeDevice(broker, device_id)

    async def scenario() -> list[dict[str, Any]]:
        async with running(gateway) as url:
            await asyncio.to_thread(device.start)
            await asyncio.to_thread(broker.stop)
            await until(lambda: not gateway.mqtt.connected.is_set(), "the gateway noticed")
            async with httpx.AsyncClient() as http:
                answers = []
                for on in (True, False, True):
                    response = await http.post(
                        f"{url}/commands", json={"device": device_id, "name": "fan", "params": {"on": on}}
                    )
                    answers.append({**response.json(), "code": response.status_code})
            await asyncio.to_thread(broker.start)
            await until(lambda: gateway.commands.stats.acked_ok == 2, "both queued commands were acked")
            return answers

    try:
        first, second, third = asyncio.run(scenario())
    finally:
        device.stop()
    assert (first["code"], first["status"], first["detail"]) == (202, "queued", "not connected to the broker")
    assert (second["code"], second["status"]) == (202, "queued")
    # the per-device queue is full: the caller is told at once, and it is recorded
    assert third["code"] == 422 and "already wait" in third["detail"]
    # in order, each run once (a delivery lost while the device was still reconnecting is retried)
    assert list(dict.fromkeys(c.id for c in device.received)) == [first["id"], second["id"]]
    assert device.executed == [first["id"], second["id"]]
    statuses = [row["status"] for row in audit(store, first["id"])]
    assert statuses[0] == "queued" and set(statuses[1:-1]) == {"sent"} and statuses[-1] == "ok"
    assert [row["status"] for row in audit(store, third["id"])] == ["rejected"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_c3_a_lost_delivery_is_retried_with_the_same_id_and_then_acked(
    mosquitto: MosquittoBroker, tmp_path: Path, protocol: Literal["5", "3.1.1"]
) -> None:
    device_id = unique("retry")
    store = MemoryStore()
    gateway = Gateway(
        settings_for(mosquitto, registry_file(tmp_path, device_id), protocol, ttl=120),
        rule_set=build_rule_set({}),
        store=store,
    )
    watcher = CommandWatcher(mosquitto)
    device = FakeDevice(mosquitto, device_id, answer="ignore_first")

    async def scenario() -> str:
        async with running(gateway):
            await asyncio.to_thread(device.start)
            await until(
                lambda: gateway.ingest.tracker.view(device_id, time.time()).status == "online", "online"
            )
            tracked = gateway.commands.send(device_id, "fan", {"on": True})
            await until(lambda: gateway.commands.stats.acked_ok == 1, "the retry was acked")
            return tracked.command.id

    try:
        command_id = asyncio.run(scenario())
    finally:
        device.stop()
        watcher.close()
    assert [c.id for c in device.received] == [command_id, command_id]
    assert device.executed == [command_id]
    rows = audit(store, command_id)
    assert [(row["status"], row.get("attempt")) for row in rows] == [("sent", 1), ("sent", 2), ("ok", None)]
    [first, _retry] = [props for _, _, props in watcher.seen]
    if protocol == "5":  # the watcher is an MQTT 5 subscriber: it sees the properties the gateway set
        assert first.CorrelationData == command_id.encode()
        assert first.ResponseTopic == f"devices/{device_id}/commands/ack"
        assert 100 <= first.MessageExpiryInterval <= 120
    else:
        assert not hasattr(first, "CorrelationData")
    [(_, command, _)] = watcher.seen[:1]
    assert command.expires is not None and command.expires > time.time()


# -- `tidegate command send --wait` end to end ---------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "code", "shown"),
    [
        ("ok", 0, "ok, acked"),
        ("error", 1, "the device answered error: fan jammed"),
        ("silent", 1, "no ack from the device"),
    ],
)
def test_command_send_wait_exits_zero_only_on_an_ok_ack(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    answer: Answer,
    code: int,
    shown: str,
) -> None:
    device_id = unique(f"cli-{answer}")
    store = MemoryStore()
    gateway = Gateway(
        settings_for(mosquitto, registry_file(tmp_path, device_id), ack_timeout=1.5),
        rule_set=build_rule_set({}),
        store=store,
    )
    device = FakeDevice(mosquitto, device_id, answer=answer)

    async def scenario() -> int:
        async with running(gateway) as url:
            await asyncio.to_thread(device.start)
            await until(
                lambda: gateway.ingest.tracker.view(device_id, time.time()).status == "online", "online"
            )
            return await asyncio.to_thread(
                main,
                ["command", "send", "--url", url, device_id, "fan", "on=true", "--wait", "--timeout", "10"],
            )

    try:
        assert asyncio.run(scenario()) == code
    finally:
        device.stop()
    out, err = capsys.readouterr()
    assert shown in (out if code == 0 else err)
    final = audit(store)[-1]
    assert final["status"] == {"ok": "ok", "error": "error", "silent": "timed_out"}[answer]


def test_command_send_direct_waits_for_the_ack_itself(
    mosquitto: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id = unique("direct")
    registry = registry_file(tmp_path, device_id)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"mqtt: {{url: '{mosquitto.url}'}}\ndevices: {{file: '{registry}'}}\n", encoding="utf-8"
    )
    device = FakeDevice(mosquitto, device_id).start()
    try:
        code = main(
            [
                "command",
                "send",
                "-c",
                str(config),
                "--direct",
                device_id,
                "fan",
                "on=false",
                "--wait",
                "--json",
            ]
        )
    finally:
        device.stop()
    out, _ = capsys.readouterr()
    view = json.loads(out)
    assert code == 0 and view["status"] == "ok"
    assert [c.id for c in device.received] == [view["id"]] and device.received[0].params == {"on": False}


def test_command_send_without_a_gateway_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["command", "send", "--url", "http://127.0.0.1:9", "gh-1", "fan", "on=true"])
    _, err = capsys.readouterr()
    assert code == 1 and "cannot reach the gateway" in err and "--direct" in err
