"""Command delivery decisions: each command's lifecycle, retries, expiry, offline hold and rate limit.

    queued ──▶ sent ──▶ ok | error      the device's ack, with its detail
      │          └────▶ timed_out       no ack within `ack_timeout` of the first publish
      └──────▶ expired                  its TTL (`Command.expires`) passed before it could be sent
    rejected                            refused before sending (allow-list, bounds, offline policy)

A command goes straight to `sent` when nothing stands in its way. Otherwise it waits, `queued`, in
its device's FIFO (bounded) until the gateway is connected to the broker, the device is online
(offline policy `hold`) and the device's token bucket has a token; FIFO order is kept. A sent
command without an ack is published again with the same id every `retry_interval`, up to
`max_attempts` publishes in all, while it has not expired; the device treats a repeated id as the
same command. Retries wait while the device is offline (unless the policy is `send`) and while the
gateway is disconnected.

`CommandScheduler` is pure: every call takes the time and the state of the world (connected to the
broker, which devices are offline) and returns what to publish and which transitions to record;
`gateway.commands.CommandDispatcher` does the I/O.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from devices.command import Command, CommandAck

CommandState = Literal["queued", "sent", "ok", "error", "timed_out", "expired", "rejected"]
OfflinePolicy = Literal["hold", "send", "reject"]
AckMatch = Literal["matched", "duplicate", "late", "unknown"]
FINAL_STATES: frozenset[str] = frozenset({"ok", "error", "timed_out", "expired", "rejected"})
RECENT_FINISHED = 1_000  # finished commands remembered for `command list`, waiters and duplicate acks
BUCKET_PRUNE_ABOVE = 1_024  # token buckets kept before full ones (same as fresh ones) are dropped

DeviceCheck = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How commands are delivered.

    Args:
        ack_timeout: seconds from the first publish to the ack before the command is `timed_out`.
        retry_interval: seconds without an ack before the same command (same id) is published again.
        max_attempts: publishes in all, the first included (1: no retries).
        offline: for a device whose last status is offline: `hold` it until the device is back,
            `send` it anyway (MQTT expiry and `expires` bound it), or `reject` it.
        max_queued_per_device: commands waiting for one device; beyond this new ones are rejected.
        max_pending: commands queued or awaiting an ack, all devices together.
        rate: commands per second a device may receive, sustained (its token bucket's refill rate).
        burst: commands a device may receive at once (the bucket's size).
    """

    ack_timeout: float = 30.0
    retry_interval: float = 10.0
    max_attempts: int = 3
    offline: OfflinePolicy = "hold"
    max_queued_per_device: int = 100
    max_pending: int = 10_000
    rate: float = 1.0
    burst: int = 5


class TokenBucket:
    """A token bucket: holds up to `burst` tokens, refilled at `rate` per second."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> bool:
        """Take one token if there is one at `now`."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def is_full(self, now: float) -> bool:
        """Tell whether the bucket is as full as a new one (so it can be forgotten)."""
        self._refill(now)
        return self.tokens >= self.burst


