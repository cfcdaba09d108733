"""Run a simulated fleet against an MQTT broker: telemetry and status out, commands in, acks out.

Wire protocol, per device (QoS 1 unless `qos` says otherwise; status always QoS 1, retained):

    devices/{device_id}/telemetry      {"ts", "seq", "<field>": value, ...}, or a JSON array of those
    devices/{device_id}/status         {"status": "online" | "offline", "ts"}   (devices/status.py)
    devices/{device_id}/commands       {"id", "name", "params", "ts", "expires"?}  (devices/command.py)
    devices/{device_id}/commands/ack   {"id", "status": "ok" | "error", "detail"?}

What each device sends and how it answers commands is `simulator.model.SimulatedDevice`, built from
a fleet file (simulator/fleet.py) or from `--devices N --rate R` (`quick_fleet`).

Shape of a run:

- One scheduler (a heap of due times) drives every device: it pops the devices whose reading is
  due, calls `step`, and hands the messages to the device's connection. No task per device, so
  10,000 devices cost what their messages cost. Readings are computed at their scheduled times, so
  with the same seed a run sends the same values, faults and ids (only the start time differs)
  as long as the scheduler keeps up; when it falls behind by more than a reading interval, that
  device's next reading is taken at once instead of catching up with a burst.
- Devices are spread over a few MQTT connections (`connections`; default one per 500 devices),
  each with a bounded outgoing queue (the scheduler waits when it is full) and up to 32 publishes in
  flight. With one device per connection (`connection_per_device`, or a connection that happens to
  carry one device) the client id is the device id and the connection carries that device's last
  will; a simulated disconnect then really drops the TCP connection without a DISCONNECT, so the
  broker publishes the will, and the device reconnects when the disconnect is over.
- A multiplexed connection has one last will for many devices, so it sets none: it publishes each
  device's birth after connecting and each device's offline status before a clean stop, and a
  simulated disconnect publishes the offline status the broker would have sent. If the simulator
  process dies, its devices stay "online" in their retained status: use `connection_per_device`
  when the last will itself is under test.
- Connections use a persistent session (clean_session off, a fixed client id), so commands sent
  while one is briefly away are delivered when it is back. Delivery is at least once: a message
  whose PUBACK had not arrived when the connection dropped is sent again after reconnecting.
- `stop` (or `duration`) ends the run cleanly: the scheduler stops, each connection sends what it
  has queued (for at most `STOP_GRACE` seconds), publishes its devices' offline status, and
  disconnects. Cancelling the task disconnects too, without the summary.

    SimulatorError                 the simulation could not run as asked
     └── BrokerUnavailableError    a connection failed at start; `url`, `client_id`, `reason`
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from devices.command import Command
from devices.errors import PayloadError, Problem, SourceFileError
from devices.topic import TopicScheme
from simulator.fleet import Fleet, parse_fleet, quick_fleet
from simulator.model import Outgoing, SimulatedDevice

log = logging.getLogger(__name__)

TELEMETRY_TOPIC = TopicScheme("devices/{device_id}/telemetry")
COMMAND_TOPIC = TopicScheme("devices/{device_id}/commands")
ACK_TOPIC = TopicScheme("devices/{device_id}/commands/ack")
STATUS_TOPIC = TopicScheme("devices/{device_id}/status")
DEFAULT_PORT, DEFAULT_TLS_PORT = 1883, 8883
DEVICES_PER_CONNECTION = 500  # the default split when `connections` is not given
IN_FLIGHT = 32  # publishes awaiting PUBACK per multiplexed connection (one for a single device)
QUEUE_SIZE = 10_000  # messages waiting per connection; beyond it the scheduler waits
SUBSCRIBE_CHUNK = 500  # command topics per SUBSCRIBE packet
RECONNECT_FIRST_DELAY = 0.2
RECONNECT_MAX_DELAY = 5.0
PROGRESS_INTERVAL = 0.5
STOP_GRACE = 10.0  # seconds a clean stop waits for queued messages to go out
YIELD_EVERY = 64  # readings taken between chances for the connections to run
EARLY = 0.002  # take readings due within this many seconds now rather than sleep for them


class SimulatorError(Exception):
    """Base of the simulator's errors."""


