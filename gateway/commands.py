"""Send commands to devices and follow each one to its outcome, auditing every step in the store.

The decisions (queue, publish, retry, time out, expire, rate limit, offline hold) are made by the
pure `devices.delivery.CommandScheduler`; this module checks the allow-list, publishes, matches
acks, resolves waiters and records each transition as a `commands` point (gateway/records.py).

On an MQTT 5 connection each publish also carries Message Expiry Interval (the seconds left until
the command's `expires`, so the broker drops it for a device that stays away), Correlation Data
(the command id, UTF-8) and Response Topic (the device's ack topic). On MQTT 3.1.1 the JSON body's
`id` and `expires` carry the same facts; the body carries them on MQTT 5 as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from devices.command import Command, CommandAck, CommandAllowList
from devices.delivery import (
    FINAL_STATES,
    CommandScheduler,
    DeliveryPolicy,
    Publish,
    Step,
    TrackedCommand,
    Transition,
)
from devices.errors import PayloadError
from devices.registry import DeviceRegistry
from devices.topic import TopicScheme
from gateway.mqttcodec import Properties
from gateway.records import command_point
from gateway.store.base import Point
from rules import CommandSpec as RuleCommandSpec
from rules import RuleSet
from rules.selector import device_matcher

log = logging.getLogger(__name__)
SWEEP_INTERVAL = 0.5  # how often retries, timeouts, expiry and held commands are looked at
DEFAULT_TTL = 300.0
# Audit points of one device's commands share their series (device, name, rule, status); two taken at
# the same instant (e.g. a queue released at once) would overwrite each other in InfluxDB, so each
# audit point is stamped at least this much after the previous one (the store keeps microseconds).
AUDIT_TICK = 1e-6


class CommandChannel(Protocol):
    """Where commands are published (the MQTT connection, or a list in unit tests)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue one message for the broker; raise if it cannot be queued."""
        ...


class Mqtt5CommandChannel(Protocol):
    """A channel that can attach MQTT 5 publish properties (gateway.mqtt.MqttClient)."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """Queue one message with properties for the broker; raise if it cannot be queued."""
        ...


@dataclass(slots=True)
class CommandStats:
    """Counts of command outcomes since start."""

    sent: int = 0  # commands published (first attempts)
    retries: int = 0  # further publishes of the same command
    queued: int = 0  # commands that had to wait before their first publish
    acked_ok: int = 0
    acked_error: int = 0
    timed_out: int = 0
    expired: int = 0
    rejected: int = 0
    unknown_acks: int = 0  # acks that match no command we sent to that device
    duplicate_acks: int = 0  # a second ack for an answered command (e.g. a retry answered twice)
    late_acks: int = 0  # acks after the command was recorded timed_out
    bad_acks: int = 0  # unreadable acks


def publish_properties(command_id: str, expiry_interval: int | None, response_topic: str) -> Properties:
    """Build the MQTT 5 PUBLISH properties of a command."""
    return Properties(
        message_expiry_interval=expiry_interval,
        correlation_data=command_id.encode(),
        response_topic=response_topic,
    )


def _always() -> bool:
    return True


def _never(device_id: str) -> bool:
    return False


class CommandDispatcher:
    """Check, publish and follow commands; record every step of each in the store.

    Args:
        channel: publishes to the broker.
        topics: the per-device commands topic scheme.
        record: takes audit points (the batch writer's `add`).
        clock: epoch seconds; injectable for tests.
        policy: retries, timeouts, rate limit, offline policy and bounds.
        ttl: default seconds a command may wait to be sent (its `expires`).
        allow_list: the commands each device accepts; None (no registry) accepts every command.
        is_connected: whether the channel is connected to the broker now (commands wait otherwise).
        is_offline: whether a device's last status was offline.
        ack_topics: the per-device ack topic scheme, for the MQTT 5 Response Topic.
        mqtt5: publish with MQTT 5 properties (the channel must accept `properties=`).
    """

    def __init__(
        self,
        *,
        channel: CommandChannel | Mqtt5CommandChannel,
        topics: TopicScheme,
        record: Callable[[Point], None],
        clock: Callable[[], float],
        policy: DeliveryPolicy | None = None,
        ttl: float = DEFAULT_TTL,
        allow_list: CommandAllowList | None = None,
        is_connected: Callable[[], bool] = _always,
        is_offline: Callable[[str], bool] = _never,
        ack_topics: TopicScheme | None = None,
        mqtt5: bool = False,
    ) -> None:
        self._channel = channel
        self._topics = topics
        self._record = record
        self._clock = clock
        self._scheduler = CommandScheduler(policy if policy is not None else DeliveryPolicy())
        self._ttl = ttl
        self.allow_list = allow_list
        self._is_connected = is_connected
        self._is_offline = is_offline
        self._ack_topics = (
            ack_topics if ack_topics is not None else TopicScheme("devices/{device_id}/commands/ack")
        )
        self._mqtt5 = mqtt5
        self._waiters: dict[str, list[asyncio.Future[TrackedCommand]]] = {}
        self._last_audit = 0.0
        self.stats = CommandStats()

    @property
    def policy(self) -> DeliveryPolicy:
        """How commands are delivered."""
        return self._scheduler.policy

    @property
    def pending(self) -> int:
        """Commands queued or sent and not yet acked, timed out or expired."""
        return self._scheduler.pending

    @property
    def queued(self) -> int:
        """Commands waiting to be sent (device offline, broker disconnected, rate limit)."""
        return self._scheduler.queued

    def get(self, command_id: str) -> TrackedCommand | None:
        """Return a pending or recently finished command."""
        return self._scheduler.get(command_id)

    def list_commands(self) -> list[dict[str, Any]]:
        """Return the pending and recently finished commands as plain data, oldest first."""
        return [tracked.view() for tracked in self._scheduler.commands()]

    # -- sending -----------------------------------------------------------------------------------

    def send(
        self,
        device_id: str,
        name: str,
        params: Mapping[str, Any],
        *,
        rule_id: str = "",
        ttl: float | None = None,
    ) -> TrackedCommand:
        """Check a command against the allow-list, then publish, queue or reject it.

        Returns the tracked command; its `state` is `sent`, `queued` or `rejected` (with the reason in
        `detail`). Every outcome is audited, rejections included.
        """
        now = self._clock()
        lifetime = self._ttl if ttl is None else ttl
        command = Command(uuid.uuid4().hex, device_id, name, dict(params), now, now + lifetime)
        problems = self.allow_list.problems(device_id, name, params) if self.allow_list is not None else []
        if problems:
            step = self._scheduler.reject(command, now, "; ".join(problems), rule_id=rule_id)
        else:
            step = self._scheduler.submit(
                command,
                now,
                rule_id=rule_id,
                connected=self._is_connected(),
                is_offline=self._is_offline,
            )
        self._apply(step, now)
        tracked = self._scheduler.get(command.id)
        assert tracked is not None  # just submitted: pending or just finished
        return tracked

    def refuse(self, device_id: str, name: str, params: Mapping[str, Any], reason: str) -> dict[str, Any]:
        """Record a command refused before it was looked at (e.g. an unauthorised API call)."""
        now = self._clock()
        command = Command(uuid.uuid4().hex, device_id, name, dict(params), now, now)
        step = self._scheduler.reject(command, now, reason)
        self._apply(step, now)
        return step.transitions[0].tracked.view()

    async def submit(
        self,
        device_id: str,
        name: str,
        params: Mapping[str, Any],
        *,
        ttl: float | None = None,
        wait: float = 0.0,
    ) -> dict[str, Any]:
        """Send a command from an operator (HTTP API) and wait up to `wait` seconds for its outcome."""
        tracked = self.send(device_id, name, params, ttl=ttl)
        if wait > 0 and tracked.state not in FINAL_STATES:
            future = self.wait(tracked.command.id)
            try:
                await asyncio.wait_for(asyncio.shield(future), timeout=wait)
            except TimeoutError:
                pass
            finally:
                self._forget_waiter(tracked.command.id, future)
        return tracked.view()

    def wait(self, command_id: str) -> asyncio.Future[TrackedCommand]:
        """Return a future resolved with the command once it reaches a final state."""
        future: asyncio.Future[TrackedCommand] = asyncio.get_running_loop().create_future()
        tracked = self._scheduler.get(command_id)
        if tracked is None:
            raise KeyError(command_id)
        if tracked.state in FINAL_STATES:
            future.set_result(tracked)
        else:
            self._waiters.setdefault(command_id, []).append(future)
        return future

    def _forget_waiter(self, command_id: str, future: asyncio.Future[TrackedCommand]) -> None:
        waiters = self._waiters.get(command_id)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(future)
            if not waiters:
                del self._waiters[command_id]

    # -- acks and time -----------------------------------------------------------------------------

    def handle_ack(self, device_id: str, payload: bytes, *, correlation_data: bytes | None = None) -> None:
        """Match a device's ack to its command and record the outcome."""
        now = self._clock()
        try:
            correlation_id = correlation_data.decode() if correlation_data is not None else None
            ack = CommandAck.decode(device_id, payload, correlation_id=correlation_id)
        except (PayloadError, UnicodeDecodeError) as exc:
            self.stats.bad_acks += 1
            reason = exc.reason if isinstance(exc, PayloadError) else "correlation data is not UTF-8"
            log.warning("bad command ack from %s: %s", device_id, reason, extra={"device_id": device_id})
            return
        match, step = self._scheduler.ack(ack, now)
        if match == "unknown":
            self.stats.unknown_acks += 1  # forged, or for a command of an earlier gateway run
            log.info("ack %s from %s matches no command sent to it", ack.id[:64], device_id)
        elif match == "duplicate":
            self.stats.duplicate_acks += 1
        elif match == "late":
            self.stats.late_acks += 1
            log.info(
                "late ack %s (%s) from %s for a command already recorded as given up",
                ack.id,
                ack.status,
                device_id,
            )
        self._apply(step, now)

    def advance(self) -> None:
        """Retry, time out, expire and release held commands as of now."""
        now = self._clock()
        step = self._scheduler.advance(now, connected=self._is_connected(), is_offline=self._is_offline)
        self._apply(step, now)

    def device_changed(self, device_id: str) -> None:
        """Release what waits for `device_id` now that its status changed (its birth message)."""
        now = self._clock()
        step = self._scheduler.release(
            device_id, now, connected=self._is_connected(), is_offline=self._is_offline
        )
        self._apply(step, now)

    def close(self) -> None:
        """Record an end for every pending command: the gateway stops, and they live in memory only."""
        now = self._clock()
        step = self._scheduler.abandon(now)
        if step.transitions:
            log.warning("stopping with %d command(s) pending: recorded as ended", len(step.transitions))
        self._apply(step, now)

    async def run(self) -> None:
        """Advance the commands' timers until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.advance()

    # -- I/O ---------------------------------------------------------------------------------------

    def _apply(self, step: Step, now: float) -> None:
        for publish in step.publish:
            try:
                self._publish(publish)
            except Exception as exc:  # the channel maps its own errors; any failure means not sent
                log.warning("publishing command %s failed: %s", publish.tracked.command.id, exc)
                self._transitions(self._scheduler.publish_failed(publish, now, str(exc)).transitions)
                continue
            tracked = publish.tracked
            if publish.attempt == 1:
                self.stats.sent += 1
            else:
                self.stats.retries += 1
            self._audit(tracked, "sent", publish.ts, attempt=publish.attempt)
        self._transitions(step.transitions)

    def _publish(self, publish: Publish) -> None:
        command = publish.tracked.command
        topic = self._topics.format(command.device_id)
        if self._mqtt5:
            properties = publish_properties(
                command.id, publish.expiry_interval, self._ack_topics.format(command.device_id)
            )
            cast(Mqtt5CommandChannel, self._channel).publish(
                topic, command.encode(), qos=1, properties=properties
            )
        else:
            self._channel.publish(topic, command.encode(), qos=1)

    def _transitions(self, transitions: list[Transition]) -> None:
        stats = self.stats
        for transition in transitions:
            tracked, status = transition.tracked, transition.status
            command = tracked.command
            if status == "queued":
                stats.queued += 1
                log.info(
                    "command %s %s to %s queued: %s",
                    command.id,
                    command.name,
                    command.device_id,
                    transition.detail,
                    extra={"device_id": command.device_id},
                )
            elif status == "rejected":
                stats.rejected += 1
                log.warning(
                    "command %s to %s rejected: %s",
                    command.name,
                    command.device_id,
                    transition.detail,
                    extra={"device_id": command.device_id},
                )
            elif status == "ok":
                stats.acked_ok += 1
            elif status == "error":
                stats.acked_error += 1
            elif status == "timed_out":
                stats.timed_out += 1
            elif status == "expired":
                stats.expired += 1
            self._audit(
                tracked, status, transition.ts, detail=transition.detail, latency_ms=transition.latency_ms
            )
            if status in FINAL_STATES:
                for future in self._waiters.pop(command.id, []):
                    if not future.done():
                        future.set_result(tracked)

    def _audit(
        self,
        tracked: TrackedCommand,
        status: str,
        ts: float,
        *,
        detail: str = "",
        latency_ms: float | None = None,
        attempt: int | None = None,
    ) -> None:
        command = tracked.command
        ts = self._last_audit = max(ts, self._last_audit + AUDIT_TICK)
        self._record(
            command_point(
                command_id=command.id,
                device_id=command.device_id,
                name=command.name,
                status=status,
                ts=ts,
                rule_id=tracked.rule_id,
                params=command.params if status in ("queued", "sent", "rejected") else None,
                detail=detail,
                latency_ms=latency_ms,
                attempt=attempt,
            )
        )


# -- rule files against the allow-list ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleCommandProblem:
    """A rule's command action that some (`error`: all) of the devices it targets would refuse."""

    file: str
    rule_id: str
    where: str  # e.g. "on_raise[1]"
    message: str
    error: bool

    def __str__(self) -> str:
        return f"{self.file}: rule {self.rule_id!r} {self.where}: {self.message}"


def check_rule_commands(rule_set: RuleSet, registry: DeviceRegistry) -> list[RuleCommandProblem]:
    """Check each rule's command actions against the allow-lists of the devices they would reach.

    The devices a rule covers come from its `devices` selector; a command with a `device` template
    reaches the device the template names for each of them (as the engine renders it), else the
    covered device itself. A command that none of those registered devices would accept is an error
    (it can never be sent); one that only some device types refuse, or one that reaches no
    registered device, is a warning (those sends are rejected at runtime).
    """
    allow = registry.allow_list()
    devices = registry.devices
    problems = []
    for rule in rule_set:
        matches = device_matcher(rule.devices)
        covered = [device for device in devices.values() if matches(device.id, device)]
        for when, steps in (("on_raise", rule.on_raise), ("on_clear", rule.on_clear)):
            for i, step in enumerate(steps):
                if not isinstance(step, RuleCommandSpec):
                    continue
                where, file = f"{when}[{i}]", rule_set.files.get(rule.id, "")
                state = "raised" if when == "on_raise" else "cleared"
                by_type: dict[str, int] = {}
                unregistered: set[str] = set()
                for device in covered:
                    target = device.id
                    if step.device is not None:
                        context = {
                            "device_id": device.id,
                            "type": device.type,
                            "rule": rule.id,
                            "state": state,
                            "severity": rule.severity,
                            **{f"tags.{name}": value for name, value in device.tags.items()},
                        }
                        if rule.group_by is not None and rule.group_by in device.tags:
                            context["group"] = device.tags[rule.group_by]
                        rendered, _missing = step.device.render(context)
                        if rendered is None:
                            continue  # the engine reports it as a failed action at runtime
                        target = rendered
                    entry = devices.get(target)
                    if entry is None:
                        unregistered.add(target)
                    else:
                        by_type[entry.type] = by_type.get(entry.type, 0) + 1
                if unregistered:
                    shown = ", ".join(sorted(unregistered)[:5]) + (", ..." if len(unregistered) > 5 else "")
                    message = (
                        f"command {step.name!r} would go to devices not in the registry ({shown}), "
                        "and is rejected for them"
                    )
                    problems.append(RuleCommandProblem(file, rule.id, where, message, False))
                if not by_type:
                    if not unregistered:  # a warning: the devices may be registered later
                        message = f"command {step.name!r}: the rule covers no registered device"
                        problems.append(RuleCommandProblem(file, rule.id, where, message, False))
                    continue
                refusing = {
                    type_name: reasons
                    for type_name in sorted(by_type)
                    if (reasons := allow.type_problems(type_name, step.name, step.params))
                }
                for type_name, reasons in refusing.items():
                    message = (
                        f"devices of type {type_name!r} ({by_type[type_name]} reached) refuse it: "
                        + "; ".join(reasons)
                    )
                    problems.append(
                        RuleCommandProblem(file, rule.id, where, message, len(refusing) == len(by_type))
                    )
    return problems
