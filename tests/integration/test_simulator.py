"""The simulator against a real mosquitto, and the embedded brokers it runs on in the demo."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.command import Command, CommandAck
from devices.payload import PayloadDecoder
from devices.topic import TopicScheme
from gateway.broker import AmqttBroker, Backend, MosquittoBroker, embedded_broker, find_mosquitto, probe_mqtt
from simulator import BrokerUnavailableError, SimulationSummary, device_ids, run_simulation

pytestmark = pytest.mark.integration

T = TypeVar("T")
TELEMETRY = TopicScheme("devices/{device_id}/telemetry")
COMMANDS = TopicScheme("devices/{device_id}/commands")
ACKS = TopicScheme("devices/{device_id}/commands/ack")
WAIT = 10.0  # seconds for anything that should take milliseconds; only reached when a test fails


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run `coro` in a fresh event loop; fail instead of hanging, and check it left no task behind."""

    async def guarded() -> T:
        result = await asyncio.wait_for(coro, timeout)
        for _ in range(3):  # aiomqtt cancels its per-connection task via call_soon: let that land
            await asyncio.sleep(0)
        stray = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not stray, f"tasks left running: {stray}"
        return result

    return asyncio.run(guarded())


def unique_prefix(name: str) -> str:
    # The session broker outlives each test; distinct ids keep tests out of each other's sessions.
    return f"{name}-{uuid.uuid4().hex[:6]}"


