"""Run simulated devices against an MQTT broker: telemetry out, commands in, acks out.

Wire protocol, per device (QoS 1; the `qos` argument can change it for tests):

    devices/{device_id}/telemetry       device -> gateway (decoded by devices/payload.py)
        {"ts": <epoch seconds float>, "seq": <int, starting at 1 and +1 per message>,
         "<metric>": <number|bool|string>, ...}
        the simulator's metrics: "temperature" (°C), "humidity" (%RH), "fan" (bool); see simulator.model
    devices/{device_id}/commands        gateway -> device (devices/command.py `Command`)
        {"id", "name", "params", "ts"}, e.g. {"id": "9f2c", "name": "fan", "params": {"on": true}, "ts": 1.7e9}
    devices/{device_id}/commands/ack    device -> gateway (devices/command.py `CommandAck`)
        {"id", "status": "ok"|"error", "detail"?}, "id" being the command's.
        Unknown command names are acked with status "error" and a detail.
    devices/{device_id}/status          device -> gateway, QoS 1, retained (devices/status.py)
        {"status": "online", "ts": ...} right after each connect (birth); {"status": "offline", "ts": ...}
        as the last will, and published before a clean disconnect.

Each device has its own MQTT connection whose client id is the device id, with a persistent session
(clean_session=False), so commands sent while it is briefly away are delivered when it is back.
Delivery is at least once: a reading whose PUBACK had not arrived when the connection dropped is
sent again, with the same seq, after reconnecting; a subscriber sees duplicates, never gaps.

The work is split so that one connection can later carry many devices: `_Connection` runs one MQTT
client for a list of devices, routes commands by topic and publishes from one schedule (a heap of
due times), so multiplexing thousands of devices over a few connections only changes how
`run_simulation` groups them.

    SimulatorError                 the simulation could not run as asked
     └── BrokerUnavailableError    a connection failed at start; `url`, `client_id`, `reason`
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from devices.command import Command
from devices.errors import PayloadError
from devices.status import encode_status
from devices.topic import TopicScheme, is_valid_device_id
from simulator.model import SimulatedDevice

log = logging.getLogger(__name__)

TELEMETRY_TOPIC = TopicScheme("devices/{device_id}/telemetry")
COMMAND_TOPIC = TopicScheme("devices/{device_id}/commands")
ACK_TOPIC = TopicScheme("devices/{device_id}/commands/ack")
STATUS_TOPIC = TopicScheme("devices/{device_id}/status")
DEFAULT_PORT = 1883
JITTER = 0.1  # each interval is 1/rate ± 10 %, so devices started together drift apart
RECONNECT_FIRST_DELAY = 0.2
RECONNECT_MAX_DELAY = 5.0
PROGRESS_INTERVAL = 0.5


class SimulatorError(Exception):
    """Base of the simulator's errors."""


