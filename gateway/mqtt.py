"""The gateway's MQTT connection on asyncio's Protocol/Transport, with our own codec (`gateway.mqttcodec`).

Why not paho here: on the ingest hot path paho reads one packet per event-loop wake-up with three
`recv` calls, builds an MQTT 5 `Properties` object and an `MQTTMessage` per PUBLISH and dispatches
through its topic matcher: ~36 µs of the gateway's ~87 µs per message in the benchmark. Here one
`data_received` call parses every packet of a socket read, dispatch is one dict lookup per message
(handlers cached per topic string), and PUBACKs are gathered in a buffer written once per event-loop
iteration. No Task or Future per message.

Behaviour (as the paho-based connection it replaced had it): a persistent session under a fixed client id
(MQTT 5 clean start off + session expiry; 3.1.1 clean session off), resubscribed after every
CONNACK, `connected` set once the SUBACK is in; manual acks only on the connection that received
the message (an ack carries its connection `generation`; after a reconnect the broker redelivers);
reconnects with exponential backoff and jitter; a link silent for 1.5 x keepalive dropped; a session
the broker did not resume reported through `on_session_lost(since, until)`; our QoS 1 publishes
held (bounded) while disconnected and resent after a reconnect; `disconnect()` waits (bounded) for
the broker to confirm them.

    MqttError               the MQTT client's errors
     └── MqttPublishError   a publish could not be queued (full queue, bad topic, not connected)
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pydantic import SecretStr

from gateway.mqttcodec import (
    NO_PROPERTIES,
    PINGREQ_PACKET,
    ConnAck,
    Disconnect,
    EncodeError,
    MqttCodecError,
    MqttDecoder,
    Packet,
    PingResp,
    Properties,
    PubAck,
    Publish,
    SubAck,
    connack_refused,
    encode_connect,
    encode_disconnect,
    encode_subscribe,
    publish_template,
    reason_name,
    topic_matches,
    validate_topic_filter,
)

if TYPE_CHECKING:
    from gateway.tls import TlsOptions

log = logging.getLogger(__name__)
# The protocol trace at DEBUG: connection-level packets only (never a PUBLISH on the hot path, never
# a password: CONNECT says whether one was sent).
trace = logging.getLogger(f"{__name__}.trace")

MqttMessage = Publish  # what handlers receive: topic, payload, mid, qos, retain, dup, content_type
MessageHandler = Callable[[MqttMessage], None]

# keepalive pings and the dead-link check; a fraction of the shortest keepalive (5s)
MISC_INTERVAL: Final = 0.5
# our QoS 1 publishes not yet confirmed by the broker; beyond this publish() fails loudly
MAX_OUTGOING_QUEUE: Final = 10_000
# our QoS 1 publishes sent and not yet acked (lowered to the broker's Receive Maximum)
MAX_INFLIGHT: Final = 100
CONNECT_TIMEOUT: Final = 10.0  # TCP connect plus TLS handshake
DEAD_LINK_FACTOR: Final = 1.5  # nothing from the broker for this many keepalives: the link is dead
ROUTE_CACHE_SIZE: Final = 100_000  # topics whose handler is remembered; emptied when full
# Messages handed to handlers per event-loop turn (~2.5 ms of gateway work at ~40 µs each); the
# rest of a read waits, parsed, with the socket unread, so a draining backlog (one 256 KiB read is
# ~1,400 telemetry messages, ~55 ms) does not stall timers, the batch writer and our acks.
DISPATCH_SLICE: Final = 64


class MqttError(Exception):
    """Base of the MQTT client's errors."""


class MqttPublishError(MqttError):
    """A publish could not be queued (full queue, invalid topic or properties, not connected for QoS 0)."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic filter, its QoS (0 or 1), and the handler for messages that match it."""

    topic_filter: str
    qos: int
    handler: MessageHandler


@dataclass(slots=True)
class ConnectionStats:
    """What happened to the connection so far."""

    connects: int = 0
    disconnects: int = 0
    sessions_lost: int = 0  # connected with session_present = 0 after having had a session
    last_error: str = ""
    publishes_refused: int = 0  # our QoS 1 publishes the broker acked with a failure reason code


