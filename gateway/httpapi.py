"""A small HTTP endpoint for operations: Prometheus `/metrics`, `/healthz` and a JSON `/status`.

Hand-written on asyncio streams because it serves three fixed GET routes to a scraper; a web
framework would be the largest dependency in the gateway for that.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)
MAX_REQUEST_LINE = 8_192
READ_TIMEOUT = 5.0

# name -> (type, help); counters are monotonic, gauges go up and down
METRICS: dict[str, tuple[str, str]] = {
    "received": ("counter", "Telemetry messages delivered by the broker"),
    "written": ("counter", "Telemetry messages whose points are all stored (and acked)"),
    "rejected": ("counter", "Telemetry messages rejected with a reason (dead-lettered)"),
    "duplicates": ("counter", "Redelivered events (same device and seq), stored again but not re-evaluated"),
    "events": ("counter", "Telemetry events decoded"),
    "stored": ("counter", "Telemetry events stored"),
    "alerts_raised": ("counter", "Alarms raised"),
    "alerts_cleared": ("counter", "Alarms cleared"),
    "commands_sent": ("counter", "Commands published to devices"),
    "commands_acked": ("counter", "Commands acked by devices (ok or error)"),
    "commands_failed": ("counter", "Commands acked with status error"),
    "commands_timed_out": ("counter", "Commands without an ack in time"),
    "commands_rejected": ("counter", "Commands refused before sending"),
    "points_rejected": ("counter", "Points the store refused for good"),
    "dead_letter_records": ("counter", "Records written to the dead-letter file"),
    "store_retries": ("counter", "Store writes retried"),
    "mqtt_reconnects": ("counter", "Reconnections to the broker"),
    "sessions_lost": ("counter", "Reconnections where the broker had not kept our session"),
    "backpressure_pauses": ("counter", "Times reading from the broker paused for the store"),
    "points_spooled": ("counter", "Points written to the on-disk spool while the store failed"),
    "points_drained": ("counter", "Points drained from the spool into the store"),
    "spool_corrupt_segments": ("counter", "Spool segments found corrupt and moved aside"),
    "session_loss_windows": ("counter", "Time windows in which messages for us may have been lost"),
    "mqtt_connected": ("gauge", "1 while connected to the broker"),
    "spool_points": ("gauge", "Points held in the on-disk spool"),
    "spool_bytes": ("gauge", "Bytes held in the on-disk spool"),
    "pending_points": ("gauge", "Points waiting to be written"),
}


def render_metrics(snapshot: Mapping[str, Any]) -> str:
    """Render the snapshot in the Prometheus text exposition format."""
    lines = []
    for name, (kind, help_text) in METRICS.items():
        if name not in snapshot:
            continue
        value = snapshot[name]
        full = f"tidegate_{name}_total" if kind == "counter" else f"tidegate_{name}"
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {float(value):g}"]
    return "\n".join(lines) + "\n"


class StatusServer:
    """Serve `/metrics`, `/healthz` and `/status` from a snapshot function."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self._host, self._port = host, port
        self._snapshot = snapshot
        self.port = port  # the bound port once running (useful with port 0)

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Serve until cancelled."""
        server = await asyncio.start_server(self._handle, self._host, self._port)
        self.port = server.sockets[0].getsockname()[1]
        log.info("status endpoint on http://%s:%s/metrics", self._host, self.port)
        if started is not None:
            started.set()
        async with server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        parts = request[:MAX_REQUEST_LINE].split(b"\r\n", 1)[0].split()
        method, path = (parts[0], parts[1].split(b"?")[0]) if len(parts) >= 2 else (b"", b"")
        if method != b"GET":
            status, kind, body = "405 Method Not Allowed", "text/plain", "GET only\n"
        elif path == b"/metrics":
            status, kind, body = "200 OK", "text/plain; version=0.0.4", render_metrics(self._snapshot())
        elif path == b"/healthz":
            snapshot = self._snapshot()
            healthy = bool(snapshot.get("mqtt_connected")) and not snapshot.get("store_failing")
            status = "200 OK" if healthy else "503 Service Unavailable"
            kind = "application/json"
            body = json.dumps(
                {"healthy": healthy, **{k: snapshot.get(k) for k in ("mqtt_connected", "store_failing")}}
            )
        elif path == b"/status":
            status, kind, body = "200 OK", "application/json", json.dumps(self._snapshot(), default=str)
        else:
            status, kind, body = "404 Not Found", "text/plain", "try /metrics, /healthz or /status\n"
        payload = body.encode()
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        try:
            writer.write(head.encode() + payload)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
