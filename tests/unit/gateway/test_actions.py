"""Republish, webhooks and derived points as the gateway carries them out (no network: httpx.MockTransport).

The real HTTP server and broker are in tests/integration/test_actions.py; these check retry, timeout,
queue and failure accounting with an injected transport and a fake sleep.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import httpx
import pytest

from gateway.actions import ActionRunner, WebhookSender, shown_url
from gateway.mqtt import MqttPublishError
from gateway.records import alert_point, derived_point
from gateway.store.base import Point
from rules.action import FailedAction, RecordAlert, Republish, SendCommand, Webhook, WriteDerived

BODY = {"rule": "hot", "device": "gh-1", "state": "raised"}
URL = "https://hooks.example/alarm?token=s3cret"


class FakeMqtt:
    def __init__(self, fail: bool = False) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.fail = fail

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self.fail:
            raise MqttPublishError("outgoing queue full (10000) while disconnected")
        self.published.append((topic, payload, qos, retain))


def sender(
    handler: Callable[[httpx.Request], httpx.Response], **options: object
) -> tuple[WebhookSender, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    webhooks = WebhookSender(transport=httpx.MockTransport(handler), sleep=sleep, **options)  # type: ignore[arg-type]
    return webhooks, slept


async def deliver(webhooks: WebhookSender, *items: Webhook) -> None:
    for item in items:
        assert webhooks.submit(item)
    task = asyncio.create_task(webhooks.run())
    await webhooks.drain(5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_webhook_posts_the_alert_as_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    webhooks, slept = sender(handler)
    asyncio.run(deliver(webhooks, Webhook(URL, BODY, "hot")))
    [request] = seen
    assert (request.method, str(request.url)) == ("POST", URL)
    assert request.headers["content-type"] == "application/json" and json.loads(request.content) == BODY
    assert (webhooks.stats.sent, webhooks.stats.failed, webhooks.stats.retries, slept) == (1, 0, 0, [])


def test_server_errors_and_timeouts_are_retried_with_backoff_then_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[httpx.Response | Exception] = [
        httpx.ConnectTimeout("timed out"),
        httpx.Response(503),
        httpx.Response(429),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    webhooks, slept = sender(handler, max_attempts=3, backoff=0.5)
    asyncio.run(deliver(webhooks, Webhook(URL, BODY, "hot")))
    assert (webhooks.stats.sent, webhooks.stats.failed, webhooks.stats.retries) == (0, 1, 2)
    assert 0.5 <= slept[0] <= 0.625 and 1.0 <= slept[1] <= 1.25  # doubling, plus up to 25 % jitter
    assert "webhook to https://hooks.example/alarm for rule hot given up: HTTP 429" in caplog.text
    assert "s3cret" not in caplog.text  # the query string may hold a token


def test_a_retry_that_succeeds_counts_as_sent() -> None:
    answers = [httpx.Response(500), httpx.Response(200)]
    webhooks, _ = sender(lambda request: answers.pop(0))
    asyncio.run(deliver(webhooks, Webhook(URL, BODY, "hot")))
    assert (webhooks.stats.sent, webhooks.stats.failed, webhooks.stats.retries) == (1, 0, 1)


def test_a_client_error_is_not_retried() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(404)

    webhooks, slept = sender(handler)
    asyncio.run(deliver(webhooks, Webhook(URL, BODY, "hot")))
    assert (len(calls), webhooks.stats.failed, slept) == (1, 1, [])


def test_a_full_queue_drops_counts_and_logs_without_waiting(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> WebhookSender:
        webhooks, _ = sender(lambda request: httpx.Response(200), max_queue=2)
        assert webhooks.submit(Webhook(URL, BODY, "hot")) and webhooks.submit(Webhook(URL, BODY, "hot"))
        assert not webhooks.submit(Webhook(URL, BODY, "cold"))
        return webhooks

    webhooks = asyncio.run(scenario())
    assert (webhooks.stats.dropped, webhooks.queued) == (1, 2)
    assert (
        "webhook queue full (2): dropped the POST to https://hooks.example/alarm for rule cold" in caplog.text
    )


def test_what_is_left_at_shutdown_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> WebhookSender:
        webhooks, _ = sender(lambda request: httpx.Response(200))
        webhooks.submit(Webhook(URL, BODY, "hot"))  # no worker runs: it stays queued
        await webhooks.drain(0.01)
        return webhooks

    webhooks = asyncio.run(scenario())
    assert webhooks.stats.dropped == 1 and "shutting down with 1 webhook(s) not sent" in caplog.text


def test_the_runner_republishes_queues_webhooks_writes_derived_points_and_logs_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    mqtt = FakeMqtt()
    webhooks, _ = sender(lambda request: httpx.Response(200))
    runner = ActionRunner(mqtt=mqtt, webhooks=webhooks)
    points: list[Point] = []
    derived = WriteDerived(
        "greenhouse_1m", (("device", "gh-1"), ("rule", "gh-1m")), {"t": 21.5}, 60.0, "gh-1m"
    )

    async def scenario() -> None:
        runner.execute(Republish("alerts/gh-1", BODY, 0, True, "hot"), points)
        runner.execute(Webhook(URL, BODY, "hot"), points)
        runner.execute(derived, points)
        runner.execute(FailedAction("pump", "gh-2", "on_raise[0]", "{tags.zone} is not known here"), points)

    asyncio.run(scenario())
    assert mqtt.published == [("alerts/gh-1", json.dumps(BODY, separators=(",", ":")).encode(), 0, True)]
    assert webhooks.queued == 1
    assert points == [Point("greenhouse_1m", (("device", "gh-1"), ("rule", "gh-1m")), {"t": 21.5}, 60.0)]
    assert points == [derived_point(derived)]
    assert (runner.stats.republished, runner.stats.derived_points, runner.stats.failed_actions) == (1, 1, 1)
    assert "rule pump: on_raise[0] for gh-2 not run: {tags.zone} is not known here" in caplog.text
    with pytest.raises(TypeError):
        runner.execute(SendCommand("gh-1", "fan"), points)  # commands are the dispatcher's


def test_a_republish_that_cannot_be_queued_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    runner = ActionRunner(mqtt=FakeMqtt(fail=True), webhooks=WebhookSender())
    runner.execute(Republish("alerts/gh-1", BODY, 1, False, "hot"), [])
    assert (runner.stats.republished, runner.stats.republish_failures) == (0, 1)
    assert "republish to 'alerts/gh-1' for rule hot failed: outgoing queue full" in caplog.text


def test_a_group_alert_is_stored_by_group() -> None:
    alert = RecordAlert(
        "site-warm", "site=north", "raised", "critical", 5.0, "warm", {"avg(t, 5m)": 29.0}, ("site", "north")
    )
    point = alert_point(alert)
    assert point.tags == (
        ("group", "north"),
        ("group_by", "site"),
        ("rule", "site-warm"),
        ("severity", "critical"),
        ("state", "raised"),
    )
    assert point.fields == {"message": "warm", "avg(t, 5m)": 29.0}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@hooks.example:8443/a/b?token=x#frag", "https://hooks.example:8443/a/b"),
        ("http://127.0.0.1/hook", "http://127.0.0.1/hook"),
    ],
)
def test_urls_are_logged_without_secrets(url: str, shown: str) -> None:
    assert shown_url(url) == shown
