"""Telemetry ingest: the per-message hot path from an MQTT message to rules, store and commands.

A message is acknowledged to the broker only after every point it produced is written (the batch
writer calls back in order). A payload that cannot be accepted is counted, logged with its reason,
published (truncated) to the dead-letter topic, and acknowledged in order so it is not redelivered
forever.

Device checks cost one dict lookup per message: a registered device's events are checked against
its type; an unregistered one meets the unknown-device policy (accept, reject or quarantine).
Status messages (`devices/{id}/status`, birth and last will) go through `on_status`.

The payload format is the message's MQTT 5 content type when it has one (`application/json`,
`application/senml+json`; any other is rejected), else its device type's `format` (JSON for devices
not in the registry). The decoder per device is looked up once, at start, into a dict.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from devices.dedupe import SeqGap, SeqTracker
from devices.errors import PayloadError
from devices.event import TelemetryEvent
from devices.payload import PayloadDecoder, PayloadFormat, TelemetryDecoder, content_type_format
from devices.registry import DeviceRegistry, UnknownDevicePolicy
from devices.senml import SenmlDecoder
from devices.status import DeviceTracker, decode_status
from devices.topic import TopicScheme, is_valid_device_id
from gateway.commands import CommandDispatcher
from gateway.deadletter import DeadLetterFile
from gateway.records import alert_point, device_status_point, quarantine_point, seq_gap_point, telemetry_point
from gateway.store.base import Point
from gateway.store.batcher import HandOff
from rules.action import Action, RecordAlert, SendCommand
from rules.engine import RuleEngine

log = logging.getLogger(__name__)
T = TypeVar("T")


# Topic strings whose device id is known good (see `TelemetryIngest._device_of`); emptied when full,
# so a flood of distinct topics costs the check again, never unbounded memory.
TOPIC_CACHE_SIZE: Final = 100_000


class Message(Protocol):
    """The parts of an MQTT message ingest needs (`gateway.mqttcodec.Publish` has them)."""

    @property
    def topic(self) -> str: ...

    @property
    def content_type(self) -> str | None:
        """The MQTT 5 Content Type; None when absent (always on MQTT 3.1.1)."""
        ...

    payload: bytes
    mid: int
    qos: int


class Acknowledger(Protocol):
    """The MQTT side ingest needs: acks, a connection generation, and backpressure."""

    generation: int

    def ack(self, mid: int, qos: int, generation: int) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...


class PointSink(Protocol):
    """The batch writer, as ingest sees it."""

    @property
    def is_full(self) -> bool: ...

    def add(self, points: list[Point], on_written: Callable[[], None] | None = None) -> None: ...

    def add_grouped(self, points: list[Point], on_written: Callable[[list[T]], None], item: T) -> None: ...

    async def wait_until_not_full(self) -> None: ...


@dataclass(slots=True)
class IngestStats:
    """Message and event counts since start."""

    received: int = 0  # telemetry messages delivered by the broker
    written: int = 0  # messages whose points are all in the store (and were acked)
    rejected: int = 0  # messages refused with a reason (dead-lettered)
    events: int = 0  # telemetry events decoded
    events_written: int = 0
    alerts_raised: int = 0
    alerts_cleared: int = 0
    duplicates: int = 0  # events seen before (same device and seq): stored again, not re-evaluated
    dead_letter_failures: int = 0
    backpressure_pauses: int = 0
    quarantined: int = 0  # messages from unregistered devices stored apart (policy quarantine)
    status_changes: int = 0  # device online/offline changes recorded
    # Each telemetry message ends in exactly one of: rejected, or (once handed off and acked, which
    # `written` counts) messages_stored, messages_spooled or messages_dead_lettered; until then it is
    # in_flight. So received = messages_stored + messages_spooled + messages_dead_lettered + rejected
    # + in_flight at every moment (redeliveries count again each time).
    messages_stored: int = 0  # every point written to the store
    messages_spooled: int = 0  # some points in the spool (the store was failing), none refused
    messages_dead_lettered: int = 0  # the store refused some points (dead-letter file); the rest stored
    in_flight: int = 0  # received, not yet handed off: not acked, the broker will redeliver them
    seq_gaps: int = 0  # runs of seqs a device skipped (see devices/dedupe.py)
    seq_missing: int = 0  # seqs in those runs
    seq_late: int = 0  # seqs reported missing that arrived afterwards, out of order
    seq_gaps_unverified: int = 0  # jumps right after a crash restart: the crashed run may have stored them


class TelemetryIngest:
    """Turn telemetry messages into stored points, alerts and commands."""

    def __init__(
        self,
        *,
        topics: TopicScheme,
        decoder: PayloadDecoder,
        engine: RuleEngine,
        sink: PointSink,
        commands: CommandDispatcher,
        mqtt: Acknowledger,
        dead_letter_topic: str,
        dead_letter_max_bytes: int,
        clock: Callable[[], float],
        dead_letter_file: DeadLetterFile | None = None,
        registry: DeviceRegistry | None = None,
        unknown_devices: UnknownDevicePolicy = "accept",
        status_topics: TopicScheme | None = None,
        hand_off: Callable[[], HandOff] | None = None,
    ) -> None:
        self._topics = topics
        self._decoder = decoder
        self._engine = engine
        self._sink = sink
        self._commands = commands
        self._mqtt = mqtt
        self._dead_letter_topic = dead_letter_topic
        self._dead_letter_max_bytes = dead_letter_max_bytes
        self._dead_letter_file = dead_letter_file
        self._clock = clock
        self._paused = asyncio.Event()
        self.stats = IngestStats()
        self._seqs = SeqTracker()
        # How the points of the message being acked were handed off (BatchWriter.current_hand_off);
        # without it every message counts as stored.
        self._hand_off_of = hand_off
        # The last event of up to `latest_limit` devices, for live views (the demo). Off by default:
        # a copy of every device's fields costs ~1 KB per device at fleet scale.
        self.latest: dict[str, TelemetryEvent] = {}
        self.latest_limit = 0
        self.registry = registry if registry is not None else DeviceRegistry.empty()
        self._validators = self.registry.validators
        # Runs the actions that are neither alerts nor commands (set by the gateway: gateway.actions).
        self.run_action: Callable[[Action, list[Point]], None] | None = None
        self._by_format: dict[PayloadFormat, TelemetryDecoder] = {
            "json": decoder,
            "senml": SenmlDecoder(
                max_bytes=decoder.max_bytes,
                max_batch=decoder.max_batch,
                max_fields=decoder.max_fields,
                max_string=decoder.max_string,
            ),
        }
        # Only devices whose type is not JSON: the common case stays one failed dict lookup.
        self._decoders: dict[str, TelemetryDecoder] = {
            entry.id: self._by_format[self.registry.types[entry.type].format]
            for entry in self.registry.devices.values()
            if self.registry.types[entry.type].format != "json"
        }
        self._unknown = unknown_devices
        self._status_topics = status_topics
        self.tracker = DeviceTracker()
        self.quarantined: set[str] = set()  # unregistered devices whose telemetry was quarantined
        # Topic -> its valid device id. The codec hands out one str object per topic, so the lookup
        # hashes nothing; splitting and checking a topic cost ~1.5 us.
        self._device_ids: dict[str, str] = {}
        self._written_group = self._written  # one bound method: add_grouped groups by identity

    @property
    def seqs(self) -> SeqTracker:
        """The (device, seq) pairs already evaluated; checkpointed with the rule state."""
        return self._seqs

    def on_message(self, message: Message) -> None:
        """Handle one telemetry message (called by the MQTT client on the event loop)."""
        stats = self.stats
        stats.received += 1
        now = self._clock()
        topic = message.topic
        device_id = self._device_ids.get(topic)
        events: list[TelemetryEvent] = []
        try:
            if device_id is None:
                device_id = self._device_of(topic)
            self.tracker.seen(device_id, now)
            content_type = message.content_type
            if content_type is not None:
                decoder = self._by_format[content_type_format(content_type)]
            else:
                decoder = self._decoders.get(device_id, self._decoder)
            events = decoder.decode(device_id, message.payload, now)
            validator = self._validators.get(device_id)
            if validator is not None:
                for event in events:
                    validator.check(event)
            elif self._unknown != "accept":
                if self._unknown == "reject":
                    raise PayloadError(f"device {device_id!r} is not in the registry", device_id=device_id)
                self._quarantine(message, device_id, events)
                return
        except PayloadError as exc:
            for event in events:  # decoded, then refused: dead-lettered with a reason, not missing
                if event.seq is not None:
                    self._track_seq(event.device_id, event.seq, event.ts)
            self._reject(message, topic, device_id or exc.device_id, exc.reason, now)
            return
        points: list[Point] = []
        keep_latest = self.latest_limit and (device_id in self.latest or len(self.latest) < self.latest_limit)
        for event in events:
            if keep_latest:
                self.latest[device_id] = event
            points.append(telemetry_point(event))  # a redelivery rewrites the same point: idempotent
            if event.seq is not None and not self._track_seq(device_id, event.seq, event.ts):
                stats.duplicates += 1  # already evaluated: rules and commands fire once per message
                continue
            actions = self._engine.process(event, now)
            if actions:
                self.execute(actions, points)
        stats.events += len(events)
        self._hand_off(points, message, len(events))

    def _device_of(self, topic: str) -> str:
        """Return the device id of a topic not seen yet, or raise `PayloadError`; remember good ones."""
        device_id = self._topics.device_id(topic)
        if device_id is None:
            raise PayloadError(f"topic {topic[:120]!r} does not match {self._topics.template!r}")
        if not is_valid_device_id(device_id):  # before the tracker: a bad id is not a device
            raise PayloadError(f"device id {device_id[:80]!r} is not allowed", device_id=device_id)
        cache = self._device_ids
        if len(cache) >= TOPIC_CACHE_SIZE:
            cache.clear()
        cache[topic] = device_id
        return device_id

    def _track_seq(self, device_id: str, seq: int, ts: float) -> bool:
        """Record the seq; count and record a gap it reveals; return False for a redelivery."""
        seen = self._seqs.observe(device_id, seq)
        if seen.gap is not None:
            self._record_gap(seen.gap, ts)
        elif seen.late:
            self.stats.seq_late += 1
        return seen.new

    def _record_gap(self, gap: SeqGap, ts: float) -> None:
        stats = self.stats
        if gap.verified:
            stats.seq_gaps += 1
            stats.seq_missing += gap.missing
            log.warning(
                "device %s skipped seq %d..%d (%d missing)",
                gap.device_id,
                gap.first,
                gap.last,
                gap.missing,
                extra={"device_id": gap.device_id},
            )
        else:
            stats.seq_gaps_unverified += 1
            log.info(
                "device %s jumped over seq %d..%d after a restart from a checkpoint older than what the "
                "previous run stored; not counted as missing",
                gap.device_id,
                gap.first,
                gap.last,
                extra={"device_id": gap.device_id},
            )
        # Timed like the message that revealed it: a redelivery of that message rewrites the same point.
        self._sink.add([seq_gap_point(gap, ts)])

    def _hand_off(self, points: list[Point], message: Message, events: int) -> None:
        """Queue a message's points; it is counted and acked once they are handed off (`_written`)."""
        self.stats.in_flight += 1
        self._sink.add_grouped(
            points, self._written_group, (message.mid, message.qos, self._mqtt.generation, events)
        )
        if self._sink.is_full:
            self._pause()

    def _quarantine(self, message: Message, device_id: str, events: list[TelemetryEvent]) -> None:
        # Stored apart and kept from the rules: an unregistered device must not raise alarms or
        # trigger commands, but an operator can look at what it sent before registering it.
        self.stats.quarantined += 1
        if device_id not in self.quarantined:
            self.quarantined.add(device_id)
            log.warning(
                "quarantining telemetry of unregistered device %s", device_id, extra={"device_id": device_id}
            )
        self._hand_off([quarantine_point(event) for event in events], message, 0)

    def on_status(self, message: Message) -> None:
        """Handle one device status message (birth, last will or clean offline)."""
        now = self._clock()
        topic = message.topic
        device_id = self._status_topics.device_id(topic) if self._status_topics is not None else None
        try:
            if device_id is None:
                raise PayloadError(f"topic {topic[:120]!r} is not a device status topic")
            if not message.payload:  # an empty retained message is how a retained status is cleared
                generation = self._mqtt.generation
                self._sink.add([], lambda: self._mqtt.ack(message.mid, message.qos, generation))
                return
            status, device_ts = decode_status(device_id, message.payload)
        except PayloadError as exc:
            self._reject(message, topic, device_id, exc.reason, now)
            return
        points: list[Point] = []
        if self.tracker.set_status(device_id, status, now):
            self.stats.status_changes += 1
            log.info("device %s is %s", device_id, status, extra={"device_id": device_id})
            points.append(device_status_point(device_id, status, now, device_ts))
        generation = self._mqtt.generation
        self._sink.add(points, lambda: self._mqtt.ack(message.mid, message.qos, generation))

    def execute(self, actions: Sequence[Action], points: list[Point]) -> None:
        """Carry out rule actions: commands are sent now, alert records are appended to `points`."""
        for action in actions:
            if isinstance(action, RecordAlert):
                if action.state == "raised":
                    self.stats.alerts_raised += 1
                else:
                    self.stats.alerts_cleared += 1
                points.append(alert_point(action))
            elif isinstance(action, SendCommand):
                self._commands.send(action.device_id, action.name, action.params, rule_id=action.rule_id)
            elif self.run_action is not None:  # republish, webhook, derived point (gateway.actions)
                self.run_action(action, points)
            else:
                raise TypeError(f"no runner for rule action {type(action).__name__}")

    def _written(self, messages: list[tuple[int, int, int, int]]) -> None:
        """Count and ack messages (mid, qos, generation, events) whose points were all handed off alike."""
        stats = self.stats
        count = len(messages)
        stats.in_flight -= count
        stats.written += count
        # add_grouped: one outcome for the whole list
        outcome = self._hand_off_of() if self._hand_off_of is not None else HandOff.STORED
        if outcome is HandOff.STORED:
            stats.messages_stored += count
        elif outcome is HandOff.SPOOLED:
            stats.messages_spooled += count
        else:
            stats.messages_dead_lettered += count
        ack = self._mqtt.ack
        events = 0
        for mid, qos, generation, message_events in messages:
            events += message_events
            ack(mid, qos, generation)
        stats.events_written += events

    def _reject(self, message: Message, topic: str, device_id: str | None, reason: str, now: float) -> None:
        self.stats.rejected += 1
        log.warning("rejected message on %r: %s", topic[:120], reason)
        payload = message.payload[: self._dead_letter_max_bytes]
        record = {
            "topic": topic,
            "device_id": device_id,
            "reason": reason,
            "received_at": now,
            "payload_bytes": len(message.payload),
            "payload": payload.decode("utf-8", errors="replace"),
        }
        try:
            self._mqtt.publish(self._dead_letter_topic, json.dumps(record).encode(), qos=1)
        except Exception as exc:  # publishing failed: the log line above is then the only record
            self.stats.dead_letter_failures += 1
            log.error("could not publish to dead-letter topic: %s", exc)
        dead_letter_file = self._dead_letter_file
        if dead_letter_file is not None:
            dead_letter_file.payload(
                topic=topic, device_id=device_id, reason=reason, received_at=now, payload=message.payload
            )
        # Acked through the writer so acks leave in the order messages arrived, and only once the
        # dead-letter record is on disk.
        generation = self._mqtt.generation

        def recorded() -> None:
            if dead_letter_file is not None:
                dead_letter_file.sync()
            self._mqtt.ack(message.mid, message.qos, generation)

        self._sink.add([], recorded)

    def _pause(self) -> None:
        self.stats.backpressure_pauses += 1
        self._mqtt.pause_reading()
        self._paused.set()

    async def run_backpressure(self) -> None:
        """Resume reading once the writer has room again; runs until cancelled."""
        while True:
            await self._paused.wait()
            await self._sink.wait_until_not_full()
            self._paused.clear()
            self._mqtt.resume_reading()