class _Outgoing:
    """One of our QoS 1 publishes, encoded once; the packet id is written in when it is sent."""

    __slots__ = ("offset", "packet", "topic")

    def __init__(self, topic: str, packet: bytearray, offset: int) -> None:
        self.topic = topic
        self.packet = packet
        self.offset = offset


class _Link(asyncio.Protocol):
    """One TCP (or TLS) connection to the broker; the client ignores callbacks from a link it replaced."""

    def __init__(self, client: MqttClient, keepalive: int) -> None:
        self.client = client
        self.decoder = MqttDecoder(mqtt5=client.mqtt5)
        self.transport: asyncio.Transport | None = None
        self.keepalive = keepalive  # the broker's Server Keep Alive replaces ours
        self.up = False  # CONNACK accepted
        self.dropped = False  # we closed it; ignore what it still delivers
        self.write_paused = False
        self.draining = False  # a _drain_backlog call is scheduled
        self.close_reason = ""
        self.reported = False  # why it closed is already in stats.last_error and the log
        now = client._now()
        self.last_in = now
        self.last_out = now
        self.last_ping = now
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.client._link_made(self)

    def data_received(self, data: bytes) -> None:
        if self.dropped:
            return
        client = self.client
        self.last_in = client._now()
        try:
            packets = self.decoder.feed(data)
        except MqttCodecError as exc:
            client._drop(self, f"protocol error from the broker: {exc}")
            return
        if packets:
            client._received(self, packets)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._link_lost(self, exc)
        self.closed.set()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.client._writable(self)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.last_out = self.client._now()
            transport.write(data)


def _no_loop(*args: object) -> asyncio.Handle:
    raise RuntimeError("MqttClient.run() has not started")


