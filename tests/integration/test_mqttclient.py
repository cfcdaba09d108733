"""gateway/mqtt.py against a real mosquitto: sessions, manual acks, faults, outgoing QoS 1.

The client runs in the test's event loop; reference publishers and subscribers are paho clients on
their own network threads. Network faults go through `faultproxy.FaultProxy` in the same loop.
Keepalives are short (2 s) so that dead-link detection takes seconds, not half a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from gateway.broker import MosquittoBroker, find_mosquitto
from gateway.mqtt import (
    DISPATCH_SLICE,
    MISC_INTERVAL,
    MqttClient,
    MqttMessage,
    MqttPublishError,
    Properties,
    Subscription,
)
from tests.integration.faultproxy import FaultProxy, Mode

# The gateway scenarios at the end reuse the fault tests' publisher, settings and tally helpers.

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Protocol = Literal["5", "3.1.1"]
KEEPALIVE = 2


# -- helpers ------------------------------------------------------------------------------------------

_sessions: list[str] = []


def new_id(name: str) -> str:
    """Return a fresh client id; its persistent session on the shared broker is removed after the test."""
    cid = f"mc-{name}-{uuid.uuid4().hex[:6]}"
    _sessions.append(cid)
    return cid


@pytest.fixture(autouse=True)
def _forget_sessions(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remove the test's sessions from the shared broker, or they queue every later test's messages."""
    _sessions.clear()
    yield
    if "mosquitto" in request.fixturenames:
        broker: MosquittoBroker = request.getfixturevalue("mosquitto")
        for cid in _sessions:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
            with contextlib.suppress(OSError):
                client.connect(broker.host, broker.port, clean_start=True)  # session expiry 0: gone on close
                client.loop_start()
                client.disconnect()
                client.loop_stop()
    _sessions.clear()


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> float:
    """Poll until `condition()`; return the seconds it took, or fail naming what did not happen."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


class Inbox:
    """A subscription handler that keeps what arrives and acks it (unless told to hold some back)."""

    def __init__(self, ack: Callable[[MqttMessage], bool] = lambda message: True) -> None:
        self.client: MqttClient | None = None
        self.messages: list[MqttMessage] = []
        self._ack = ack

    def __call__(self, message: MqttMessage) -> None:
        self.messages.append(message)
        if self._ack(message):
            assert self.client is not None
            self.client.ack(message.mid, message.qos, self.client.generation)

    @property
    def payloads(self) -> list[bytes]:
        return [message.payload for message in self.messages]


def make_client(
    host: str,
    port: int,
    client_id: str,
    inbox: Inbox,
    topic_filter: str,
    protocol: Protocol = "5",
    **options: Any,
) -> MqttClient:
    client = MqttClient(
        host=host,
        port=port,
        client_id=client_id,
        subscriptions=[Subscription(topic_filter, 1, inbox)],
        protocol=protocol,
        keepalive=options.pop("keepalive", KEEPALIVE),
        reconnect_min_delay=options.pop("reconnect_min_delay", 0.1),
        reconnect_max_delay=options.pop("reconnect_max_delay", 0.5),
        **options,
    )
    inbox.client = client
    return client


@contextlib.asynccontextmanager
async def running(client: MqttClient, *, wait_connected: bool = True) -> AsyncIterator[MqttClient]:
    """Run the client for the block; disconnect cleanly at the end."""
    task = asyncio.create_task(client.run(), name="mqtt-client")
    try:
        if wait_connected:
            await until(client.connected.is_set, "client connected and subscribed")
        yield client
    finally:
        await client.disconnect()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class PahoPeer:
    """A paho MQTT 5 client on its own thread: publishes reference messages and records what it receives."""

    def __init__(self, host: str, port: int, subscribe: str | None = None) -> None:
        self.received: list[paho.MQTTMessage] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"peer-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        self.client.on_message = lambda client, userdata, message: self.received.append(message)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        if subscribe is not None:
            self.client.subscribe(subscribe, qos=1)
            assert self._subscribed.wait(5), "paho peer subscribed"

    def publish(
        self, topic: str, payloads: Iterable[bytes], properties: PahoProperties | None = None
    ) -> None:
        infos = [self.client.publish(topic, payload, qos=1, properties=properties) for payload in payloads]
        for info in infos:
            info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.asynccontextmanager
async def paho_peer(host: str, port: int, subscribe: str | None = None) -> AsyncIterator[PahoPeer]:
    peer = await asyncio.to_thread(PahoPeer, host, port, subscribe)
    try:
        yield peer
    finally:
        await asyncio.to_thread(peer.close)


def topic_root() -> str:
    return f"mc/{uuid.uuid4().hex[:8]}"


# -- connect, subscribe, receive, ack -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_receives_in_order_and_acks_reach_the_broker(mosquitto: MosquittoBroker, protocol: Protocol) -> None:
    root = topic_root()
    cid = new_id(f"basic-{protocol}")
    payloads = [f"m{i}".encode() for i in range(500)]

    async def scenario() -> tuple[Inbox, Inbox, MqttClient]:
        first, second = Inbox(), Inbox()
        client = make_client(mosquitto.host, mosquitto.port, cid, first, f"{root}/+/telemetry", protocol)
        async with running(client), paho_peer(mosquitto.host, mosquitto.port) as peer:
            await asyncio.to_thread(peer.publish, f"{root}/d-1/telemetry", payloads)
            await until(lambda: len(first.messages) == len(payloads), "all messages received")
            await asyncio.sleep(0.2)  # the PUBACKs' flush
        # a second connection with the same session: the broker redelivers nothing, so it had every ack
        again = make_client(mosquitto.host, mosquitto.port, cid, second, f"{root}/+/telemetry", protocol)
        async with running(again):
            await asyncio.sleep(0.5)
        return first, second, client

    first, second, client = asyncio.run(scenario())
    assert first.payloads == payloads
    assert {m.topic for m in first.messages} == {f"{root}/d-1/telemetry"}
    assert all(m.qos == 1 and m.mid > 0 and not m.retain for m in first.messages)
    assert second.messages == []
    assert (client.stats.connects, client.stats.disconnects, client.stats.last_error) == (1, 1, "")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_unacked_messages_are_redelivered_to_the_persistent_session(
    mosquitto: MosquittoBroker, protocol: Protocol
) -> None:
    root = topic_root()
    cid = new_id(f"redeliver-{protocol}")
    payloads = [str(i).encode() for i in range(20)]

    async def scenario() -> tuple[Inbox, Inbox, MqttClient]:
        first = Inbox(ack=lambda message: int(message.payload) % 2 == 0)  # hold back the odd ones
        second = Inbox()
        client = make_client(mosquitto.host, mosquitto.port, cid, first, f"{root}/#", protocol)
        async with running(client), paho_peer(mosquitto.host, mosquitto.port) as peer:
            await asyncio.to_thread(peer.publish, f"{root}/x", payloads)
            await until(lambda: len(first.messages) == 20, "first delivery")
            await asyncio.sleep(0.2)
        again = make_client(mosquitto.host, mosquitto.port, cid, second, f"{root}/#", protocol)
        async with running(again):
            await until(lambda: len(second.messages) >= 10, "redelivery")
            await asyncio.sleep(0.3)
        return first, second, again

    _, second, again = asyncio.run(scenario())
    assert second.payloads == [p for p in payloads if int(p) % 2]
    assert all(m.dup for m in second.messages)  # the broker marks a redelivery
    assert again.stats.sessions_lost == 0


def test_ack_of_an_old_connection_is_not_sent(mosquitto: MosquittoBroker) -> None:
    root = topic_root()
    cid = new_id("stale-ack")

    async def scenario() -> tuple[Inbox, list[MqttMessage]]:
        inbox = Inbox(ack=lambda message: False)
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            client = make_client(proxy.host, proxy.port, cid, inbox, f"{root}/#")
            async with running(client), paho_peer(mosquitto.host, mosquitto.port) as peer:
                await asyncio.to_thread(peer.publish, f"{root}/x", [b"once"])
                await until(lambda: len(inbox.messages) == 1, "delivered")
                held, generation = inbox.messages[0], client.generation
                proxy.reset_connections()
                await until(lambda: client.stats.connects == 2, "reconnected")
                await until(lambda: len(inbox.messages) == 2, "redelivered on the new connection")
                client.ack(held.mid, held.qos, generation)  # stale: must not ack the new delivery
                await asyncio.sleep(0.2)
                redelivered = inbox.messages[1]
                client.ack(redelivered.mid, redelivered.qos, client.generation)
                await asyncio.sleep(0.2)
        after = Inbox()
        again = make_client(mosquitto.host, mosquitto.port, cid, after, f"{root}/#")
        async with running(again):
            await asyncio.sleep(0.4)
        return inbox, after.messages

    inbox, after = asyncio.run(scenario())
    assert [m.payload for m in inbox.messages] == [b"once", b"once"]
    assert after == []  # the current connection's ack went through


# -- sessions -----------------------------------------------------------------------------------------


def test_session_resumed_then_lost_reports_the_loss_window(mosquitto: MosquittoBroker) -> None:
    root = topic_root()
    cid = new_id("session")
    windows: list[tuple[float, float]] = []

    async def scenario() -> tuple[MqttClient, Inbox]:
        inbox = Inbox()
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            client = make_client(
                proxy.host,
                proxy.port,
                cid,
                inbox,
                f"{root}/#",
                session_expiry=1,
                on_session_lost=lambda since, until: windows.append((since, until)),
            )
            async with running(client), paho_peer(mosquitto.host, mosquitto.port) as peer:
                proxy.reset_connections()  # a short outage: the session survives
                await until(lambda: client.stats.connects == 2 and client.connected.is_set(), "reconnect 1")
                assert windows == []
                proxy.set_mode(Mode.RESET)  # a long one: longer than the session expiry (1 s)
                await until(lambda: not client.connected.is_set(), "outage noticed")
                await asyncio.sleep(2.5)
                proxy.set_mode(Mode.PASS)
                await until(lambda: client.stats.connects == 3 and client.connected.is_set(), "reconnect 2")
                # the new session was subscribed again
                await asyncio.to_thread(peer.publish, f"{root}/after", [b"after"])
                await until(lambda: inbox.payloads == [b"after"], "message after the new session")
        return client, inbox

    client, _ = asyncio.run(scenario())
    assert client.stats.sessions_lost == 1
    [(since, until_)] = windows
    assert since < until_ <= time.time()
    assert until_ - since >= 2.0  # from the disconnect to the reconnect


def test_assume_session_makes_a_first_fresh_session_a_loss(mosquitto: MosquittoBroker) -> None:
    windows: list[tuple[float, float]] = []

    async def scenario() -> MqttClient:
        client = make_client(
            mosquitto.host,
            mosquitto.port,
            new_id("assume"),
            Inbox(),
            f"{topic_root()}/#",
            on_session_lost=lambda since, until: windows.append((since, until)),
        )
        client.assume_session(time.time() - 60)  # an earlier run had a session under this id
        async with running(client):
            pass
        return client

    client = asyncio.run(scenario())
    assert client.stats.sessions_lost == 1
    assert len(windows) == 1 and windows[0][1] - windows[0][0] >= 60


# -- dead link ----------------------------------------------------------------------------------------


def test_blackholed_link_is_dropped_within_one_and_a_half_keepalives(mosquitto: MosquittoBroker) -> None:
    root = topic_root()

    async def scenario() -> tuple[MqttClient, float, Inbox]:
        inbox = Inbox()
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            client = make_client(proxy.host, proxy.port, new_id("dead"), inbox, f"{root}/#")
            async with running(client), paho_peer(mosquitto.host, mosquitto.port) as peer:
                await asyncio.sleep(0.2)  # the SUBACK is the last thing the client heard
                proxy.set_mode(Mode.BLACKHOLE)
                detected = await until(
                    lambda: not client.connected.is_set(), "dead link dropped", 3 * KEEPALIVE
                )
                await asyncio.to_thread(peer.publish, f"{root}/x", [b"during"])
                proxy.set_mode(Mode.PASS)
                await until(client.connected.is_set, "reconnected")
                await until(lambda: inbox.payloads == [b"during"], "what was published meanwhile")
        return client, detected, inbox

    client, detected, _ = asyncio.run(scenario())
    assert detected <= 1.5 * KEEPALIVE + MISC_INTERVAL + 0.1
    assert client.stats.connects == 2
    assert client.stats.sessions_lost == 0


def test_an_idle_healthy_link_stays_up_on_pings(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> MqttClient:
        client = make_client(mosquitto.host, mosquitto.port, new_id("idle"), Inbox(), f"{topic_root()}/#")
        async with running(client):
            await asyncio.sleep(
                2.5 * KEEPALIVE
            )  # past the 1.5 x keepalive limit: nothing to read but PINGRESPs
        return client

    client = asyncio.run(scenario())
    assert (client.stats.connects, client.stats.disconnects) == (1, 1)  # the one disconnect is ours


def test_a_link_that_only_sends_still_pings_and_stays_up(mosquitto: MosquittoBroker) -> None:
    # QoS 0 publishes keep our side busy and bring nothing back: without a ping for the silence
    # inbound, the dead-link rule would drop a healthy link.
    async def scenario() -> MqttClient:
        client = make_client(mosquitto.host, mosquitto.port, new_id("sender"), Inbox(), f"{topic_root()}/#")
        async with running(client):
            for _ in range(int(2.5 * KEEPALIVE / 0.1)):
                client.publish("mc/nobody-listens", b"x", qos=0)
                await asyncio.sleep(0.1)
        return client

    client = asyncio.run(scenario())
    assert (client.stats.connects, client.stats.disconnects) == (1, 1)


# -- backpressure -------------------------------------------------------------------------------------


def test_pause_reading_holds_messages_and_resume_delivers_them_in_order(mosquitto: MosquittoBroker) -> None:
    root = topic_root()
    cid = new_id("pause")
    payloads = [b"%05d" % i + b"." * 1000 for i in range(2000)]  # 2 MB: more than one 256 KiB read

    async def scenario() -> tuple[Inbox, int, int, int]:
        inbox = Inbox()
        paused_at = -1

        def pause_at_100(message: MqttMessage) -> None:
            nonlocal paused_at
            inbox(message)
            if len(inbox.messages) == 100:
                paused_at = len(inbox.messages)
                client.pause_reading()

        # The session queues the messages while we are away: on reconnect the broker sends them in
        # large reads, so the pause falls in the middle of one.
        async with running(make_client(mosquitto.host, mosquitto.port, cid, Inbox(), f"{root}/#")):
            pass
        async with paho_peer(mosquitto.host, mosquitto.port) as peer:
            await asyncio.to_thread(peer.publish, f"{root}/x", payloads)
        client = make_client(mosquitto.host, mosquitto.port, cid, inbox, f"{root}/#")
        client._subscriptions = [Subscription(f"{root}/#", 1, pause_at_100)]
        async with running(client, wait_connected=False):
            await until(lambda: paused_at > 0, "paused by the handler")
            await asyncio.sleep(0.5)
            while_paused = len(inbox.messages)
            held = len(client._backlog)
            assert client.paused
            client.resume_reading()
            await until(lambda: len(inbox.messages) == len(payloads), "all delivered after resume")
        return inbox, paused_at, while_paused, held

    inbox, paused_at, while_paused, held = asyncio.run(scenario())
    assert paused_at == 100
    assert while_paused == 100  # not one more message reached the handler while paused
    assert 0 < held < 2000 - 100  # the rest of that read waited, parsed; the socket was not read on
    assert inbox.payloads == payloads


def test_a_large_read_is_handed_out_in_slices_between_loop_turns(mosquitto: MosquittoBroker) -> None:
    root = topic_root()
    cid = new_id("slices")
    payloads = [b"%05d" % i + b"." * 100 for i in range(3000)]  # ~390 KB queued: reads of ~1,900 messages

    async def scenario() -> tuple[Inbox, Counter[int]]:
        loop = asyncio.get_running_loop()
        turns = 0

        def tick() -> None:  # counts event-loop iterations
            nonlocal turns
            turns += 1
            if not done:
                loop.call_soon(tick)

        per_turn: Counter[int] = Counter()
        inbox = Inbox()

        def handler(message: MqttMessage) -> None:
            per_turn[turns] += 1
            inbox(message)

        async with running(make_client(mosquitto.host, mosquitto.port, cid, Inbox(), f"{root}/#")):
            pass
        async with paho_peer(mosquitto.host, mosquitto.port) as peer:
            await asyncio.to_thread(peer.publish, f"{root}/x", payloads)
        client = make_client(mosquitto.host, mosquitto.port, cid, inbox, f"{root}/#")
        client._subscriptions = [Subscription(f"{root}/#", 1, handler)]
        done = False
        tick()
        async with running(client, wait_connected=False):
            await until(lambda: len(inbox.messages) == len(payloads), "backlog delivered")
        done = True
        return inbox, per_turn

    inbox, per_turn = asyncio.run(scenario())
    assert inbox.payloads == payloads
    assert max(per_turn.values()) <= DISPATCH_SLICE


# -- outgoing QoS 1 -----------------------------------------------------------------------------------


def test_publish_properties_arrive_at_a_paho_subscriber(mosquitto: MosquittoBroker) -> None:
    root = topic_root()
    ours = Properties(
        message_expiry_interval=60,
        correlation_data=b"6f1c0d8e",
        response_topic=f"{root}/d-1/commands/ack",
        content_type="application/json",
        user_property=(("source", "tidegate"),),
    )
    theirs = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    theirs.CorrelationData = b"from-paho-properties"

    async def scenario() -> list[paho.MQTTMessage]:
        client = make_client(mosquitto.host, mosquitto.port, new_id("props"), Inbox(), f"{root}/none")
        async with running(client), paho_peer(mosquitto.host, mosquitto.port, f"{root}/+/commands") as peer:
            client.publish(f"{root}/d-1/commands", b'{"name": "fan"}', qos=1, properties=ours)
            client.publish(f"{root}/d-3/commands", b"qos0", qos=0)
            with pytest.raises(
                MqttPublishError, match=r"must be gateway\.mqttcodec\.Properties, got Properties"
            ):
                client.publish(f"{root}/d-2/commands", b"{}", qos=1, properties=theirs)  # type: ignore[arg-type]
            await until(lambda: len(peer.received) == 2, "paho subscriber got them")
            await until(lambda: client.unconfirmed_publishes == 0, "broker confirmed them")
            return sorted(peer.received, key=lambda m: m.topic)

    first, third = asyncio.run(scenario())
    props = first.properties
    assert first.payload == b'{"name": "fan"}'
    assert getattr(props, "CorrelationData", None) == b"6f1c0d8e"
    assert getattr(props, "ResponseTopic", None) == f"{root}/d-1/commands/ack"
    assert getattr(props, "ContentType", None) == "application/json"
    assert getattr(props, "UserProperty", None) == [("source", "tidegate")]
    assert 55 <= getattr(props, "MessageExpiryInterval", 0) <= 60  # the broker counts it down
    assert third.payload == b"qos0" and third.qos == 0


def test_incoming_properties_reach_the_handler(mosquitto: MosquittoBroker) -> None:
    root = topic_root()
    properties = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ContentType = "application/senml+json"
    properties.CorrelationData = b"abc"

    async def scenario() -> Inbox:
        inbox = Inbox()
        client = make_client(mosquitto.host, mosquitto.port, new_id("inprops"), inbox, f"{root}/#")
        async with running(client), paho_peer(mosquitto.host, mosquitto.port) as peer:
            await asyncio.to_thread(peer.publish, f"{root}/with", [b"1"], properties)
            await asyncio.to_thread(peer.publish, f"{root}/without", [b"2"])
            await until(lambda: len(inbox.messages) == 2, "both delivered")
        return inbox

    with_props, without = asyncio.run(scenario()).messages
    assert with_props.content_type == "application/senml+json"
    assert with_props.properties.correlation_data == b"abc"  # as gateway/app.py reads it
    assert without.content_type is None


def test_publishes_while_disconnected_are_bounded_then_delivered(mosquitto: MosquittoBroker) -> None:
    root = topic_root()

    async def scenario() -> tuple[list[bytes], list[str], MqttClient]:
        errors: list[str] = []
        async with FaultProxy(mosquitto.host, mosquitto.port, mode=Mode.RESET) as proxy:
            client = make_client(
                proxy.host, proxy.port, new_id("queue"), Inbox(), f"{root}/none", max_queued=5
            )
            async with (
                running(client, wait_connected=False),
                paho_peer(mosquitto.host, mosquitto.port, f"{root}/#") as peer,
            ):
                await asyncio.sleep(0.3)  # connection attempts are being reset
                for i in range(5):
                    client.publish(f"{root}/c", b"%d" % i)
                for qos in (1, 0):
                    try:
                        client.publish(f"{root}/c", b"one too many", qos=qos)
                    except MqttPublishError as exc:
                        errors.append(str(exc))
                assert client.unconfirmed_publishes == 5
                proxy.set_mode(Mode.PASS)
                await until(lambda: len(peer.received) == 5, "queued publishes delivered after connecting")
                await until(lambda: client.unconfirmed_publishes == 0, "confirmed")
                return [bytes(m.payload) for m in peer.received], errors, client

    delivered, errors, client = asyncio.run(scenario())
    assert delivered == [b"0", b"1", b"2", b"3", b"4"]
    assert errors == [
        "outgoing queue full (5) while disconnected",
        f"cannot publish to '{root}/c' at QoS 0: not connected",
    ]
    assert client.stats.connects == 1


def test_inflight_publishes_are_resent_after_the_connection_dies(mosquitto: MosquittoBroker) -> None:
    root = topic_root()

    async def scenario() -> tuple[list[bytes], MqttClient]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            client = make_client(proxy.host, proxy.port, new_id("resend"), Inbox(), f"{root}/none")
            async with running(client), paho_peer(mosquitto.host, mosquitto.port, f"{root}/#") as peer:
                proxy.set_mode(Mode.BLACKHOLE)  # sent, never acked
                for i in range(10):
                    client.publish(f"{root}/c", b"%d" % i)
                await asyncio.sleep(0.1)
                assert len(client._inflight) == 10
                proxy.set_mode(Mode.PASS)
                proxy.reset_connections()
                await until(lambda: client.unconfirmed_publishes == 0, "resent and confirmed")
                await until(lambda: len(peer.received) >= 10, "delivered")
                return [bytes(m.payload) for m in peer.received], client

    delivered, client = asyncio.run(scenario())
    assert sorted(set(delivered)) == sorted(b"%d" % i for i in range(10))
    assert client.stats.connects == 2


def test_the_brokers_receive_maximum_bounds_our_inflight_window(tmp_path: Path) -> None:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip("mosquitto is not installed")
    root = topic_root()
    # mosquitto announces max_inflight_messages as its MQTT 5 Receive Maximum
    with MosquittoBroker(
        executable=executable, data_dir=tmp_path / "m", extra_config=["max_inflight_messages 3"]
    ) as broker:

        async def scenario() -> tuple[int, int, list[bytes]]:
            client = make_client(broker.host, broker.port, "rm", Inbox(), f"{root}/none")
            async with running(client), paho_peer(broker.host, broker.port, f"{root}/#") as peer:
                for i in range(20):
                    client.publish(f"{root}/c", b"%02d" % i)
                inflight, queued = len(client._inflight), len(client._queue)
                await until(lambda: len(peer.received) == 20, "all delivered through the window")
                return inflight, queued, [bytes(m.payload) for m in peer.received]

        inflight, queued, delivered = asyncio.run(scenario())
    assert (inflight, queued) == (3, 17)
    assert delivered == [b"%02d" % i for i in range(20)]


def test_disconnect_waits_for_unconfirmed_publishes(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    root = topic_root()

    async def scenario() -> tuple[float, list[bytes], MqttClient]:
        async with FaultProxy(mosquitto.host, mosquitto.port, mode=Mode.DELAY, delay=0.3) as proxy:
            client = make_client(proxy.host, proxy.port, new_id("flush"), Inbox(), f"{root}/none")
            task = asyncio.create_task(client.run())
            async with paho_peer(mosquitto.host, mosquitto.port, f"{root}/#") as peer:
                await until(client.connected.is_set, "connected through the slow proxy")
                for i in range(50):
                    client.publish(f"{root}/c", b"%d" % i)
                started = time.monotonic()
                await client.disconnect()
                took = time.monotonic() - started
                await asyncio.gather(task, return_exceptions=True)
                await until(lambda: len(peer.received) == 50, "all delivered")
                return took, [bytes(m.payload) for m in peer.received], client

    took, delivered, client = asyncio.run(scenario())
    assert took >= 0.5  # a round trip through the proxy each way before the PUBACKs came
    assert client.unconfirmed_publishes == 0
    assert delivered == [b"%d" % i for i in range(50)]
    assert "lost" not in caplog.text


def test_disconnect_gives_up_after_the_flush_timeout_and_says_so(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[float, MqttClient]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            client = make_client(proxy.host, proxy.port, new_id("giveup"), Inbox(), f"{topic_root()}/none")
            task = asyncio.create_task(client.run())
            await until(client.connected.is_set, "connected")
            proxy.set_mode(Mode.BLACKHOLE)
            client.publish("mc/lost", b"never confirmed")
            started = time.monotonic()
            await client.disconnect(flush_timeout=0.5)
            took = time.monotonic() - started
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return took, client

    with caplog.at_level(logging.WARNING, logger="gateway.mqtt"):
        took, client = asyncio.run(scenario())
    assert 0.5 <= took < 6.5  # the flush timeout, then at most the close wait
    assert client.unconfirmed_publishes == 1
    assert (
        "1 publish(es) not acknowledged by the broker within 0.5s of shutdown: they are lost" in caplog.text
    )
    with pytest.raises(MqttPublishError, match="shutting down"):
        client.publish("mc/after", b"x")


# -- refusals and handler failures --------------------------------------------------------------------


def test_a_failing_handler_is_reported_and_the_rest_still_flows(mosquitto: MosquittoBroker) -> None:
    root = topic_root()
    reported: list[dict[str, Any]] = []

    async def scenario() -> Inbox:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        inbox = Inbox()

        def handler(message: MqttMessage) -> None:
            if message.payload == b"boom":
                raise RuntimeError("bug in a handler")
            inbox(message)

        client = make_client(mosquitto.host, mosquitto.port, new_id("boom"), inbox, f"{root}/#")
        client._subscriptions = [Subscription(f"{root}/#", 1, handler)]
        async with running(client), paho_peer(mosquitto.host, mosquitto.port) as peer:
            await asyncio.to_thread(peer.publish, f"{root}/x", [b"a", b"boom", b"b"])
            await until(lambda: len(inbox.messages) == 2, "the others delivered")
        return inbox

    inbox = asyncio.run(scenario())
    assert inbox.payloads == [b"a", b"b"]
    [context] = reported
    assert isinstance(context["exception"], RuntimeError)
    assert "stays unacked" in context["message"]


def test_subscriptions_and_protocol_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="QoS must be 0 or 1"):
        MqttClient(host="h", port=1, client_id="c", subscriptions=[Subscription("a/#", 2, lambda m: None)])
    with pytest.raises(ValueError, match="'#' must be a whole last level"):
        MqttClient(host="h", port=1, client_id="c", subscriptions=[Subscription("a/#/b", 1, lambda m: None)])
    with pytest.raises(ValueError, match="protocol"):
        MqttClient(host="h", port=1, client_id="c", subscriptions=[], protocol="3.1")