class BrokerUnavailableError(SimulatorError):
    """A device connection could not reach the broker when the simulation started.

    `client_id` is the MQTT client id that failed; while each device has its own connection, it is
    the device id.
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
        sent: telemetry messages the broker acknowledged (at QoS 0: handed to the socket).
        commands_received: messages that arrived on the devices' command topics.
        commands_acked: acks published, "ok" and "error" alike.
        commands_rejected: of those, acks with status "error" (unknown command, bad params).
        errors: commands that could not be decoded, plus connections lost mid-run.
        reconnects: connections re-established after a loss.
        elapsed: seconds since the simulation started.
        last_seq: device id -> seq of its last acknowledged telemetry message (0: none yet).
    """

    devices: int = 0
    sent: int = 0
    commands_received: int = 0
    commands_acked: int = 0
    commands_rejected: int = 0
    errors: int = 0
    reconnects: int = 0
    elapsed: float = 0.0
    last_seq: dict[str, int] = field(default_factory=dict)

    def copy(self) -> SimulationSummary:
        """Return a snapshot that later progress does not change."""
        return replace(self, last_seq=dict(self.last_seq))

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready data."""
        return asdict(self)


ProgressCallback = Callable[[SimulationSummary], None]


@dataclass(frozen=True, slots=True)
class _BrokerAddress:
    url: str
    host: str
    port: int
    username: str | None
    password: str | None


def _parse_broker_url(url: str) -> _BrokerAddress:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"broker URL {url!r}: expected mqtt://HOST[:PORT] (no TLS or websockets here)")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    return _BrokerAddress(url, parts.hostname, port, parts.username, parts.password)


class _DeviceLink:
    """One simulated device as its connection sees it: topics, model, and a reading awaiting PUBACK."""

    __slots__ = ("ack_topic", "command_topic", "device", "pending", "status_topic", "telemetry_topic")

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
        self.telemetry_topic = TELEMETRY_TOPIC.format(device.device_id)
        self.command_topic = COMMAND_TOPIC.format(device.device_id)
        self.ack_topic = ACK_TOPIC.format(device.device_id)
        self.status_topic = STATUS_TOPIC.format(device.device_id)
        self.pending: bytes | None = None


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


class _Connection:
    """One MQTT connection carrying telemetry, commands and acks for one or more simulated devices."""

    def __init__(
        self,
        client_id: str,
        links: Sequence[_DeviceLink],
        *,
        broker: _BrokerAddress,
        interval: float,
        qos: int,
        rng: random.Random,
        summary: SimulationSummary,
        stop: asyncio.Event,
    ) -> None:
        self.client_id = client_id
        self._links = list(links)
        self._by_command_topic = {link.command_topic: link for link in self._links}
        self._broker = broker
        self._interval = interval
        self._qos = qos
        self._rng = rng
        self._summary = summary
        self._stop = stop
        # (due time on the loop clock, index into _links); spread the first readings over one interval
        now = asyncio.get_running_loop().time()
        self._schedule = [(now + rng.uniform(0.0, interval), i) for i in range(len(self._links))]
        heapq.heapify(self._schedule)

    async def run(self) -> None:
        """Connect, serve until the stop event, disconnect; reconnect with backoff when the link drops."""
        delay = RECONNECT_FIRST_DELAY
        connected_before = False
        while not self._stop.is_set():
            # The incoming queue stays unbounded: when full aiomqtt drops messages, and commands are few.
            # MQTT has one last will per connection: it speaks for a device only while the connection
            # carries one; a multiplexed connection would need a status topic of its own.
            will = (
                aiomqtt.Will(
                    self._links[0].status_topic, encode_status("offline", time.time()), qos=1, retain=True
                )
                if len(self._links) == 1
                else None
            )
            client = aiomqtt.Client(
                self._broker.host,
                self._broker.port,
                identifier=self.client_id,
                clean_session=False,
                will=will,
                username=self._broker.username,
                password=self._broker.password,
            )
            try:
                await _connect(client)
            except aiomqtt.MqttError as exc:
                if not connected_before:
                    raise BrokerUnavailableError(self._broker.url, self.client_id, str(exc)) from exc
                log.debug("connection %s: reconnect failed: %s", self.client_id, exc)
            else:
                if connected_before:
                    self._summary.reconnects += 1
                    log.info("connection %s: reconnected", self.client_id)
                connected_before = True
                delay = RECONNECT_FIRST_DELAY
                try:
                    await self._serve(client)
                    return
                except aiomqtt.MqttError as exc:
                    self._summary.errors += 1
                    log.warning(
                        "connection %s lost: %s; reconnecting",
                        self.client_id,
                        exc,
                        extra={"client_id": self.client_id},
                    )
                finally:
                    with contextlib.suppress(aiomqtt.MqttError):  # already gone when the link dropped
                        await client.__aexit__(None, None, None)
            if await _stopped_within(self._stop, delay):
                return
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def _serve(self, client: aiomqtt.Client) -> None:
        reason_codes = await client.subscribe([(link.command_topic, self._qos) for link in self._links])
        refused = [code for code in reason_codes if _code_value(code) >= 0x80]  # 0x80+: failure (3.1.1 and 5)
        if refused:
            raise SimulatorError(f"broker refused the command subscription of {self.client_id}: {refused}")
        for link in self._links:
            await client.publish(link.status_topic, encode_status("online", time.time()), qos=1, retain=True)
        try:
            async with asyncio.TaskGroup() as group:
                commands = group.create_task(self._answer_commands(client), name=f"commands:{self.client_id}")
                await self._publish_telemetry(client)
                commands.cancel()
                # A clean stop says so itself: the broker drops the will on a normal DISCONNECT.
                for link in self._links:
                    await client.publish(
                        link.status_topic, encode_status("offline", time.time()), qos=1, retain=True
                    )
        except* aiomqtt.MqttError as lost:
            error = _first_leaf(lost)  # the reconnect loop handles a plain MqttError
            raise error from error.__cause__

    async def _publish_telemetry(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        summary = self._summary
        schedule = self._schedule
        while True:
            due, index = schedule[0]
            delay = due - loop.time()
            stopped = await _stopped_within(self._stop, delay) if delay > 0 else self._stop.is_set()
            if stopped:
                return
            link = self._links[index]
            if link.pending is None:
                reading = link.device.reading(time.time())
                link.pending = json.dumps(reading, separators=(",", ":")).encode()
            await client.publish(link.telemetry_topic, link.pending, qos=self._qos)
            link.pending = None
            summary.sent += 1
            summary.last_seq[link.device.device_id] = link.device.seq
            # After a stall (broker paused, reconnect) send once now rather than a burst of catch-ups.
            next_due = max(due + self._interval * self._rng.uniform(1.0 - JITTER, 1.0 + JITTER), loop.time())
            heapq.heapreplace(schedule, (next_due, index))

    async def _answer_commands(self, client: aiomqtt.Client) -> None:
        summary = self._summary
        async for message in client.messages:
            link = self._by_command_topic.get(message.topic.value)
            if link is None:  # a subscription left in this client id's session by an earlier run
                continue
            summary.commands_received += 1
            device_id = link.device.device_id
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
            ack = link.device.handle(command, time.time())
            await client.publish(link.ack_topic, ack.encode(), qos=self._qos)
            summary.commands_acked += 1
            if ack.status != "ok":
                summary.commands_rejected += 1
            log.debug("device %s: command %s %s -> %s", device_id, command.id, command.name, ack.status)


def _code_value(code: int | ReasonCode) -> int:
    return code.value if isinstance(code, ReasonCode) else code


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _report_progress(summary: SimulationSummary, on_progress: ProgressCallback, started: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        summary.elapsed = loop.time() - started
        on_progress(summary.copy())


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


def device_ids(count: int, id_prefix: str = "sim") -> list[str]:
    """Return the ids `run_simulation` gives its devices: `{id_prefix}-0001` and so on."""
    width = max(4, len(str(count)))
    ids = [f"{id_prefix}-{n:0{width}d}" for n in range(1, count + 1)]
    if ids and not is_valid_device_id(ids[-1]):
        raise ValueError(f"id_prefix {id_prefix!r} does not make valid device ids (e.g. {ids[-1]!r})")
    return ids


async def run_simulation(
    broker_url: str,
    *,
    devices: int,
    rate: float,
    duration: float | None,
    seed: int | None,
    id_prefix: str = "sim",
    qos: int = 1,
    on_progress: ProgressCallback | None = None,
    stop: asyncio.Event | None = None,
) -> SimulationSummary:
    """Run `devices` simulated devices, each on its own MQTT connection, and return what they did.

    Args:
        broker_url: `mqtt://[user:password@]HOST[:PORT]`.
        devices: how many devices; ids are `{id_prefix}-0001`, `{id_prefix}-0002`, ...
        rate: telemetry messages per second per device (each interval jittered by ±10 %).
        duration: seconds to run; None runs until `stop` is set or the task is cancelled.
        seed: makes the devices' readings reproducible; None draws a fresh seed.
        qos: for telemetry, the command subscription and acks.
        on_progress: called with a snapshot every 0.5 s and once at the end.
        stop: set it to end the run early and still get the summary (cancelling also stops every
            device cleanly, but raises CancelledError instead of returning).

    Raises:
        BrokerUnavailableError: a device could not connect when the simulation started.
        SimulatorError: the broker refused a device's command subscription.
        ValueError: an argument is out of range or the URL is not `mqtt://`.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if duration is not None and duration < 0:
        raise ValueError(f"duration must not be negative, got {duration}")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    broker = _parse_broker_url(broker_url)
    ids = device_ids(devices, id_prefix)
    master = random.Random(seed)
    summary = SimulationSummary(devices=devices, last_seq=dict.fromkeys(ids, 0))
    finished = asyncio.Event()
    connections = [
        _Connection(
            device_id,
            [_DeviceLink(SimulatedDevice(device_id, random.Random(master.getrandbits(64))))],
            broker=broker,
            interval=1.0 / rate,
            qos=qos,
            rng=random.Random(master.getrandbits(64)),
            summary=summary,
            stop=finished,
        )
        for device_id in ids
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    log.info("simulating %d devices at %.3g msg/s each against %s", devices, rate, broker.url)
    try:
        async with asyncio.TaskGroup() as group:
            for connection in connections:
                group.create_task(connection.run(), name=f"device:{connection.client_id}")
            reporter = None
            if on_progress is not None:
                reporter = group.create_task(_report_progress(summary, on_progress, started), name="progress")
            await _wait_for_end(duration, stop)
            finished.set()  # devices finish the message in hand, then disconnect
            if reporter is not None:
                reporter.cancel()
    except* SimulatorError as failed:
        error = _first_leaf(failed)  # one clear error, not a group of the same one per device
        raise error from error.__cause__
    finally:
        summary.elapsed = loop.time() - started
    if on_progress is not None:
        on_progress(summary.copy())
    log.info("simulation done: %s", summary)
    return summary
