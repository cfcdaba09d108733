"""The operations endpoint: metrics text format, health, status, and bad requests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from gateway.httpapi import StatusServer, render_metrics


def test_metrics_text_format() -> None:
    text = render_metrics({"received": 12, "mqtt_connected": True, "unknown": 3})
    assert "# TYPE tidegate_received_total counter\ntidegate_received_total 12\n" in text
    assert "# TYPE tidegate_mqtt_connected gauge\ntidegate_mqtt_connected 1\n" in text
    assert "unknown" not in text


async def get(port: int, request: bytes) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def test_routes() -> None:
    snapshot: dict[str, Any] = {"received": 5, "mqtt_connected": True}

    async def scenario() -> list[tuple[str, str]]:
        server = StatusServer("127.0.0.1", 0, lambda: snapshot)
        started = asyncio.Event()
        task = asyncio.create_task(server.run(started))
        await started.wait()
        results = [
            await get(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            await get(server.port, b"GET /healthz HTTP/1.1\r\n\r\n"),
            await get(server.port, b"GET /status?x=1 HTTP/1.1\r\n\r\n"),
            await get(server.port, b"POST /metrics HTTP/1.1\r\n\r\n"),
            await get(server.port, b"GET /nope HTTP/1.1\r\n\r\n"),
        ]
        snapshot["mqtt_connected"] = False
        results.append(await get(server.port, b"GET /healthz HTTP/1.1\r\n\r\n"))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return results

    metrics, healthy, status, post, missing, unhealthy = asyncio.run(scenario())
    assert metrics[0] == "HTTP/1.1 200 OK" and "tidegate_received_total 5" in metrics[1]
    assert healthy[0] == "HTTP/1.1 200 OK" and json.loads(healthy[1])["healthy"] is True
    assert json.loads(status[1]) == {"received": 5, "mqtt_connected": True}
    assert post[0].startswith("HTTP/1.1 405") and missing[0].startswith("HTTP/1.1 404")
    assert unhealthy[0].startswith("HTTP/1.1 503")


def post(path: str, body: bytes, *, length: int | None = None) -> bytes:
    declared = len(body) if length is None else length
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n".encode() + body


def test_alarm_routes() -> None:
    raised = [{"rule": "hot", "device": "d-1", "severity": "warning", "since": 1.5, "values": {"t": 31}}]
    acked: list[tuple[str, str]] = []

    def alarms() -> list[dict[str, Any]]:
        return [{**alarm, "acknowledged": (alarm["rule"], alarm["device"]) in acked} for alarm in raised]

    def acknowledge(rule: str, device: str) -> dict[str, Any] | None:
        if not any(a["rule"] == rule and a["device"] == device for a in raised):
            return None
        acked.append((rule, device))
        return alarms()[0]

    async def scenario() -> list[tuple[str, str]]:
        server = StatusServer("127.0.0.1", 0, dict, alarms=alarms, acknowledge=acknowledge)
        started = asyncio.Event()
        task = asyncio.create_task(server.run(started))
        await started.wait()
        requests = [
            b"GET /alarms HTTP/1.1\r\n\r\n",
            post("/alarms/ack", b'{"rule": "hot", "device": "nope"}'),
            post("/alarms/ack", b'{"rule": "hot", "device": "d-1"}'),
            b"GET /alarms HTTP/1.1\r\n\r\n",
            b"GET /alarms/ack HTTP/1.1\r\n\r\n",
            b"POST /alarms/ack HTTP/1.1\r\n\r\n",
            post("/alarms/ack", b"x" * 5000),
            post("/alarms/ack", b"", length=-1),
            post("/alarms/ack", b"not json"),
            post("/alarms/ack", b'["hot", "d-1"]'),
            post("/alarms/ack", b'{"rule": "hot", "device": "d-1", "extra": 1}'),
            post("/alarms/ack", b'{"rule": "hot", "device": 7}'),
            post("/alarms", b"{}"),
        ]
        results = [await get(server.port, request) for request in requests]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return results

    (
        listed,
        missing,
        ack,
        listed_again,
        ack_get,
        no_length,
        too_large,
        bad_length,
        not_json,
        not_object,
        extra_key,
        not_text,
        post_list,
    ) = asyncio.run(scenario())
    assert listed[0] == "HTTP/1.1 200 OK"
    assert json.loads(listed[1]) == [{**raised[0], "acknowledged": False}]
    assert missing[0].startswith("HTTP/1.1 404") and "no raised alarm" in json.loads(missing[1])["error"]
    assert ack[0] == "HTTP/1.1 200 OK" and json.loads(ack[1])["acknowledged"] is True
    assert acked == [("hot", "d-1")]
    assert json.loads(listed_again[1])[0]["acknowledged"] is True
    assert ack_get[0].startswith("HTTP/1.1 405")
    assert no_length[0].startswith("HTTP/1.1 411")
    assert too_large[0].startswith("HTTP/1.1 413")
    for response in (bad_length, not_json, not_object, extra_key, not_text):
        assert response[0].startswith("HTTP/1.1 400"), response
        assert json.loads(response[1])["error"]
    assert post_list[0].startswith("HTTP/1.1 405")


def test_without_alarm_callbacks_the_alarm_routes_do_not_exist() -> None:
    async def scenario() -> tuple[str, str]:
        server = StatusServer("127.0.0.1", 0, dict)
        started = asyncio.Event()
        task = asyncio.create_task(server.run(started))
        await started.wait()
        result = await get(server.port, b"GET /alarms HTTP/1.1\r\n\r\n")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return result

    assert asyncio.run(scenario())[0].startswith("HTTP/1.1 404")


def test_reload_counters_are_exported() -> None:
    text = render_metrics({"rule_reloads": 2, "rule_reload_failures": 1, "rules_loaded": 4})
    assert "tidegate_rule_reloads_total 2\n" in text
    assert "tidegate_rule_reload_failures_total 1\n" in text
    assert "# TYPE tidegate_rules_loaded gauge\ntidegate_rules_loaded 4\n" in text


def test_devices_route_lists_devices_only_when_given() -> None:
    rows = [{"device": "gh-1", "status": "online"}]

    async def scenario() -> tuple[tuple[str, str], tuple[str, str]]:
        with_devices = StatusServer("127.0.0.1", 0, dict, devices=lambda: rows)
        without = StatusServer("127.0.0.1", 0, dict)
        started, started_too = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(with_devices.run(started)),
            asyncio.create_task(without.run(started_too)),
        ]
        await started.wait()
        await started_too.wait()
        listed = await get(with_devices.port, b"GET /devices HTTP/1.1\r\n\r\n")
        missing = await get(without.port, b"GET /devices HTTP/1.1\r\n\r\n")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return listed, missing

    listed, missing = asyncio.run(scenario())
    assert listed[0] == "HTTP/1.1 200 OK" and json.loads(listed[1]) == rows
    assert missing[0].startswith("HTTP/1.1 404")
