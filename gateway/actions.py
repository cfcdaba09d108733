"""Carry out the rule actions other than alerts and commands: MQTT republish, webhooks, derived points.

The engine returns action objects (`rules.action`); ingest and the engine clock hand each one that
is not an alert or a command to `ActionRunner.execute`, on the event loop, in the middle of
ingest's hot path. So nothing here waits:

- `Republish`: the alert as JSON, queued on the gateway's own MQTT connection (QoS 1 by default,
  kept across reconnects by paho within its bounded outgoing queue). A publish that fails (queue
  full while disconnected, a topic the broker library refuses) is counted and logged.
- `Webhook`: the alert as a JSON POST, put on a bounded queue that `WebhookSender` workers drain
  with their own `httpx.AsyncClient`. A full queue drops the webhook, counted and logged: a slow
  or dead endpoint must not hold up telemetry. Each POST has a timeout; connection errors,
  timeouts, 408, 425, 429 and 5xx are retried (at most `max_attempts` tries, exponential backoff
  with jitter); other answers fail at once. Every failure is counted and logged with the rule id
  and the URL without its query string (which may hold a token).
- `WriteDerived`: a derived metric's point, appended to the points being written
  (`gateway.records.derived_point`).
- `FailedAction`: an action the engine could not build (a template naming a tag the device does
  not have): counted and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from gateway.mqtt import MqttPublishError
from gateway.records import derived_point
from gateway.store.base import Point
from rules.action import Action, FailedAction, Republish, Webhook, WriteDerived

log = logging.getLogger(__name__)

# Answers worth another try: the server may do better later. Everything else outside 2xx fails.
RETRYABLE_STATUS = frozenset({408, 425, 429})
MAX_BACKOFF = 30.0


class Publisher(Protocol):
    """The MQTT side a republish needs (`gateway.mqtt.MqttClient`)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...


@dataclass(slots=True)
class WebhookStats:
    """Webhook outcomes since start."""

    sent: int = 0  # answered 2xx
    failed: int = 0  # given up on: a non-retryable answer, or retries used up
    dropped: int = 0  # not queued (queue full) or still queued at shutdown
    retries: int = 0  # tries after the first


def shown_url(url: str) -> str:
    """Return `url` without its query, fragment and credentials, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class WebhookSender:
    """POST webhooks from a bounded queue, with timeouts and bounded retries; `submit` never waits.

    Args:
        timeout: seconds for each POST (connect, send and answer).
        max_queue: webhooks waiting to be sent; beyond this `submit` drops and counts them.
        max_attempts: tries per webhook (1 = no retry).
        backoff: seconds before the first retry; doubled for each next one (at most 30 s), plus up
            to 25 % jitter so a recovering endpoint is not hit by every worker at once.
        workers: POSTs in flight at once.
        transport: an httpx transport (tests); default the real network.
        sleep: how to wait between tries (tests pass a fake).
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        max_queue: int = 1_000,
        max_attempts: int = 3,
        backoff: float = 1.0,
        workers: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._timeout = timeout
        self._queue: asyncio.Queue[Webhook] = asyncio.Queue(maxsize=max_queue)
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._workers = workers
        self._transport = transport
        self._sleep = sleep
        self.stats = WebhookStats()

    @property
    def queued(self) -> int:
        """Webhooks waiting for a worker."""
        return self._queue.qsize()

    def submit(self, webhook: Webhook) -> bool:
        """Queue a webhook; return False (counted, logged) when the queue is full."""
        try:
            self._queue.put_nowait(webhook)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.error(
                "webhook queue full (%d): dropped the POST to %s for rule %s",
                self._queue.maxsize,
                shown_url(webhook.url),
                webhook.rule_id,
                extra={"rule_id": webhook.rule_id},
            )
            return False
        return True

    async def run(self) -> None:
        """Send queued webhooks until cancelled."""
        async with (
            httpx.AsyncClient(timeout=self._timeout, transport=self._transport) as client,
            asyncio.TaskGroup() as group,
        ):
            for index in range(self._workers):
                group.create_task(self._work(client), name=f"webhook-{index}")

    async def drain(self, within: float) -> None:
        """Wait up to `within` seconds for the queue to empty; count and log what is left."""
        try:
            async with asyncio.timeout(within):
                await self._queue.join()
        except TimeoutError:
            left = self._queue.qsize()
            self.stats.dropped += left
            log.error("shutting down with %d webhook(s) not sent", left)

    async def _work(self, client: httpx.AsyncClient) -> None:
        while True:
            webhook = await self._queue.get()
            try:
                await self._deliver(client, webhook)
            finally:
                self._queue.task_done()

    async def _deliver(self, client: httpx.AsyncClient, webhook: Webhook) -> None:
        url = shown_url(webhook.url)
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                self.stats.retries += 1
                delay = min(self._backoff * 2 ** (attempt - 2), MAX_BACKOFF)
                await self._sleep(delay * (1 + random.random() / 4))
            try:
                response = await client.post(webhook.url, json=dict(webhook.body))
            except httpx.HTTPError as exc:  # connect error, timeout, reset: worth another try
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                retry = True
            else:
                if response.is_success:
                    self.stats.sent += 1
                    return
                reason = f"HTTP {response.status_code}"
                retry = response.status_code in RETRYABLE_STATUS or response.status_code >= 500
            if not retry:
                break
            log.warning(
                "webhook to %s for rule %s failed (try %d of %d): %s",
                url,
                webhook.rule_id,
                attempt,
                self._max_attempts,
                reason,
                extra={"rule_id": webhook.rule_id},
            )
        self.stats.failed += 1
        log.error(
            "webhook to %s for rule %s given up: %s",
            url,
            webhook.rule_id,
            reason,
            extra={"rule_id": webhook.rule_id},
        )


@dataclass(slots=True)
class ActionStats:
    """Counts of the actions `ActionRunner` carried out."""

    republished: int = 0
    republish_failures: int = 0
    derived_points: int = 0
    failed_actions: int = 0  # actions the engine could not build (`FailedAction`)


class ActionRunner:
    """Run republish, webhook and derived-point actions (see the module docstring)."""

    def __init__(self, *, mqtt: Publisher, webhooks: WebhookSender) -> None:
        self._mqtt = mqtt
        self.webhooks = webhooks
        self.stats = ActionStats()

    def execute(self, action: Action, points: list[Point]) -> None:
        """Carry out one action; a derived point is appended to `points`."""
        if isinstance(action, WriteDerived):
            self.stats.derived_points += 1
            points.append(derived_point(action))
        elif isinstance(action, Republish):
            self._republish(action)
        elif isinstance(action, Webhook):
            self.webhooks.submit(action)
        elif isinstance(action, FailedAction):
            self.stats.failed_actions += 1
            log.warning(
                "rule %s: %s for %s not run: %s",
                action.rule_id,
                action.step,
                action.device_id,
                action.reason,
                extra={"rule_id": action.rule_id, "device_id": action.device_id},
            )
        else:
            raise TypeError(f"ActionRunner does not run {type(action).__name__}")

    def _republish(self, action: Republish) -> None:
        payload = json.dumps(action.payload, separators=(",", ":")).encode()
        try:
            self._mqtt.publish(action.topic, payload, qos=action.qos, retain=action.retain)
        except (MqttPublishError, ValueError) as exc:
            self.stats.republish_failures += 1
            log.error(
                "republish to %r for rule %s failed: %s",
                action.topic,
                action.rule_id,
                exc,
                extra={"rule_id": action.rule_id},
            )
            return
        self.stats.republished += 1