@dataclass(slots=True)
class TrackedCommand:
    """A command and where it is in its life."""

    command: Command
    rule_id: str
    state: CommandState
    created: float
    updated: float
    detail: str = ""
    attempts: int = 0
    first_sent: float | None = None
    last_sent: float | None = None
    latency_ms: float | None = None
    serial: int = 0  # order of arrival, for listings

    def view(self) -> dict[str, Any]:
        """Return the command as plain data (for the HTTP API and `tidegate command list`)."""
        command = self.command
        return {
            "id": command.id,
            "device": command.device_id,
            "name": command.name,
            "params": command.params,
            "rule": self.rule_id,
            "status": self.state,
            "detail": self.detail,
            "attempts": self.attempts,
            "created": self.created,
            "updated": self.updated,
            "expires": command.expires,
            "latency_ms": self.latency_ms,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """A command entered `status` at `ts` (every one is audited)."""

    tracked: TrackedCommand
    status: CommandState
    ts: float
    detail: str = ""
    latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish `command` now: attempt number `attempt`, with `expiry_interval` whole seconds left."""

    tracked: TrackedCommand
    attempt: int
    ts: float
    expiry_interval: int | None


@dataclass(slots=True)
class Step:
    """What the scheduler decided: messages to publish and transitions to record, in order."""

    publish: list[Publish] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)


def _never(device_id: str) -> bool:
    return False


class CommandScheduler:
    """Decide when each command is published, retried, timed out or expired. Pure: time is passed in."""

    def __init__(self, policy: DeliveryPolicy) -> None:
        self.policy = policy
        self._sent: dict[str, TrackedCommand] = {}  # state sent, awaiting an ack
        self._queued: dict[str, TrackedCommand] = {}  # state queued
        self._queues: dict[str, deque[TrackedCommand]] = {}  # device -> its queued commands, FIFO
        self._buckets: dict[str, TokenBucket] = {}
        self._finished: OrderedDict[str, TrackedCommand] = OrderedDict()
        self._serials = itertools.count()

    # -- views -------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Commands queued or awaiting an ack."""
        return len(self._sent) + len(self._queued)

    @property
    def queued(self) -> int:
        """Commands waiting to be sent."""
        return len(self._queued)

    def get(self, command_id: str) -> TrackedCommand | None:
        """Return a pending or recently finished command."""
        return self._sent.get(command_id) or self._queued.get(command_id) or self._finished.get(command_id)

    def commands(self) -> list[TrackedCommand]:
        """Return the pending and the recently finished commands, oldest first."""
        tracked = [*self._finished.values(), *self._queued.values(), *self._sent.values()]
        return sorted(tracked, key=lambda t: (t.created, t.serial))

    # -- inputs ------------------------------------------------------------------------------------

    def reject(self, command: Command, now: float, reason: str, *, rule_id: str = "") -> Step:
        """Record a command refused before it entered the scheduler (e.g. not on the allow-list)."""
        tracked = TrackedCommand(command, rule_id, "rejected", now, now, serial=next(self._serials))
        return Step(transitions=[self._finish(tracked, "rejected", now, reason)])

    def submit(
        self,
        command: Command,
        now: float,
        *,
        rule_id: str = "",
        connected: bool = True,
        is_offline: DeviceCheck = _never,
    ) -> Step:
        """Take a new command: publish it now, queue it, or reject it."""
        policy = self.policy
        tracked = TrackedCommand(command, rule_id, "queued", now, now, serial=next(self._serials))
        if self.pending >= policy.max_pending:
            reason = f"{policy.max_pending} commands are already pending (commands.max_pending)"
            return Step(transitions=[self._finish(tracked, "rejected", now, reason)])
        device_id = command.device_id
        offline = is_offline(device_id)
        if offline and policy.offline == "reject":
            reason = f"device {device_id!r} is offline (commands.offline: reject)"
            return Step(transitions=[self._finish(tracked, "rejected", now, reason)])
        queue = self._queues.get(device_id)
        blocker = ""
        if not connected:
            blocker = "not connected to the broker"
        elif offline and policy.offline == "hold":
            blocker = "device is offline"
        if queue:  # FIFO: behind the device's earlier commands, whatever holds them
            behind = f"behind {len(queue)} earlier command(s) for this device"
            wait = f"{blocker}, {behind}" if blocker else behind
        elif blocker:
            wait = blocker
        elif not self._bucket(device_id, now).take(now):
            wait = f"rate limit ({policy.rate:g} per second, burst {policy.burst})"
        else:
            return Step(publish=[self._publish(tracked, now)])
        if queue is not None and len(queue) >= policy.max_queued_per_device:
            reason = f"{len(queue)} commands already wait for device {device_id!r} (commands.max_queued_per_device)"
            return Step(transitions=[self._finish(tracked, "rejected", now, reason)])
        self._queues.setdefault(device_id, deque()).append(tracked)
        self._queued[command.id] = tracked
        tracked.detail = wait
        return Step(transitions=[Transition(tracked, "queued", now, wait)])

    def publish_failed(self, publish: Publish, now: float, reason: str) -> Step:
        """The channel refused a publish: a first attempt is rejected; a retry just did not happen."""
        tracked = publish.tracked
        if tracked.state != "sent":
            return Step()
        if publish.attempt > 1:
            tracked.attempts -= 1  # try again at the next retry time
            return Step()
        del self._sent[tracked.command.id]
        return Step(transitions=[self._finish(tracked, "rejected", now, f"could not publish: {reason}")])

    def ack(self, ack: CommandAck, now: float) -> tuple[AckMatch, Step]:
        """Match a device's ack to the command it answers."""
        tracked = self._sent.get(ack.id)
        if tracked is None or tracked.command.device_id != ack.device_id:
            done = self._finished.get(ack.id)
            if tracked is None and done is not None and done.command.device_id == ack.device_id:
                # answered already (a retry was answered twice) or given up on (timed_out)
                return ("late" if done.state not in ("ok", "error") else "duplicate"), Step()
            return "unknown", Step()
        del self._sent[ack.id]
        first_sent = tracked.first_sent if tracked.first_sent is not None else now
        latency_ms = max(now - first_sent, 0.0) * 1000.0
        tracked.latency_ms = latency_ms
        return "matched", Step(
            transitions=[self._finish(tracked, ack.status, now, ack.detail, latency_ms=latency_ms)]
        )

    def advance(self, now: float, *, connected: bool = True, is_offline: DeviceCheck = _never) -> Step:
        """Time out, retry, expire and release commands as of `now`."""
        step = Step()
        policy = self.policy
        for tracked in list(self._sent.values()):
            first_sent = tracked.first_sent if tracked.first_sent is not None else now
            last_sent = tracked.last_sent if tracked.last_sent is not None else now
            if now >= first_sent + policy.ack_timeout:
                del self._sent[tracked.command.id]
                detail = (
                    f"no ack within {policy.ack_timeout:g}s of the first publish "
                    f"({tracked.attempts} attempt(s))"
                )
                step.transitions.append(self._finish(tracked, "timed_out", now, detail))
            elif (
                tracked.attempts < policy.max_attempts
                and now >= last_sent + policy.retry_interval
                and connected
                and not tracked.command.is_expired(now)
                and not (policy.offline != "send" and is_offline(tracked.command.device_id))
            ):
                step.publish.append(self._publish(tracked, now))
        for device_id in list(self._queues):
            self._drain(device_id, now, connected, is_offline, step)
        if len(self._buckets) > BUCKET_PRUNE_ABOVE:
            self._buckets = {d: b for d, b in self._buckets.items() if not b.is_full(now)}
        return step

    def release(
        self, device_id: str, now: float, *, connected: bool = True, is_offline: DeviceCheck = _never
    ) -> Step:
        """Send what waits for one device, now that its status changed (e.g. its birth message)."""
        step = Step()
        if device_id in self._queues:
            self._drain(device_id, now, connected, is_offline, step)
        return step

    def abandon(self, now: float) -> Step:
        """End every pending command with a record, because the gateway stops (they live in memory)."""
        step = Step()
        for tracked in list(self._queued.values()):
            step.transitions.append(self._finish(tracked, "expired", now, "not sent: the gateway stopped"))
        for tracked in list(self._sent.values()):
            detail = "the gateway stopped before the device acked (it may still have run it)"
            step.transitions.append(self._finish(tracked, "timed_out", now, detail))
        self._queued.clear()
        self._sent.clear()
        self._queues.clear()
        return step

    # -- internals ---------------------------------------------------------------------------------

    def _drain(
        self, device_id: str, now: float, connected: bool, is_offline: DeviceCheck, step: Step
    ) -> None:
        queue = self._queues[device_id]
        for tracked in [t for t in queue if t.command.is_expired(now)]:
            queue.remove(tracked)
            del self._queued[tracked.command.id]
            detail = f"not sent before it expired ({now - tracked.created:.1f}s queued: {tracked.detail})"
            step.transitions.append(self._finish(tracked, "expired", now, detail))
        held = self.policy.offline != "send" and is_offline(device_id)
        while queue and connected and not held and self._bucket(device_id, now).take(now):
            tracked = queue.popleft()
            del self._queued[tracked.command.id]
            step.publish.append(self._publish(tracked, now))
        if not queue:
            del self._queues[device_id]

    def _bucket(self, device_id: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = self._buckets[device_id] = TokenBucket(self.policy.rate, self.policy.burst, now)
        return bucket

    def _publish(self, tracked: TrackedCommand, now: float) -> Publish:
        tracked.state = "sent"
        tracked.attempts += 1
        tracked.updated = tracked.last_sent = now
        if tracked.first_sent is None:
            tracked.first_sent = now
        tracked.detail = ""
        self._sent[tracked.command.id] = tracked
        expires = tracked.command.expires
        # MQTT's Message Expiry Interval is whole seconds; round up so the broker never drops early.
        interval = None if expires is None else max(math.ceil(expires - now), 1)
        return Publish(tracked, tracked.attempts, now, interval)

    def _finish(
        self,
        tracked: TrackedCommand,
        status: CommandState,
        now: float,
        detail: str,
        *,
        latency_ms: float | None = None,
    ) -> Transition:
        tracked.state = status
        tracked.detail = detail
        tracked.updated = now
        self._finished[tracked.command.id] = tracked
        if len(self._finished) > RECENT_FINISHED:
            self._finished.popitem(last=False)
        return Transition(tracked, status, now, detail, latency_ms)