class MqttClient:
    """One MQTT client connection with a persistent session, on the running event loop.

    The gateway's connection to the broker, with TLS
    (`ssl_context`, `server_hostname`) and MQTT 5 properties on `publish`.

    Args:
        host, port: the broker.
        client_id: fixed, so the broker can keep our session between connections.
        subscriptions: topic filters (QoS 0 or 1) and their handlers; a message matching several
            filters goes to each handler, one matching none is acked and dropped.
        protocol: "5" or "3.1.1".
        username, password: credentials (never logged).
        keepalive: seconds; PINGREQ after this long without traffic, and a link silent for 1.5 x this
            long is dropped and redialled.
        session_expiry: MQTT 5 session expiry in seconds (3.1.1 uses clean_session=False instead).
        receive_maximum: MQTT 5 Receive Maximum (unacked messages in flight towards us).
        reconnect_min_delay, reconnect_max_delay: backoff bounds in seconds (doubling, with jitter).
        manual_ack: ack QoS 1 messages only when `ack()` is called (else right after the handler).
        on_session_lost: called with (since, until) epoch seconds, the window in which messages may
            have been lost, when the broker did not resume our session.
        tls: connect over TLS with these options (`gateway.tls.TlsOptions`: CA, client certificate,
            server name), through `gateway.tls.tls_context`; failures are described in
            `stats.last_error`.
        ssl_context: connect over TLS with a context built elsewhere (instead of `tls`).
        server_hostname: the name the broker's certificate must carry (default: `tls.server_name`,
            else `host`).
        max_queued: bound on our QoS 1 publishes not yet confirmed by the broker.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        subscriptions: Sequence[Subscription],
        protocol: str = "5",
        username: str | None = None,
        password: SecretStr | None = None,
        keepalive: int = 30,
        session_expiry: int = 86_400,
        receive_maximum: int = 65_535,
        reconnect_min_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        manual_ack: bool = True,
        on_session_lost: Callable[[float, float], None] | None = None,
        tls: TlsOptions | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_queued: int = MAX_OUTGOING_QUEUE,
    ) -> None:
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', got {protocol!r}")
        self.mqtt5 = protocol == "5"
        if not self.mqtt5 and password is not None and username is None:
            raise ValueError("MQTT 3.1.1 sends a password only together with a user name")
        for sub in subscriptions:
            validate_topic_filter(sub.topic_filter)
            if sub.qos not in (0, 1):
                raise ValueError(f"subscription {sub.topic_filter!r}: QoS must be 0 or 1, got {sub.qos}")
        self.host, self.port, self.client_id = host, port, client_id
        self._subscriptions = list(subscriptions)
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        self._min_delay, self._max_delay = reconnect_min_delay, reconnect_max_delay
        self._manual_ack = manual_ack
        self._on_session_lost = on_session_lost
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._describe_tls: Callable[[BaseException | str], str | None] | None = None
        if tls is not None or ssl_context is not None:
            from gateway.tls import TlsOptions, describe_tls_failure, tls_context

            options = tls if tls is not None else TlsOptions()
            if ssl_context is None:
                self._ssl = tls_context(options)
            if server_hostname is None:
                self._server_hostname = options.server_name
            self._describe_tls = lambda error: describe_tls_failure(error, options, port)
        self._max_queued = max_queued
        # fail now, not on every connect, if the client id or credentials cannot be encoded
        encode_connect(
            client_id,
            mqtt5=self.mqtt5,
            keepalive=keepalive,
            clean_start=False,
            username=username,
            password=password.get_secret_value().encode() if password is not None else None,
        )
        self.stats = ConnectionStats()
        self.generation = 0  # bumped on every accepted CONNACK; acks carry the generation they belong to
        self.connected = asyncio.Event()  # set once subscribed (SUBACK), cleared on disconnect
        self._now: Callable[[], float] = time.monotonic  # the loop's clock once run() starts
        self._call_soon: Callable[..., asyncio.Handle] = _no_loop
        self._link: _Link | None = None
        self._link_up = False  # CONNACK accepted on the current link and not yet disconnected
        self._closing = False
        self._paused = False
        self._backlog: list[Publish] = []  # parsed while reading was paused; delivered on resume
        self._routes: dict[str, MessageHandler] = {}
        self._acks = bytearray()  # PUBACKs gathered in this loop iteration
        self._flush_scheduled = False
        self._queue: deque[_Outgoing] = deque()  # QoS 1 publishes waiting for a packet id and a slot
        self._inflight: dict[int, _Outgoing] = {}  # sent, awaiting PUBACK, in send order
        self._window = MAX_INFLIGHT
        self._server_max_packet: int | None = None
        self._next_id = 0
        self._subscribe_id = 0
        self._settled = asyncio.Event()  # no publish awaiting confirmation, or the link went down
        self._had_session = False
        self._disconnected_at: float | None = None

    # -- public API -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect with backoff and jitter, until cancelled or `disconnect()`ed."""
        loop = asyncio.get_running_loop()
        self._now = loop.time
        self._call_soon = loop.call_soon
        misc = asyncio.create_task(self._misc_loop(), name="mqtt-misc")
        try:
            delay = self._min_delay
            while not self._closing:
                generation_before = self.generation
                link = _Link(self, self._keepalive)
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        await loop.create_connection(
                            lambda link=link: link,  # the factory hands over this attempt's link
                            self.host,
                            self.port,
                            ssl=self._ssl,
                            server_hostname=(self._server_hostname or self.host) if self._ssl else None,
                        )
                except (OSError, ValueError) as exc:  # refused, unreachable, TLS, timeouts, bad host name
                    tls_problem = self._describe_tls(exc) if self._describe_tls is not None else None
                    detail = tls_problem or str(exc) or f"no connection within {CONNECT_TIMEOUT:.0f}s"
                    self.stats.last_error = f"cannot connect to {self.host}:{self.port}: {detail}"
                    # a TLS refusal is a configuration problem that retrying will not fix by itself
                    log.log(
                        logging.ERROR if tls_problem else logging.WARNING,
                        "%s; retrying in up to %.1fs",
                        self.stats.last_error,
                        delay,
                    )
                else:
                    await link.closed.wait()  # disconnect, refused CONNACK, dead link, protocol error
                if self._closing:
                    break
                if self.generation != generation_before:
                    delay = self._min_delay  # we were connected: a fresh outage starts a fresh backoff
                # jitter spreads the reconnects of many clients after a broker restart
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._max_delay)
        finally:
            misc.cancel()
            await asyncio.gather(misc, return_exceptions=True)
            link_now = self._link
            if link_now is not None and link_now.transport is not None:
                link_now.transport.abort()  # cancelled: no DISCONNECT, like a crash; the broker keeps the session

    @property
    def unconfirmed_publishes(self) -> int:
        """Our QoS 1 publishes (commands, dead letters) the broker has not acknowledged yet."""
        return len(self._inflight) + len(self._queue)

    async def disconnect(self, *, flush_timeout: float = 5.0) -> None:
        """Disconnect cleanly; the broker keeps our session (and queues for us) until it expires.

        Our own QoS 1 publishes live only in memory until the broker acknowledges them, so wait
        (bounded) for those first rather than lose commands at shutdown. Messages that arrive
        meanwhile are not delivered or acked: the broker redelivers them to our session.
        """
        self._closing = True
        self._backlog.clear()
        link = self._link
        if link is None or link.transport is None:
            self._warn_unsent()
            return
        if self._paused:
            link.transport.resume_reading()  # PUBACKs must get in; PUBLISHes are now ignored
        if self._link_up:
            try:
                async with asyncio.timeout(flush_timeout):
                    while (self._inflight or self._queue) and self._link_up:
                        self._settled.clear()
                        await self._settled.wait()
            except TimeoutError:
                log.warning(
                    "%d publish(es) not acknowledged by the broker within %ss of shutdown: they are lost",
                    self.unconfirmed_publishes,
                    flush_timeout,
                )
            if self._link is link and self._link_up:
                if self._acks:  # acks for what was written go out before we say goodbye
                    link.write(bytes(self._acks))
                    self._acks.clear()
                link.write(encode_disconnect(mqtt5=self.mqtt5))
                link.close_reason = "disconnected"
                link.dropped = True
                assert link.transport is not None
                link.transport.close()
        else:
            link.dropped = True
            link.transport.abort()
        try:
            await asyncio.wait_for(link.closed.wait(), timeout=5)
        except TimeoutError:
            log.warning("broker did not close the connection within 5s")
        self._warn_unsent()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """Send now, or (QoS 1) queue until connected and the in-flight window has room.

        Args:
            properties: MQTT 5 PUBLISH properties, e.g. `Properties(message_expiry_interval=60,
                correlation_data=b"...", response_topic="...", content_type="application/json")`
                (`gateway.mqttcodec.Properties`). Ignored on an MQTT 3.1.1 connection. A queued
                message keeps its Message Expiry Interval as given: the time it waited here is not
                taken off.

        Raises:
            MqttPublishError: the outgoing queue is full, the topic or properties are invalid, the
                client is shutting down, or (QoS 0) it is not connected.
        """
        if self._closing:
            raise MqttPublishError(f"cannot publish to {topic!r}: the MQTT client is shutting down")
        if qos not in (0, 1):
            raise MqttPublishError(f"cannot publish to {topic!r}: QoS must be 0 or 1, got {qos}")
        try:
            packet, offset = publish_template(
                topic,
                payload,
                mqtt5=self.mqtt5,
                qos=qos,
                retain=retain,
                properties=properties if self.mqtt5 else None,
            )
        except EncodeError as exc:
            raise MqttPublishError(f"cannot publish to {topic!r}: {exc}") from exc
        limit = self._server_max_packet
        if limit is not None and len(packet) > limit:
            raise MqttPublishError(
                f"cannot publish to {topic!r}: {len(packet)} bytes exceed the broker's maximum packet size {limit}"
            )
        if qos == 0:
            link = self._link
            if link is None or not self._link_up:
                raise MqttPublishError(f"cannot publish to {topic!r} at QoS 0: not connected")
            link.write(bytes(packet))
            return
        if len(self._queue) + len(self._inflight) >= self._max_queued:
            where = "" if self._link_up else " while disconnected"
            raise MqttPublishError(f"outgoing queue full ({self._max_queued}){where}")
        self._queue.append(_Outgoing(topic, packet, offset))
        self._settled.clear()
        self._send_queued()

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """PUBACK a message if it arrived on the current connection (else the broker redelivers it)."""
        if qos and generation == self.generation and self._link_up:
            acks = self._acks
            acks.append(0x40)
            acks.append(0x02)
            acks.append(mid >> 8)
            acks.append(mid & 0xFF)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._call_soon(self._flush_acks)

    def pause_reading(self) -> None:
        """Stop reading the socket so the broker holds further messages (backpressure)."""
        if self._paused:
            return
        self._paused = True
        link = self._link
        if link is not None and link.transport is not None:
            link.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the socket again after `pause_reading` (messages parsed meanwhile come first)."""
        if not self._paused:
            return
        self._paused = False
        link = self._link
        if link is None or link.transport is None:
            return
        link.last_in = self._now()  # nothing was read while paused: do not call the link dead for it
        if self._backlog:
            if not link.draining:
                link.draining = True
                self._call_soon(self._drain_backlog, link)
        else:
            link.transport.resume_reading()

    @property
    def paused(self) -> bool:
        """True while reading is paused for backpressure."""
        return self._paused

    def assume_session(self, since: float) -> None:
        """Take it that the broker holds our session, as an earlier run recorded (gateway/runstate.py).

        A first CONNACK with session_present = 0 then counts as a lost session, its possible-loss
        window starting at `since` (epoch seconds), the last moment that run knew it had it.
        """
        self._had_session = True
        self._disconnected_at = since

    # -- inbound ----------------------------------------------------------------------------------

    def _received(self, link: _Link, packets: list[Packet]) -> None:
        """Handle the packets of one read, in order (the hot path)."""
        if link is not self._link:
            return
        if len(packets) <= DISPATCH_SLICE:
            self._dispatch(link, packets)
        else:  # draining a backlog: one read holds ~1,400 telemetry messages
            self._dispatch(link, packets[:DISPATCH_SLICE])
            self._defer(link, packets[DISPATCH_SLICE:])

    def _dispatch(self, link: _Link, packets: list[Packet]) -> None:
        routes = self._routes
        for packet in packets:
            if type(packet) is Publish:
                if self._paused or self._closing or not link.up or packet.qos > 1:
                    self._defer(link, [packet])
                    if link.dropped:
                        return
                    continue
                handler = routes.get(packet.topic)
                if handler is None:
                    handler = self._route(packet.topic)
                try:
                    handler(packet)
                except Exception as exc:  # a bug in a handler: report it like the event loop would
                    self._handler_failed(packet, exc)
            else:
                self._control(link, packet)
                if link.dropped:
                    return

    def _defer(self, link: _Link, packets: list[Packet]) -> None:
        """Keep PUBLISHes for a later loop turn and stop reading meanwhile; handle the others now.

        Used while reading is paused (backpressure: at most the rest of one read waits here) and to
        hand handlers at most DISPATCH_SLICE messages per event-loop turn, so timers, the batch
        writer and our acks get their turn while a backlog drains. Out of order with the PUBLISHes
        held, control packets (PUBACK, SUBACK, PINGRESP) lose nothing: they concern other flows.
        """
        backlog = self._backlog
        for packet in packets:
            if type(packet) is Publish:
                if self._closing:
                    continue  # not acked: the broker redelivers it to our session
                if not link.up:
                    self._drop(link, "the broker sent PUBLISH before CONNACK")
                    return
                if packet.qos > 1:
                    self._drop(
                        link, f"the broker sent a QoS {packet.qos} message; we subscribed at QoS 1 at most"
                    )
                    return
                backlog.append(packet)
            else:
                self._control(link, packet)
                if link.dropped:
                    return
        if backlog and link.transport is not None and not link.draining:
            link.transport.pause_reading()
            if not self._paused:
                link.draining = True
                self._call_soon(self._drain_backlog, link)

    def _drain_backlog(self, link: _Link) -> None:
        link.draining = False
        if link is not self._link or self._paused:
            return  # a new link starts afresh; resume_reading schedules the rest
        backlog = self._backlog
        batch = backlog[:DISPATCH_SLICE]
        del backlog[:DISPATCH_SLICE]
        routes = self._routes
        for index, packet in enumerate(batch):
            if self._paused or self._closing:
                if not self._closing:
                    backlog[0:0] = batch[index:]
                return
            handler = routes.get(packet.topic) or self._route(packet.topic)
            try:
                handler(packet)
            except Exception as exc:
                self._handler_failed(packet, exc)
        if link is not self._link or self._paused:
            return
        if backlog:
            link.draining = True
            self._call_soon(self._drain_backlog, link)
        elif link.transport is not None:
            link.transport.resume_reading()

    def _handler_failed(self, packet: Publish, exc: Exception) -> None:
        asyncio.get_running_loop().call_exception_handler(
            {
                "message": f"MQTT message handler failed for a message on {packet.topic!r}; "
                "it stays unacked and comes again after a reconnect",
                "exception": exc,
            }
        )

    def _route(self, topic: str) -> MessageHandler:
        matched = [sub.handler for sub in self._subscriptions if topic_matches(sub.topic_filter, topic)]
        handler: MessageHandler
        if not matched:
            handler = self._unexpected
        elif len(matched) == 1:
            handler = matched[0]
        else:
            handlers = tuple(matched)

            def handler(message: Publish) -> None:
                for each in handlers:
                    each(message)

        if not self._manual_ack and matched:
            inner = handler

            def handler(message: Publish) -> None:
                inner(message)
                self.ack(message.mid, message.qos, self.generation)

        if len(self._routes) >= ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[topic] = handler
        return handler

    def _unexpected(self, message: Publish) -> None:
        # A message matching none of our filters (e.g. left over from an old session): ack and drop.
        log.debug("ignoring message on unexpected topic %r", message.topic)
        self.ack(message.mid, message.qos, self.generation)

    def _control(self, link: _Link, packet: Packet) -> None:
        if isinstance(packet, PubAck):
            self._on_puback(packet)
        elif isinstance(packet, PingResp):
            pass  # data_received already noted that the broker is alive
        elif isinstance(packet, ConnAck):
            self._on_connack(link, packet)
        elif isinstance(packet, SubAck):
            self._on_suback(packet)
        elif isinstance(packet, Disconnect):
            name = reason_name(packet.reason_code)
            detail = packet.properties.reason_string
            self._drop(
                link,
                f"the broker closed the connection: {name}" + (f" ({detail})" if detail else ""),
                error=False,
            )

    def _on_connack(self, link: _Link, packet: ConnAck) -> None:
        trace.debug("Received %s", packet)
        if link.up:
            self._drop(link, "the broker sent a second CONNACK")
            return
        if connack_refused(packet.reason_code, mqtt5=self.mqtt5):
            name = reason_name(packet.reason_code, mqtt5=self.mqtt5, connack=True)
            detail = packet.properties.reason_string
            self.stats.last_error = f"broker refused the connection: {name}" + (
                f" ({detail})" if detail else ""
            )
            log.error("%s (client id %s)", self.stats.last_error, self.client_id)
            link.close_reason = self.stats.last_error
            link.reported = True
            link.dropped = True
            if link.transport is not None:
                link.transport.close()
            return
        link.up = True
        self._link_up = True
        self.generation += 1
        self.stats.connects += 1
        self.stats.last_error = ""
        properties = packet.properties
        if properties.server_keep_alive is not None:
            link.keepalive = properties.server_keep_alive
        self._window = max(1, min(MAX_INFLIGHT, properties.receive_maximum or 65_535))
        self._server_max_packet = properties.maximum_packet_size
        session_present = packet.session_present
        if self._had_session and not session_present:
            # The broker forgot us (expired session, broker lost its state): messages queued for us
            # while we were away are gone. Record it; the gap shows up in per-device seq checks.
            self.stats.sessions_lost += 1
            since, until = self._disconnected_at or time.time(), time.time()
            log.warning(
                "MQTT session was not resumed (session_present=0): messages sent to us between %s and %s "
                "may have been lost",
                time.strftime("%H:%M:%S", time.localtime(since)),
                time.strftime("%H:%M:%S", time.localtime(until)),
            )
            if self._on_session_lost is not None:
                self._on_session_lost(since, until)
        self._had_session = True
        log.info("connected to %s:%s (session present: %s)", self.host, self.port, session_present)
        if self._inflight:
            if session_present:
                # the broker still knows these packet ids: resend with DUP, in order (spec 4.4)
                for outgoing in self._inflight.values():
                    outgoing.packet[0] |= 0x08
                    link.write(bytes(outgoing.packet))
            else:
                # a new session knows none of them: send them again, first, as new messages
                self._queue.extendleft(reversed(self._inflight.values()))
                self._inflight.clear()
        # Subscribe every time: harmless when the session kept them, required when it did not.
        self._subscribe_id = self._new_packet_id()
        trace.debug(
            "Sending SUBSCRIBE (packet id %d) %s",
            self._subscribe_id,
            [(s.topic_filter, s.qos) for s in self._subscriptions],
        )
        link.write(
            encode_subscribe(
                self._subscribe_id, [(s.topic_filter, s.qos) for s in self._subscriptions], mqtt5=self.mqtt5
            )
        )
        self._send_queued()

    def _on_suback(self, packet: SubAck) -> None:
        trace.debug("Received %s", packet)
        if packet.packet_id != self._subscribe_id:
            return
        self._subscribe_id = 0
        for sub, code in zip(self._subscriptions, packet.reason_codes, strict=False):
            if code >= 0x80:
                name = reason_name(code, mqtt5=self.mqtt5)
                self.stats.last_error = f"broker refused the subscription to {sub.topic_filter!r}: {name}"
                log.error("%s (client id %s)", self.stats.last_error, self.client_id)
        # `connected` means subscribed: messages published from now on reach us even without a session
        self.connected.set()

    def _on_puback(self, packet: PubAck) -> None:
        outgoing = self._inflight.pop(packet.packet_id, None)
        if outgoing is None:
            log.debug("PUBACK for packet id %d, which we are not waiting for", packet.packet_id)
            return
        if packet.reason_code >= 0x80:
            self.stats.publishes_refused += 1
            detail = packet.properties.reason_string
            log.error(
                "the broker refused our publish to %r: %s%s",
                outgoing.topic,
                reason_name(packet.reason_code),
                f" ({detail})" if detail else "",
            )
        if self._queue:
            self._send_queued()
        elif not self._inflight:
            self._settled.set()

    # -- outbound ---------------------------------------------------------------------------------

    def _new_packet_id(self) -> int:
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            candidate = self._next_id
            if candidate not in self._inflight and candidate != self._subscribe_id:
                return candidate
        raise RuntimeError("no free MQTT packet identifier")  # the window keeps far fewer in flight

    def _send_queued(self) -> None:
        link = self._link
        if link is None or not self._link_up or link.write_paused:
            return
        queue, inflight, window = self._queue, self._inflight, self._window
        limit = self._server_max_packet
        while queue and len(inflight) < window:
            outgoing = queue.popleft()
            packet, offset = outgoing.packet, outgoing.offset
            if limit is not None and len(packet) > limit:
                self.stats.publishes_refused += 1
                log.error(
                    "dropping our publish to %r: %d bytes exceed the broker's maximum packet size %d",
                    outgoing.topic,
                    len(packet),
                    limit,
                )
                continue
            packet_id = self._new_packet_id()
            packet[0] &= ~0x08
            packet[offset] = packet_id >> 8
            packet[offset + 1] = packet_id & 0xFF
            inflight[packet_id] = outgoing
            link.write(bytes(packet))
            if link.write_paused:
                break
        if not queue and not inflight:
            self._settled.set()

    def _flush_acks(self) -> None:
        self._flush_scheduled = False
        acks = self._acks
        if not acks:
            return
        link = self._link
        if link is None or not self._link_up:
            acks.clear()
            return
        if link.write_paused:
            return  # resume_writing flushes them
        data = bytes(acks)
        acks.clear()
        link.write(data)

    def _writable(self, link: _Link) -> None:
        if link is self._link:
            self._flush_acks()
            self._send_queued()

    def _warn_unsent(self) -> None:
        if self._queue or self._inflight:
            log.warning(
                "%d publish(es) never confirmed by the broker at shutdown: they are lost",
                self.unconfirmed_publishes,
            )

    # -- connection lifecycle ---------------------------------------------------------------------

    def _link_made(self, link: _Link) -> None:
        transport = link.transport
        assert transport is not None
        if self._closing:
            link.dropped = True
            transport.abort()
            return
        self._link = link
        password = self._password.get_secret_value().encode() if self._password is not None else None
        trace.debug(
            "Sending CONNECT (client id %s, MQTT %s, keepalive %d, clean start 0, user name %s, password %s)",
            self.client_id,
            "5" if self.mqtt5 else "3.1.1",
            self._keepalive,
            "set" if self._username is not None else "none",
            "set" if password is not None else "none",
        )
        link.write(
            encode_connect(
                self.client_id,
                mqtt5=self.mqtt5,
                keepalive=self._keepalive,
                clean_start=False,  # resume the session every time
                username=self._username,
                password=password,
                session_expiry=self._session_expiry if self.mqtt5 else None,
                receive_maximum=self._receive_maximum if self.mqtt5 else None,
            )
        )

    def _drop(self, link: _Link, reason: str, *, error: bool = True) -> None:
        """Close a link we no longer trust or the broker gave up (protocol error, dead, DISCONNECT)."""
        if link.dropped:
            return
        (log.error if error else log.warning)(
            "%s; dropping the connection to %s:%s", reason, self.host, self.port
        )
        link.close_reason = reason
        link.dropped = True
        if link.transport is not None:
            link.transport.abort()

    def _link_lost(self, link: _Link, exc: Exception | None) -> None:
        if link is not self._link:
            return
        self._link = None
        was_up = self._link_up
        self._link_up = False
        self.connected.clear()
        self._acks.clear()  # acks belong to their connection; the broker redelivers the rest
        self._backlog.clear()
        self._subscribe_id = 0
        self._settled.set()  # wakes a disconnect() waiting for PUBACKs
        if was_up:
            self._disconnected_at = time.time()
            self.stats.disconnects += 1
        if self._closing:
            return
        if was_up:
            self.stats.last_error = link.close_reason or f"connection lost: {exc or 'closed by the broker'}"
            log.warning("disconnected from %s:%s: %s", self.host, self.port, self.stats.last_error)
        elif not link.reported:
            self.stats.last_error = (
                f"cannot connect to {self.host}:{self.port}: {self._early_close(link, exc)}"
            )
            log.error("%s (client id %s)", self.stats.last_error, self.client_id)

    def _early_close(self, link: _Link, exc: Exception | None) -> str:
        """Say why a connection closed before its CONNACK (a TLS refusal, not an MQTT listener, ...)."""
        if link.close_reason:
            return link.close_reason
        if exc is not None and self._describe_tls is not None:
            problem = self._describe_tls(exc)
            if problem is not None:
                return problem
        problem = "the connection closed before the broker answered CONNECT" + (f" ({exc})" if exc else "")
        if self._ssl is None:
            problem += f"; if port {self.port} is a TLS listener, use mqtts://"
        return problem

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL)
            link = self._link
            if link is None or link.dropped or link.transport is None:
                continue
            now = self._now()
            keepalive = link.keepalive
            if not keepalive:
                continue
            # A healthy link brings a PINGRESP within keepalive + MISC_INTERVAL; past 1.5x keepalive of
            # silence it is dead (before CONNACK too: a broker that accepts TCP and never answers).
            silent = now - link.last_in
            # While reading is paused for backpressure nothing is read, so silence proves nothing.
            if not (self._paused and link.up) and silent > DEAD_LINK_FACTOR * keepalive:
                what = "nothing from the broker" if link.up else "no CONNACK from the broker"
                self._drop(link, f"{what} for {silent:.1f}s", error=False)
                continue
            # Ping after keepalive of silence either way: the broker needs to hear from us, and we
            # need something back to tell a quiet link from a dead one.
            if (
                link.up
                and (now - link.last_out >= keepalive or silent >= keepalive)
                and now - link.last_ping >= keepalive
            ):
                link.last_ping = now
                link.write(PINGREQ_PACKET)


__all__ = [
    "MAX_OUTGOING_QUEUE",
    "MISC_INTERVAL",
    "NO_PROPERTIES",
    "ConnectionStats",
    "MessageHandler",
    "MqttClient",
    "MqttError",
    "MqttMessage",
    "MqttPublishError",
    "Properties",
    "Subscription",
]