class BrokerUnavailableError(SimulatorError):
    """A connection could not reach the broker when the simulation started.

    `client_id` is the MQTT client id that failed: the device id when a connection carries one device.
    """

    def __init__(self, url: str, client_id: str, reason: str) -> None:
        super().__init__(f"cannot connect to the MQTT broker at {url} (client id {client_id}): {reason}")
        self.url = url
        self.client_id = client_id
        self.reason = reason


@dataclass(slots=True)
class SimulationSummary:
    """What a simulation did, so far or in total.

    Attributes:
        devices: how many devices ran.
        connections: how many MQTT connections carried them.
        seed: the seed used (drawn at random when none was given), to repeat the run.
        sent: telemetry messages the broker acknowledged (at QoS 0: handed to the socket).
        readings: readings in those messages (a batch carries several), malformed ones excluded.
        malformed: telemetry messages sent broken on purpose.
        sent_by_kind: every message the broker acknowledged, by kind: reading, late, out_of_order,
            burst, batch, malformed (telemetry); online, offline (status); ack, ack_error,
            ack_expired, ack_repeat (command acks).
        disconnects: simulated device disconnects.
        offline: devices in a simulated disconnect right now.
        dropped: readings lost by design: offline buffer full, or `replay: drop`.
        held: readings not sent when the run ended (still held back, or buffered offline).
        unsent: messages queued but not delivered when the run ended (the broker was unreachable).
        commands_received: messages that arrived on the devices' command topics.
        commands_acked: acks published (ok and error alike, repeats included).
        commands_rejected: acks with status error (unknown command, params not understood,
            expired, simulated failure).
        commands_expired: of those, commands that arrived after their `expires`.
        commands_repeated: commands whose id had been answered before (acked again, not re-run).
        commands_ignored: commands left unanswered by the fault `commands.ignore`.
        errors: commands that could not be decoded, plus connections lost mid-run.
        reconnects: connections re-established after a loss (not counting simulated disconnects).
        lag: the most seconds a reading was taken after its scheduled time.
        elapsed: seconds since the simulation started.
        last_seq: device id -> the highest seq the broker acknowledged (0: none yet).
    """

    devices: int = 0
    connections: int = 0
    seed: int | None = None
    sent: int = 0
    readings: int = 0
    malformed: int = 0
    sent_by_kind: dict[str, int] = field(default_factory=dict)
    disconnects: int = 0
    offline: int = 0
    dropped: int = 0
    held: int = 0
    unsent: int = 0
    commands_received: int = 0
    commands_acked: int = 0
    commands_rejected: int = 0
    commands_expired: int = 0
    commands_repeated: int = 0
    commands_ignored: int = 0
    errors: int = 0
    reconnects: int = 0
    lag: float = 0.0
    elapsed: float = 0.0
    last_seq: dict[str, int] = field(default_factory=dict)

    def copy(self) -> SimulationSummary:
        """Return a snapshot that later progress does not change."""
        return replace(self, last_seq=dict(self.last_seq), sent_by_kind=dict(self.sent_by_kind))

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready data."""
        return asdict(self)


ProgressCallback = Callable[[SimulationSummary], None]


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where and how to connect: from the URL, with credentials and TLS files."""

    url: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:  # never show the password
        return f"BrokerAddress({self.url!r}, user={self.username!r}, tls={self.tls is not None})"


