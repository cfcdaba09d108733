"""Send commands to devices and follow each one until the device acks it or it times out."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from devices.command import Command, CommandAck
from devices.errors import PayloadError
from devices.topic import TopicScheme
from gateway.records import command_point
from gateway.store.base import Point

log = logging.getLogger(__name__)
SWEEP_INTERVAL = 0.5


class CommandChannel(Protocol):
    """Where commands are published (the MQTT connection, or a list in unit tests)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue one message for the broker."""
        ...


@dataclass(slots=True)
class CommandStats:
    """Counts of command outcomes since start."""

    sent: int = 0
    acked_ok: int = 0
    acked_error: int = 0
    timed_out: int = 0
    rejected: int = 0
    unknown_acks: int = 0
    bad_acks: int = 0


@dataclass(slots=True)
class _Pending:
    command: Command
    rule_id: str
    deadline: float
    done: asyncio.Future[CommandAck | None] | None = None


class CommandDispatcher:
    """Publish commands, match acks to them, and record every step in the store.

    Args:
        channel: publishes to the broker.
        topics: the per-device commands topic scheme.
        record: takes audit points (the batch writer's `add`).
        clock: epoch seconds; injectable for tests.
        ack_timeout: seconds to wait for an ack before recording `timed_out`.
        max_pending: commands awaiting an ack; beyond this new commands are rejected, not queued.
    """

    def __init__(
        self,
        *,
        channel: CommandChannel,
        topics: TopicScheme,
        record: Callable[[Point], None],
        clock: Callable[[], float],
        ack_timeout: float = 30.0,
        max_pending: int = 10_000,
    ) -> None:
        self._channel = channel
        self._topics = topics
        self._record = record
        self._clock = clock
        self._ack_timeout = ack_timeout
        self._max_pending = max_pending
        self._pending: dict[str, _Pending] = {}
        self.stats = CommandStats()

    @property
    def pending(self) -> int:
        """Commands sent and not yet acked or timed out."""
        return len(self._pending)

    def send(
        self, device_id: str, name: str, params: Mapping[str, Any], *, rule_id: str = ""
    ) -> Command | None:
        """Publish a command and start waiting for its ack; return None if it was rejected."""
        now = self._clock()
        command = Command(uuid.uuid4().hex, device_id, name, dict(params), now)
        reason = ""
        if len(self._pending) >= self._max_pending:
            reason = f"{self._max_pending} commands already await an ack"
        else:
            try:
                self._channel.publish(self._topics.format(device_id), command.encode(), qos=1)
            except Exception as exc:  # the channel maps its own errors; any failure means not sent
                reason = str(exc)
        if reason:
            self.stats.rejected += 1
            log.warning("command %s to %s rejected: %s", name, device_id, reason)
            self._audit(command, "rejected", rule_id, now, detail=reason)
            return None
        self.stats.sent += 1
        self._pending[command.id] = _Pending(command, rule_id, now + self._ack_timeout)
        self._audit(command, "sent", rule_id, now)
        return command

    def wait(self, command_id: str) -> asyncio.Future[CommandAck | None]:
        """Return a future resolved with the ack, or None on timeout."""
        pending = self._pending[command_id]
        if pending.done is None:
            pending.done = asyncio.get_running_loop().create_future()
        return pending.done

    def handle_ack(self, device_id: str, payload: bytes) -> None:
        """Match a device's ack to its command and record the outcome."""
        now = self._clock()
        try:
            ack = CommandAck.decode(device_id, payload)
        except PayloadError as exc:
            self.stats.bad_acks += 1
            log.warning("bad command ack from %s: %s", device_id, exc.reason)
            return
        pending = self._pending.get(ack.id)
        if pending is None or pending.command.device_id != device_id:
            # late (after timeout), duplicate (redelivered) or forged: nothing to match
            self.stats.unknown_acks += 1
            log.debug("ack %s from %s matches no pending command", ack.id, device_id)
            return
        del self._pending[ack.id]
        if ack.status == "ok":
            self.stats.acked_ok += 1
        else:
            self.stats.acked_error += 1
        latency_ms = (now - pending.command.ts) * 1000.0
        self._audit(
            pending.command, ack.status, pending.rule_id, now, detail=ack.detail, latency_ms=latency_ms
        )
        if pending.done is not None and not pending.done.done():
            pending.done.set_result(ack)

    def expire(self) -> None:
        """Record `timed_out` for every command whose ack is overdue."""
        now = self._clock()
        overdue = [p for p in self._pending.values() if p.deadline <= now]
        for pending in overdue:
            del self._pending[pending.command.id]
            self.stats.timed_out += 1
            self._audit(
                pending.command, "timed_out", pending.rule_id, now, detail=f"no ack in {self._ack_timeout}s"
            )
            if pending.done is not None and not pending.done.done():
                pending.done.set_result(None)

    async def run(self) -> None:
        """Expire overdue commands until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.expire()

    def _audit(
        self,
        command: Command,
        status: str,
        rule_id: str,
        ts: float,
        *,
        detail: str = "",
        latency_ms: float | None = None,
    ) -> None:
        self._record(
            command_point(
                command_id=command.id,
                device_id=command.device_id,
                name=command.name,
                status=status,
                ts=ts,
                rule_id=rule_id,
                params=command.params if status == "sent" else None,
                detail=detail,
                latency_ms=latency_ms,
            )
        )