class Recorder:
    """A paho MQTT 3.1.1 client on its own thread that subscribes at QoS 1 and records what arrives."""

    def __init__(self, host: str, port: int, topics: list[str], *, persistent: bool = False) -> None:
        self.host, self.port, self.topics = host, port, topics
        self.messages: list[tuple[str, bytes, int]] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        # persistent: the broker keeps what arrives while this client reconnects (after a broker restart)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=unique_prefix("recorder"), clean_session=not persistent
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._changed:
            self.messages.append((message.topic, bytes(message.payload), message.qos))
            self._changed.notify_all()

    def __enter__(self) -> Self:
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        if not self._subscribed.wait(WAIT):
            self.__exit__(None, None, None)
            raise AssertionError(f"no SUBACK from {self.host}:{self.port}")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(
        self, predicate: Callable[[list[tuple[str, bytes, int]]], bool], timeout: float = WAIT
    ) -> bool:
        """Block until `predicate(messages)` holds (True) or `timeout` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.messages), timeout)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT)


Messages = list[tuple[str, bytes, int]]


def acks_in(messages: Messages) -> list[bytes]:
    return [payload for topic, payload, _ in messages if topic.endswith("/commands/ack")]


def readings_in(messages: Messages) -> list[dict[str, Any]]:
    return [json.loads(payload) for topic, payload, _ in messages if topic.endswith("/telemetry")]


def progress_event(device_id: str) -> tuple[asyncio.Event, Callable[[SimulationSummary], None]]:
    """Return an event set once `device_id` has sent telemetry (so it has subscribed to commands)."""
    event = asyncio.Event()

    def on_progress(summary: SimulationSummary) -> None:
        if summary.last_seq.get(device_id, 0) >= 1:
            event.set()

    return event, on_progress


# -- the simulator -----------------------------------------------------------------------------------


def test_every_seq_arrives_once_in_order_per_device(mosquitto: MosquittoBroker) -> None:
    prefix = unique_prefix("seq")
    ids = device_ids(3, prefix)
    with Recorder(mosquitto.host, mosquitto.port, [TELEMETRY.format(d) for d in ids]) as recorder:
        summary = run(
            run_simulation(mosquitto.url, devices=3, rate=10.0, duration=2.0, seed=7, id_prefix=prefix)
        )
        assert recorder.wait_for(lambda messages: len(messages) >= summary.sent)

    assert summary.devices == 3 and summary.errors == 0
    assert sum(summary.last_seq.values()) == summary.sent
    decoder = PayloadDecoder()
    by_device: dict[str, list[int | None]] = {d: [] for d in ids}
    for topic, payload, qos in recorder.messages:
        device_id = TELEMETRY.device_id(topic)
        assert device_id in by_device and qos == 1
        [event] = decoder.decode(device_id, payload, time.time())
        assert {"temperature", "humidity", "fan"} <= set(event.fields)
        by_device[device_id].append(event.seq)
    for device_id, seqs in by_device.items():
        assert summary.last_seq[device_id] >= 10  # ~20 at 10 msg/s for 2 s
        assert seqs == list(range(1, summary.last_seq[device_id] + 1)), device_id


def test_fan_command_is_acked_ok_with_its_id_and_unknown_ones_with_an_error(
    mosquitto: MosquittoBroker,
) -> None:
    prefix = unique_prefix("cmd")
    [device_id] = device_ids(1, prefix)
    fan_on = Command(uuid.uuid4().hex, device_id, "fan", {"on": True}, time.time())
    unknown = Command(uuid.uuid4().hex, device_id, "self_destruct", {}, time.time())

    async def scenario(recorder: Recorder) -> SimulationSummary:
        ready, on_progress = progress_event(device_id)
        stop = asyncio.Event()
        simulation = asyncio.create_task(
            run_simulation(
                mosquitto.url, devices=1, rate=20.0, duration=None, seed=1, id_prefix=prefix,
                on_progress=on_progress, stop=stop,
            )
        )  # fmt: skip
        await asyncio.wait_for(ready.wait(), WAIT)
        for command in (fan_on, unknown):
            await asyncio.to_thread(recorder.publish, COMMANDS.format(device_id), command.encode())
        two_acks = await asyncio.to_thread(recorder.wait_for, lambda m: len(acks_in(m)) >= 2)
        assert two_acks, f"acks missing: {recorder.messages}"
        fan_shown = await asyncio.to_thread(
            recorder.wait_for, lambda m: any(r.get("fan") for r in readings_in(m))
        )
        assert fan_shown, "telemetry never showed the fan on"
        stop.set()
        return await simulation

    topics = [ACKS.format(device_id), TELEMETRY.format(device_id)]
    with Recorder(mosquitto.host, mosquitto.port, topics) as recorder:
        summary = run(scenario(recorder))

    acks = {ack.id: ack for ack in (CommandAck.decode(device_id, p) for p in acks_in(recorder.messages))}
    assert acks[fan_on.id].status == "ok"
    assert acks[unknown.id].status == "error" and "self_destruct" in acks[unknown.id].detail
    assert (summary.commands_received, summary.commands_acked, summary.commands_rejected) == (2, 2, 1)


def test_cancelling_disconnects_every_device_cleanly(mosquitto: MosquittoBroker) -> None:
    prefix = unique_prefix("cancel")
    ids = device_ids(3, prefix)

    async def scenario() -> None:
        ready, on_progress = progress_event(ids[-1])
        simulation = asyncio.create_task(
            run_simulation(
                mosquitto.url,
                devices=3,
                rate=20.0,
                duration=None,
                seed=2,
                id_prefix=prefix,
                on_progress=on_progress,
            )
        )
        await asyncio.wait_for(ready.wait(), WAIT)
        simulation.cancel()
        with pytest.raises(asyncio.CancelledError):
            await simulation

    run(scenario())  # `run` also fails if a task was left behind

    # mosquitto logs "Client X disconnected." for a DISCONNECT packet, "closed its connection" otherwise;
    # the log has no change event to wait on, so poll it briefly.
    def all_said_goodbye() -> bool:
        return all(f"Client {d} disconnected." in mosquitto.log_text() for d in ids)

    deadline = time.monotonic() + WAIT
    while not all_said_goodbye() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all_said_goodbye(), mosquitto.log_text()[-2000:]


def test_devices_reconnect_after_a_broker_restart_and_lose_nothing(mosquitto_fresh: MosquittoBroker) -> None:
    broker = mosquitto_fresh
    ids = device_ids(2, "restart")
    seen_before = asyncio.Event()
    reconnected = asyncio.Event()

    def on_progress(summary: SimulationSummary) -> None:
        if min(summary.last_seq.values()) >= 3:
            seen_before.set()
        if summary.reconnects >= len(ids) and min(summary.last_seq.values()) >= 8:
            reconnected.set()

    async def scenario() -> SimulationSummary:
        stop = asyncio.Event()
        simulation = asyncio.create_task(
            run_simulation(broker.url, devices=2, rate=10.0, duration=None, seed=4, id_prefix="restart",
                           on_progress=on_progress, stop=stop)
        )  # fmt: skip
        await asyncio.wait_for(seen_before.wait(), WAIT)
        await broker.restart_async()
        await asyncio.wait_for(reconnected.wait(), WAIT)
        stop.set()
        return await simulation

    topics = [TELEMETRY.format(d) for d in ids]
    with Recorder(broker.host, broker.port, topics, persistent=True) as recorder:
        summary = run(scenario())

        def seqs(device_id: str) -> list[int]:
            return [json.loads(p)["seq"] for t, p, _ in recorder.messages if t == TELEMETRY.format(device_id)]

        def complete(messages: Messages) -> bool:
            return all(set(seqs(d)) >= set(range(1, summary.last_seq[d] + 1)) for d in ids)

        assert recorder.wait_for(complete), {d: seqs(d) for d in ids}

    assert summary.reconnects == len(ids) and summary.errors == len(ids)  # one lost connection each
    for device_id in ids:
        # at least once: a reading in flight at the restart may arrive twice, but none is missing
        assert sorted(set(seqs(device_id))) == list(range(1, summary.last_seq[device_id] + 1)), device_id


def test_unreachable_broker_is_a_clear_error() -> None:
    broker = AmqttBroker()  # only to pick a free port; nothing listens on it
    with pytest.raises(BrokerUnavailableError) as raised:
        run(run_simulation(broker.url, devices=2, rate=1.0, duration=1.0, seed=None))
    assert raised.value.url == broker.url
    assert broker.url in str(raised.value) and "refused" in str(raised.value).lower()


def test_rejects_a_non_mqtt_url() -> None:
    with pytest.raises(ValueError, match="mqtt://"):
        run(run_simulation("http://127.0.0.1:1883", devices=1, rate=1.0, duration=1.0, seed=None))


# -- the embedded brokers ----------------------------------------------------------------------------

NO_MOSQUITTO = pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto is not installed (CI installs it)"
)
BACKENDS = [pytest.param("mosquitto", marks=NO_MOSQUITTO), "amqtt"]


async def receive(client: aiomqtt.Client) -> bytes:
    """Return the payload of the next message `client` gets."""
    async with asyncio.timeout(WAIT):
        message = await anext(client.messages)
    assert isinstance(message.payload, bytes)
    return message.payload


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedded_broker_carries_qos1_messages(backend: Backend) -> None:
    async def scenario() -> None:
        async with embedded_broker(backend=backend) as url:
            assert url.startswith("mqtt://127.0.0.1:")
            host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
            async with aiomqtt.Client(host, port, identifier="sub") as sub, aiomqtt.Client(host, port) as pub:
                await sub.subscribe("devices/+/telemetry", qos=1)
                await pub.publish("devices/d1/telemetry", b'{"seq": 1, "t": 1}', qos=1)
                async with asyncio.timeout(WAIT):
                    message = await anext(sub.messages)
                assert message.topic.value == "devices/d1/telemetry"
                assert (message.payload, message.qos) == (b'{"seq": 1, "t": 1}', 1)
        assert not probe_mqtt(host, port, timeout=0.5), "broker still serving after the block"

    run(scenario())


def persistent_client(host: str, port: int, protocol: aiomqtt.ProtocolVersion) -> aiomqtt.Client:
    """Return client "gw" resuming its session (3.1.1: clean_session off; 5: clean_start off, expiry)."""
    if protocol == aiomqtt.ProtocolVersion.V5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
        properties.SessionExpiryInterval = 3600
        return aiomqtt.Client(
            host, port, identifier="gw", protocol=protocol, clean_start=False, properties=properties
        )
    return aiomqtt.Client(host, port, identifier="gw", protocol=protocol, clean_session=False)


@pytest.mark.parametrize(
    ("backend", "protocol"),
    [
        pytest.param("mosquitto", aiomqtt.ProtocolVersion.V311, marks=NO_MOSQUITTO),
        pytest.param("mosquitto", aiomqtt.ProtocolVersion.V5, marks=NO_MOSQUITTO),
        ("amqtt", aiomqtt.ProtocolVersion.V311),  # amqtt speaks no MQTT 5: see the test below
    ],
    ids=["mosquitto-3.1.1", "mosquitto-5", "amqtt-3.1.1"],
)
def test_embedded_broker_queues_for_a_persistent_session_while_it_is_away(
    backend: Backend, protocol: aiomqtt.ProtocolVersion
) -> None:
    async def scenario() -> None:
        async with embedded_broker(backend=backend) as url:
            host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
            async with persistent_client(host, port, protocol) as gateway:
                await gateway.subscribe("devices/+/telemetry", qos=1)
            async with aiomqtt.Client(host, port, protocol=protocol) as device:
                for seq in (1, 2, 3):
                    await device.publish("devices/d1/telemetry", f'{{"seq": {seq}}}'.encode(), qos=1)
            async with persistent_client(host, port, protocol) as gateway:
                got = [json.loads(await receive(gateway))["seq"] for _ in range(3)]
            assert got == [1, 2, 3]

    run(scenario())


def test_amqtt_refuses_mqtt5_clients() -> None:
    """Documents a limitation (see gateway/broker.py): if this starts failing, amqtt learned MQTT 5."""

    async def scenario() -> None:
        async with AmqttBroker() as broker:
            with pytest.raises(aiomqtt.MqttCodeError):
                async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5):
                    pass

    run(scenario())


def test_simulator_runs_on_amqtt() -> None:
    async def scenario() -> SimulationSummary:
        async with embedded_broker(backend="amqtt") as url:
            return await run_simulation(url, devices=2, rate=10.0, duration=1.0, seed=3)

    summary = run(scenario())
    assert summary.errors == 0 and all(seq >= 5 for seq in summary.last_seq.values())


def test_mosquitto_restart_keeps_port_and_queued_messages(mosquitto_fresh: MosquittoBroker) -> None:
    broker = mosquitto_fresh
    port = broker.port

    async def subscribe_then_leave() -> None:
        async with aiomqtt.Client(broker.host, port, identifier="gw", clean_session=False) as gateway:
            await gateway.subscribe("devices/+/telemetry", qos=1)
        async with aiomqtt.Client(broker.host, port) as device:
            await device.publish("devices/d1/telemetry", b'{"seq": 1}', qos=1)

    async def come_back() -> bytes:
        async with aiomqtt.Client(broker.host, port, identifier="gw", clean_session=False) as gateway:
            return await receive(gateway)

    run(subscribe_then_leave())
    broker.restart()  # SIGTERM: mosquitto saves its database on the way out
    assert broker.port == port
    assert run(come_back()) == b'{"seq": 1}'


def test_mosquitto_pause_resume_and_kill(mosquitto_fresh: MosquittoBroker) -> None:
    broker = mosquitto_fresh
    broker.pause()
    assert not probe_mqtt(broker.host, broker.port, timeout=0.3)
    broker.resume()
    assert probe_mqtt(broker.host, broker.port)
    broker.kill()
    assert not broker.running and not probe_mqtt(broker.host, broker.port, timeout=0.3)
    broker.start()
    assert probe_mqtt(broker.host, broker.port)