def broker_address(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> BrokerAddress:
    """Check a broker URL (`mqtt://HOST[:PORT]`, or `mqtts://` for TLS) and the options that go with it.

    `username`/`password` override any in the URL. The TLS files need `mqtts://`: the broker's
    certificate is verified against `ca_file` (else the system's CAs); `cert_file` and `key_file`
    are a client certificate for brokers that require one.

    Raises:
        ValueError: the URL or the combination of options is not usable; the message says why.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", "mqtts"):
        raise ValueError(
            f"broker URL {_safe(url)!r}: expected mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS"
        )
    if not parts.hostname:
        raise ValueError(f"broker URL {_safe(url)!r} has no host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)
    except ValueError:
        raise ValueError(f"broker URL {_safe(url)!r} has an invalid port") from None
    if not tls and (ca_file or cert_file or key_file):
        raise ValueError(
            "TLS files are set but the broker URL is mqtt:// (plain TCP): use mqtts://HOST[:PORT]"
        )
    if key_file and not cert_file:
        raise ValueError("a client key needs its certificate (--cert)")
    for name, path in (("CA file", ca_file), ("certificate", cert_file), ("key", key_file)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {str(path)!r} is not a readable file")
    user = username if username is not None else (unquote(parts.username) if parts.username else None)
    secret = password if password is not None else (unquote(parts.password) if parts.password else None)
    context = _tls_context(ca_file, cert_file, key_file) if tls else None
    return BrokerAddress(_safe(url), parts.hostname, port, user, secret, context)


class _HandshakingContext(ssl.SSLContext):
    """A client context that shakes hands inside `wrap_socket`.

    paho shakes hands after `wrap_socket` returns, and a handshake that fails there (an unknown
    CA) leaves its socket unclosed; inside `wrap_socket`, `ssl` closes it on failure. paho's own
    `do_handshake` afterwards is a no-op on a finished handshake.
    """

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        """Wrap `sock` and shake hands now."""
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=True,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def _tls_context(
    ca_file: str | Path | None, cert_file: str | Path | None, key_file: str | Path | None
) -> ssl.SSLContext:
    """Verify the broker's certificate and host name (against `ca_file`, else the system's CAs)."""
    context = _HandshakingContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    try:
        if ca_file:
            context.load_verify_locations(cafile=str(ca_file))
        else:
            context.load_default_certs()
        if cert_file:
            context.load_cert_chain(
                str(cert_file), str(key_file) if key_file else None, password=_no_passphrase
            )
    except (ssl.SSLError, _EncryptedKeyError) as exc:
        what = "an encrypted key (give an unencrypted one)" if isinstance(exc, _EncryptedKeyError) else exc
        raise ValueError(f"cannot use the TLS files: {what}") from None
    return context


class _EncryptedKeyError(Exception):
    pass


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise _EncryptedKeyError


def _safe(url: str) -> str:
    """Return `url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()


def read_fleet_file(path: str | Path) -> Fleet:
    """Read and validate a fleet file.

    Raises:
        SourceFileError: the file cannot be read or has problems; all are listed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SourceFileError([Problem(str(path), None, None, "", f"cannot read: {reason}")]) from None
    return parse_fleet(text, str(path))


def device_ids(count: int, id_prefix: str = "sim") -> list[str]:
    """Return the ids `run_simulation(devices=count)` gives its devices: `{id_prefix}-0001` and so on.

    Raises:
        ValueError: `count` is below 1, or `id_prefix` makes invalid device ids.
    """
    return list(quick_fleet(count, 1.0, id_prefix).groups[0].ids)


class _Dropped(Exception):
    """A single-device connection was dropped on purpose: a simulated disconnect."""


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stop`; tell whether it was set."""
    if stop.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True


async def _connect(client: aiomqtt.Client) -> None:
    """Connect `client`; when cancelled meanwhile, finish the attempt and disconnect, then re-raise.

    aiomqtt connects in a worker thread; abandoning that would leave its socket and reader task behind.
    """
    attempt = asyncio.ensure_future(client.__aenter__())
    try:
        await asyncio.shield(attempt)
    except asyncio.CancelledError:
        with contextlib.suppress(aiomqtt.MqttError):
            await attempt
            await client.__aexit__(None, None, None)
        raise
    except aiomqtt.MqttError:
        # A refused CONNECT (bad password, TLS refused after the handshake) leaves paho's socket
        # open; `_sock_close` is paho's own way to close it and unregister it from the loop.
        client._client._sock_close()
        raise


def _code_value(code: int | ReasonCode) -> int:
    return code.value if isinstance(code, ReasonCode) else code


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class _Simulation:
    """The devices, their connections, the scheduler and the summary of one run."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        broker: BrokerAddress,
        seed: int,
        qos: int,
        connections: int | None,
        connection_per_device: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.broker = broker
        self.qos = qos
        self.loop0 = loop.time()
        self.epoch0 = time.time()
        self.devices = [
            SimulatedDevice(device_id, group.spec, seed=seed, start=self.epoch0)
            for device_id, group in fleet.devices()
        ]
        ids = [device.device_id for device in self.devices]
        self.summary = SimulationSummary(devices=len(ids), seed=seed, last_seq=dict.fromkeys(ids, 0))
        self.stop_scheduler = asyncio.Event()
        count = len(self.devices) if connection_per_device else connections
        if count is None:
            count = math.ceil(len(self.devices) / DEVICES_PER_CONNECTION)
        count = max(1, min(count, len(self.devices)))
        # Contiguous blocks of devices per connection, so the split depends only on the counts.
        self.connections = [
            _Connection(self, self.devices[i * len(ids) // count : (i + 1) * len(ids) // count])
            for i in range(count)
        ]
        self.connection_of = {
            device.device_id: connection for connection in self.connections for device in connection.devices
        }
        self.summary.connections = count

    def begin(self) -> None:
        """Start the clock: t = 0 for every device is now."""
        self.loop0 = asyncio.get_running_loop().time()
        self.epoch0 = time.time()
        for device in self.devices:
            device.begin(self.epoch0)

    def now(self) -> float:
        """Epoch seconds on the loop's monotonic clock, so readings never go back in time."""
        return self.epoch0 + (asyncio.get_running_loop().time() - self.loop0)

    def count_sent(self, message: Outgoing) -> None:
        """Record a message the broker acknowledged."""
        summary = self.summary
        kinds = summary.sent_by_kind
        kinds[message.kind] = kinds.get(message.kind, 0) + 1
        channel = message.channel
        if channel == "telemetry":
            summary.sent += 1
            if message.kind == "malformed":
                summary.malformed += 1
            else:
                summary.readings += len(message.seqs)
            highest = max(message.seqs)
            last = summary.last_seq
            if highest > last[message.device_id]:
                last[message.device_id] = highest
        elif channel == "ack":
            summary.commands_acked += 1
            kind = message.kind
            if kind == "ack_repeat":
                summary.commands_repeated += 1
            elif kind != "ack":
                summary.commands_rejected += 1
                if kind == "ack_expired":
                    summary.commands_expired += 1

    def refresh(self) -> SimulationSummary:
        """Bring the totals kept by the devices into the summary and return a snapshot."""
        summary = self.summary
        summary.elapsed = asyncio.get_running_loop().time() - self.loop0
        summary.disconnects = sum(device.disconnects for device in self.devices)
        summary.offline = sum(not device.online for device in self.devices)
        summary.dropped = sum(device.dropped for device in self.devices)
        summary.commands_ignored = sum(device.ignored for device in self.devices)
        summary.held = sum(device.held for device in self.devices)
        return summary.copy()

    async def schedule(self) -> None:
        """Take every device's readings when due and queue what they send, until `stop_scheduler`."""
        devices = self.devices
        heap = [(device.next_due, i) for i, device in enumerate(devices)]
        heapq.heapify(heap)
        stop = self.stop_scheduler
        summary = self.summary
        taken = 0
        while not stop.is_set():
            due, index = heap[0]
            now = self.now()
            if due > now + EARLY:
                await _stopped_within(stop, min(due - now, PROGRESS_INTERVAL))
                continue
            device = devices[index]
            messages = device.step(due)
            lag = now - due
            if lag > summary.lag:
                summary.lag = lag
            if lag > device.interval:
                device.reschedule(now)
            heapq.heapreplace(heap, (device.next_due, index))
            if messages:
                connection = self.connection_of[device.device_id]
                try:
                    await connection.put(messages)
                except asyncio.CancelledError:
                    summary.unsent += len(messages) - connection.accepted
                    raise
            taken += 1
            if taken % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a put that does not block never yields: let the publishers run


class _Connection:
    """One MQTT connection carrying telemetry, status, commands and acks for one or more devices."""

    def __init__(self, simulation: _Simulation, devices: Sequence[SimulatedDevice]) -> None:
        self.sim = simulation
        self.devices = list(devices)
        self.single = len(self.devices) == 1
        first, last = self.devices[0].device_id, self.devices[-1].device_id
        self.client_id = first if self.single else f"{first}..{last}"
        self.by_command_topic = {COMMAND_TOPIC.format(d.device_id): d for d in self.devices}
        self.queue: asyncio.Queue[Outgoing] = asyncio.Queue(QUEUE_SIZE)
        self.retry: list[tuple[int, Outgoing]] = []  # (order, message): in flight when the link dropped
        self.order = 0
        self.ready = asyncio.Event()  # set once the first session has subscribed and published births
        self.closing = asyncio.Event()  # set when the run ends: send what is queued, then disconnect
        self.attention = asyncio.Event()  # set by `closing` and by a simulated drop
        self.resume = asyncio.Event()  # set when the device of a dropped single connection is back
        self.drop_requested = False
        self.was_dropped = False
        self.accepted = 0
        self.workers = 1 if self.single else IN_FLIGHT

    async def put(self, messages: list[Outgoing]) -> None:
        """Queue messages to publish, waiting while the queue is full; `accepted` counts them."""
        self.accepted = 0
        for message in messages:
            self.accepted += 1
            if self.single and message.channel == "status" and message.kind == "online":
                # One device, one connection: its disconnects are real ones (see `_publish_loop`), and
                # the birth is published on reconnecting.
                self.resume.set()
                continue
            try:
                self.queue.put_nowait(message)
            except asyncio.QueueFull:
                await self.queue.put(message)

    def close(self) -> None:
        """Ask the connection to send what it has queued, say goodbye for its devices, and disconnect."""
        self.closing.set()
        self.attention.set()

    def _client(self) -> aiomqtt.Client:
        broker = self.sim.broker
        will = None
        if self.single:
            # MQTT has one last will per connection: it can speak for the device only when alone.
            device = self.devices[0]
            offline = device.goodbye(self.sim.now())
            will = aiomqtt.Will(STATUS_TOPIC.format(device.device_id), offline.payload, qos=1, retain=True)
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=self.client_id,
            clean_session=False,
            will=will,
            username=broker.username,
            password=broker.password,
            tls_context=broker.tls,
            max_inflight_messages=self.workers,
        )
        client.pending_calls_threshold = self.workers + 16  # aiomqtt warns above it; ours are by design
        return client

    async def run(self) -> None:
        """Connect, serve until closed, disconnect; reconnect with backoff when the link drops."""
        sim = self.sim
        delay = RECONNECT_FIRST_DELAY
        connected_before = False
        give_up_at: float | None = None
        while True:
            if self.drop_requested:  # a simulated disconnect: stay away until the device is back
                while not self.resume.is_set() and not self.closing.is_set():
                    await _stopped_within(self.attention, PROGRESS_INTERVAL)
                self.drop_requested = False
                if self.closing.is_set() and self._idle():
                    return  # the device is offline and its will said so
            if self.closing.is_set():
                give_up_at = give_up_at or asyncio.get_running_loop().time() + STOP_GRACE
                if asyncio.get_running_loop().time() >= give_up_at:
                    self._abandon()
                    return
            client = self._client()
            try:
                await _connect(client)
            except aiomqtt.MqttError as exc:
                if not connected_before:
                    raise BrokerUnavailableError(sim.broker.url, self.client_id, str(exc)) from exc
                log.debug("connection %s: reconnect failed: %s", self.client_id, exc)
            else:
                if connected_before and not self.was_dropped:
                    sim.summary.reconnects += 1
                    log.info("connection %s: reconnected", self.client_id)
                self.was_dropped = False
                connected_before = True
                delay = RECONNECT_FIRST_DELAY
                try:
                    if await self._serve(client):
                        return
                except aiomqtt.MqttError as exc:
                    sim.summary.errors += 1
                    log.warning(
                        "connection %s lost: %s; reconnecting",
                        self.client_id,
                        exc,
                        extra={"client_id": self.client_id},
                    )
                except _Dropped:
                    self.was_dropped = True
                    continue
                finally:
                    with contextlib.suppress(aiomqtt.MqttError):  # already gone when the link dropped
                        await client.__aexit__(None, None, None)
            if give_up_at is None:
                await _stopped_within(self.closing, delay)  # a close wakes it: one more try at once
            else:
                await asyncio.sleep(max(0.0, min(delay, give_up_at - asyncio.get_running_loop().time())))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    def _idle(self) -> bool:
        return self.queue.empty() and not self.retry

    def _abandon(self) -> None:
        unsent = len(self.retry) + self.queue.qsize()
        if unsent:
            self.sim.summary.unsent += unsent
            log.warning(
                "connection %s: %d messages not sent: the broker is unreachable", self.client_id, unsent
            )
        self.retry.clear()
        while not self.queue.empty():
            self.queue.get_nowait()
            self.queue.task_done()

    async def _serve(self, client: aiomqtt.Client) -> bool:
        """Serve one connected session; return True once closed cleanly."""
        qos = self.sim.qos
        topics = list(self.by_command_topic)
        for i in range(0, len(topics), SUBSCRIBE_CHUNK):
            codes = await client.subscribe([(topic, qos) for topic in topics[i : i + SUBSCRIBE_CHUNK]])
            refused = [code for code in codes if _code_value(code) >= 0x80]  # 0x80+: failure (3.1.1 and 5)
            if refused:
                raise SimulatorError(
                    f"broker refused the command subscription of {self.client_id}: {refused}"
                )
        now = self.sim.now()
        for device in self.devices:
            if device.online:
                birth = device.birth(now)
                await client.publish(STATUS_TOPIC.format(device.device_id), birth.payload, qos=1, retain=True)
                self.sim.count_sent(birth)
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as group:
                commands = group.create_task(self._answer_commands(client), name=f"commands:{self.client_id}")
                workers = [
                    group.create_task(self._publish_loop(client), name=f"publish:{self.client_id}")
                    for _ in range(self.workers)
                ]
                while not self.closing.is_set():
                    await self.attention.wait()
                    self.attention.clear()
                    if self.drop_requested:
                        raise _Dropped
                await self._drain()
                for task in (commands, *workers):
                    task.cancel()
            # A clean stop says so itself: the broker drops the will on a normal DISCONNECT.
            now = self.sim.now()
            for device in self.devices:
                if device.online:
                    goodbye = device.goodbye(now)
                    await client.publish(
                        STATUS_TOPIC.format(device.device_id), goodbye.payload, qos=1, retain=True
                    )
                    self.sim.count_sent(goodbye)
            return True
        except* aiomqtt.MqttError as lost:
            error = _first_leaf(lost)  # the reconnect loop handles a plain MqttError
            raise error from error.__cause__
        except* _Dropped:
            self._abort(client)
            raise _Dropped from None

    async def _drain(self) -> None:
        """Wait until every queued message is published, for at most `STOP_GRACE` seconds."""
        try:
            async with asyncio.timeout(STOP_GRACE):
                await self.queue.join()
        except TimeoutError:
            self._abandon()

    def _abort(self, client: aiomqtt.Client) -> None:
        """Close the socket without a DISCONNECT, as a device losing its network does: the will goes out."""
        # aiomqtt has no public way to do this; `_client` is its paho client, whose socket() is public.
        sock = client._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        """Publish queued messages one at a time; several of these run per connection (in flight)."""
        sim = self.sim
        queue = self.queue
        qos = sim.qos
        while True:
            if self.retry:
                order, message = self.retry.pop(0)
            else:
                message = await queue.get()
                self.order += 1
                order = self.order
            single_offline = self.single and message.channel == "status" and message.kind == "offline"
            if single_offline and not self.closing.is_set():
                # A simulated disconnect of a device with its own connection: drop it for real. (While
                # closing, the offline status is published instead, as a clean stop would.)
                queue.task_done()
                self.resume.clear()
                self.drop_requested = True
                self.attention.set()
                return
            topic = _topic(message)
            try:
                await client.publish(
                    topic, message.payload, qos=1 if message.channel == "status" else qos,
                    retain=message.retain, timeout=math.inf,
                )  # fmt: skip
            except BaseException:
                # In flight when the link dropped (or the session ended): send it again after reconnecting.
                self.retry.append((order, message))
                self.retry.sort(key=lambda item: item[0])
                raise
            queue.task_done()
            sim.count_sent(message)

    async def _answer_commands(self, client: aiomqtt.Client) -> None:
        """Answer each command that arrives for this connection's devices (see SimulatedDevice.handle)."""
        sim = self.sim
        summary = sim.summary
        async for message in client.messages:
            device = self.by_command_topic.get(message.topic.value)
            if device is None:  # a subscription left in this client id's session by an earlier run
                continue
            summary.commands_received += 1
            device_id = device.device_id
            payload = message.payload
            try:
                if not isinstance(payload, bytes | bytearray):
                    raise PayloadError(f"payload is {type(payload).__name__}, not bytes", device_id=device_id)
                command = Command.decode(device_id, bytes(payload))
            except PayloadError as exc:
                summary.errors += 1
                log.warning(
                    "device %s: cannot read command: %s",
                    device_id,
                    exc.reason,
                    extra={"device_id": device_id},
                )
                continue
            for ack in device.handle(command, sim.now()):
                await client.publish(ACK_TOPIC.format(device_id), ack.payload, qos=sim.qos, timeout=math.inf)
                sim.count_sent(ack)
                log.debug("device %s: command %s %s -> %s", device_id, command.id, command.name, ack.kind)


def _topic(message: Outgoing) -> str:
    if message.channel == "telemetry":
        return TELEMETRY_TOPIC.format(message.device_id)
    if message.channel == "status":
        return STATUS_TOPIC.format(message.device_id)
    return ACK_TOPIC.format(message.device_id)


async def _wait_for_end(duration: float | None, stop: asyncio.Event | None) -> None:
    deadline = asyncio.timeout(duration)
    try:
        async with deadline:
            if stop is None:
                await asyncio.get_running_loop().create_future()  # only the deadline or a cancel ends this
            else:
                await stop.wait()
    except TimeoutError:
        if not deadline.expired():
            raise


async def _report_progress(simulation: _Simulation, on_progress: ProgressCallback) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        on_progress(simulation.refresh())


async def run_simulation(
    broker_url: str,
    *,
    devices: int | None = None,
    rate: float | None = None,
    fleet: Fleet | None = None,
    duration: float | None = None,
    seed: int | None = None,
    id_prefix: str = "sim",
    qos: int = 1,
    connections: int | None = None,
    connection_per_device: bool = False,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    stop: asyncio.Event | None = None,
) -> SimulationSummary:
    """Run a fleet (or `devices` quick-form greenhouses at `rate`) against a broker; return what it did.

    Args:
        broker_url: `mqtt://[user:password@]HOST[:PORT]`, or `mqtts://` for TLS.
        devices: quick form: how many devices; ids are `{id_prefix}-0001`, ... (see `quick_fleet`).
        rate: quick form: telemetry messages per second per device (intervals jittered by ±10 %).
        fleet: a parsed fleet file, instead of `devices` and `rate`.
        duration: seconds to run; None runs until `stop` is set or the task is cancelled.
        seed: makes the run reproducible; None takes the fleet file's, else draws one (reported).
        qos: for telemetry, the command subscription and acks (status is always QoS 1).
        connections: MQTT connections to spread the devices over (default one per 500 devices).
        connection_per_device: one connection per device, each with its own last will.
        username, password: override those in the URL.
        ca_file, cert_file, key_file: TLS files (with `mqtts://`).
        on_progress: called with a snapshot every 0.5 s and once at the end.
        stop: set it to end the run early and still get the summary (cancelling also disconnects
            cleanly, but raises CancelledError instead of returning).

    Raises:
        BrokerUnavailableError: a connection could not connect when the simulation started.
        SimulatorError: the broker refused a command subscription.
        ValueError: an argument is out of range, or the URL or TLS options are not usable.
    """
    if fleet is None:
        if devices is None or rate is None:
            raise ValueError("give either a fleet or both devices and rate")
        fleet = quick_fleet(devices, rate, id_prefix)
    elif devices is not None or rate is not None:
        raise ValueError("give either a fleet or devices and rate, not both")
    if duration is not None and duration < 0:
        raise ValueError(f"duration must not be negative, got {duration}")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    if connections is not None and connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections}")
    broker = broker_address(
        broker_url,
        username=username,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )
    if seed is None:
        seed = fleet.seed if fleet.seed is not None else random.SystemRandom().randrange(2**32)
    simulation = _Simulation(
        fleet,
        broker=broker,
        seed=seed,
        qos=qos,
        connections=connections,
        connection_per_device=connection_per_device,
    )
    summary = simulation.summary
    log.info(
        "simulating %d devices over %d connections against %s (seed %d)",
        summary.devices,
        summary.connections,
        broker.url,
        seed,
    )
    try:
        async with asyncio.TaskGroup() as group:
            for connection in simulation.connections:
                group.create_task(connection.run(), name=f"connection:{connection.client_id}")
            # Readings start once every device is connected and has published its birth.
            while not all(connection.ready.is_set() for connection in simulation.connections):
                if stop is not None and stop.is_set():
                    break
                await asyncio.sleep(0.05)
            simulation.begin()
            scheduler = group.create_task(simulation.schedule(), name="scheduler")
            reporter = None
            if on_progress is not None:
                reporter = group.create_task(_report_progress(simulation, on_progress), name="progress")
            await _wait_for_end(duration, stop)
            simulation.stop_scheduler.set()
            # The scheduler may be waiting on a full queue of a connection that is down: give it a moment.
            await asyncio.wait({scheduler}, timeout=1.0)
            scheduler.cancel()
            for connection in simulation.connections:
                connection.close()  # each sends what it has queued, says goodbye, then disconnects
            if reporter is not None:
                reporter.cancel()
    except* SimulatorError as failed:
        error = _first_leaf(failed)  # one clear error, not a group of the same one per connection
        raise error from error.__cause__
    final = simulation.refresh()
    if on_progress is not None:
        on_progress(final)
    log.info("simulation done: %s", {k: v for k, v in final.as_dict().items() if k != "last_seq"})
    return final
