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
