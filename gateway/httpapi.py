"""A small HTTP endpoint for operations: Prometheus `/metrics`, `/healthz`, a JSON `/status`, and alarms.

Routes: `GET /metrics`, `GET /healthz`, `GET /status`, `GET /alarms` (the raised alarms as a JSON
list), `GET /devices` (devices with type, status, last seen, rate and alarm count, a JSON list) and `POST /alarms/ack` with a JSON body `{"rule": ..., "device": ...}` (200 with the alarm,
404 if no such alarm is raised, 400 for a malformed body).

Commands: `POST /commands` with `{"device": ..., "name": ..., "params": {...}, "ttl": S, "wait": S}`
(`params`, `ttl` and `wait` optional) sends a command and, with `wait`, holds the answer up to that
many seconds for the outcome. It answers with the command as JSON (`id`, `status`, `detail`, ...):
200 when the outcome is known (`ok`, `error`, `timed_out`, `expired`), 202 while it is still
`queued` or `sent`, 422 when it was `rejected` (not on the allow-list, a bound reached, ...), 400
for a malformed body. `GET /commands` lists pending and recently finished commands. With a command
token configured (`commands.token`), `POST /commands` needs `Authorization: Bearer <token>`; a
request without it gets 401 and its command is audited as `rejected`.

Hand-written on asyncio streams because it serves a few fixed routes to a scraper and the CLI; a web
framework would be the largest dependency in the gateway for that. Request bodies are bounded
(`MAX_BODY`, `MAX_COMMAND_BODY`, read only after the declared length is checked) and must be JSON objects.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

log = logging.getLogger(__name__)
MAX_REQUEST_LINE = 8_192
MAX_BODY = 4_096  # an ack body is two ids; anything near this is not one
MAX_COMMAND_BODY = 16_384  # a command with its params
MAX_COMMAND_WAIT = 3_600.0  # seconds a `POST /commands` may hold the connection for the outcome
READ_TIMEOUT = 5.0
_NOT_FOUND_TEXT = "try /metrics, /healthz, /status, /alarms, /devices or /commands\n"
_COMMAND_KEYS = {"device", "name", "params", "ttl", "wait"}
_PENDING_STATES = ("queued", "sent")

AlarmList = Callable[[], list[dict[str, Any]]]
DeviceList = Callable[[], list[dict[str, Any]]]
Acknowledge = Callable[[str, str], Mapping[str, Any] | None]


class CommandService(Protocol):
    """Sends commands and lists them (gateway.commands.CommandDispatcher)."""

    async def submit(
        self, device_id: str, name: str, params: Mapping[str, Any], *, ttl: float | None, wait: float
    ) -> dict[str, Any]:
        """Send a command, wait up to `wait` seconds for its outcome, return it as plain data."""
        ...

    def refuse(self, device_id: str, name: str, params: Mapping[str, Any], reason: str) -> dict[str, Any]:
        """Audit a command refused before it was looked at (e.g. unauthorised), return it as plain data."""
        ...

    def list_commands(self) -> list[dict[str, Any]]:
        """Return pending and recently finished commands as plain data."""
        ...


# name -> (type, help); counters are monotonic, gauges go up and down
METRICS: dict[str, tuple[str, str]] = {
    "received": ("counter", "Telemetry messages delivered by the broker"),
    "written": ("counter", "Telemetry messages whose points are all stored (and acked)"),
    "rejected": ("counter", "Telemetry messages rejected with a reason (dead-lettered)"),
    "messages_stored": ("counter", "Telemetry messages whose points were all written to the store"),
    "messages_spooled": ("counter", "Telemetry messages acked with points in the spool (store failing)"),
    "messages_dead_lettered": ("counter", "Telemetry messages with points the store refused (dead-lettered)"),
    "in_flight": ("gauge", "Telemetry messages received and not yet handed off (unacked)"),
    "seq_gaps": ("counter", "Runs of seqs a device skipped (messages lost before the gateway)"),
    "seq_missing": ("counter", "Seqs in those runs"),
    "seq_late": ("counter", "Seqs reported missing that arrived later, out of order"),
    "seq_gaps_unverified": ("counter", "Seq jumps after a crash restart (the previous run may have them)"),
    "rule_late_events": ("counter", "Events too late for windowed rules (stored, not evaluated by them)"),
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
    "commands_expired": ("counter", "Commands whose TTL passed before they could be sent"),
    "commands_retries": ("counter", "Commands published again (same id) after no ack"),
    "commands_queued": ("counter", "Commands that waited before their first publish"),
    "command_acks_unmatched": ("counter", "Acks matching no pending command (unknown or late)"),
    "commands_pending": ("gauge", "Commands queued or awaiting an ack"),
    "commands_waiting": ("gauge", "Commands queued, not yet sent"),
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
    "rule_reloads": ("counter", "Rule sets swapped in by a reload (file change or SIGHUP)"),
    "rule_reload_failures": ("counter", "Reloads refused because a rule file had problems"),
    "devices_quarantined": ("counter", "Telemetry messages of unregistered devices stored apart"),
    "device_status_changes": ("counter", "Device online/offline changes recorded"),
    "checkpoints_written": ("counter", "Rule-state checkpoints written to disk"),
    "checkpoint_failures": ("counter", "Rule-state checkpoints that could not be written"),
    "mqtt_connected": ("gauge", "1 while connected to the broker"),
    "rules_loaded": ("gauge", "Rules in force"),
    "spool_points": ("gauge", "Points held in the on-disk spool"),
    "spool_bytes": ("gauge", "Bytes held in the on-disk spool"),
    "pending_points": ("gauge", "Points waiting to be written"),
    "tasks": ("gauge", "asyncio tasks in the gateway's event loop (flat when nothing leaks)"),
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


class _BadRequest(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _content_length(head: bytes, limit: int = MAX_BODY) -> int:
    """Return the declared body length from the request head, or raise `_BadRequest`."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-length":
            text = value.strip()
            if not text.isdigit() or len(text) > 9:
                raise _BadRequest("400 Bad Request", "invalid Content-Length")
            length = int(text)
            if length > limit:
                raise _BadRequest("413 Content Too Large", f"body larger than {limit} bytes")
            return length
    raise _BadRequest("411 Length Required", "send the JSON body with a Content-Length")


def _parse_ack_body(body: bytes) -> tuple[str, str]:
    """Return (rule, device) from an ack body `{"rule": ..., "device": ...}`, or raise `_BadRequest`."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise _BadRequest("400 Bad Request", "the body is not JSON") from None
    if not isinstance(data, dict) or set(data) != {"rule", "device"}:
        raise _BadRequest("400 Bad Request", 'expected {"rule": "<rule id>", "device": "<device id>"}')
    rule, device = data["rule"], data["device"]
    if not isinstance(rule, str) or not isinstance(device, str) or not rule or not device:
        raise _BadRequest("400 Bad Request", "rule and device must be non-empty text")
    return rule, device


def _bearer_token(head: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip().decode("latin-1")
    return None


def _parse_command_body(body: bytes) -> tuple[str, str, dict[str, Any], float | None, float]:
    """Return (device, name, params, ttl, wait) from a `POST /commands` body, or raise `_BadRequest`."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise _BadRequest("400 Bad Request", "the body is not JSON") from None
    expected = '{"device": "<id>", "name": "<command>", "params": {...}, "ttl": <s>, "wait": <s>}'
    if not isinstance(data, dict) or not {"device", "name"} <= set(data) or not set(data) <= _COMMAND_KEYS:
        raise _BadRequest("400 Bad Request", f"expected {expected}")
    device, name, params = data["device"], data["name"], data.get("params", {})
    if not isinstance(device, str) or not isinstance(name, str) or not device or not name:
        raise _BadRequest("400 Bad Request", "device and name must be non-empty text")
    if not isinstance(params, dict):
        raise _BadRequest("400 Bad Request", "params must be a JSON object")
    ttl, wait = data.get("ttl"), data.get("wait", 0)
    if ttl is not None and not _positive_number(ttl):
        raise _BadRequest("400 Bad Request", "ttl must be a number of seconds greater than 0")
    if not _positive_number(wait, zero=True) or wait > MAX_COMMAND_WAIT:
        raise _BadRequest(
            "400 Bad Request", f"wait must be a number of seconds from 0 to {MAX_COMMAND_WAIT:g}"
        )
    return device, name, params, None if ttl is None else float(ttl), float(wait)


def _positive_number(value: object, *, zero: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value >= 0 if zero else value > 0


class StatusServer:
    """Serve `/metrics`, `/healthz` and `/status` from a snapshot function, and alarms if given.

    Args:
        snapshot: the gateway's counters.
        alarms: lists the raised alarms (`/alarms` answers 404 without it).
        acknowledge: acknowledges (rule, device), returning the alarm or None if none is raised.
        devices: lists the devices (`/devices` answers 404 without it).
        commands: sends and lists commands (`/commands` answers 404 without it).
        command_token: the bearer token `POST /commands` requires (None: no token needed).
    """

    def __init__(
        self,
        host: str,
        port: int,
        snapshot: Callable[[], Mapping[str, Any]],
        *,
        alarms: AlarmList | None = None,
        acknowledge: Acknowledge | None = None,
        devices: DeviceList | None = None,
        commands: CommandService | None = None,
        command_token: str | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._snapshot = snapshot
        self._alarms = alarms
        self._acknowledge = acknowledge
        self._devices = devices
        self._commands = commands
        self._command_token = command_token
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
                parts = request[:MAX_REQUEST_LINE].split(b"\r\n", 1)[0].split()
                method, path = (parts[0], parts[1].split(b"?")[0]) if len(parts) >= 2 else (b"", b"")
                body = b""
                if method == b"POST" and path == b"/alarms/ack" and self._acknowledge is not None:
                    body = await reader.readexactly(_content_length(request))
                elif method == b"POST" and path == b"/commands" and self._commands is not None:
                    body = await reader.readexactly(_content_length(request, MAX_COMMAND_BODY))
        except _BadRequest as exc:
            await self._respond(writer, exc.status, "application/json", _error(exc.message))
            return
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        if path == b"/commands" and method == b"POST" and self._commands is not None:
            status, kind, text = await self._send_command(self._commands, body, _bearer_token(request))
        else:
            status, kind, text = self._route(method, path, body)
        await self._respond(writer, status, kind, text)

    async def _send_command(
        self, commands: CommandService, body: bytes, token: str | None
    ) -> tuple[str, str, str]:
        try:
            device, name, params, ttl, wait = _parse_command_body(body)
        except _BadRequest as exc:
            return exc.status, "application/json", _error(exc.message)
        expected = self._command_token
        if expected is not None and (
            token is None or not hmac.compare_digest(token.encode(), expected.encode())
        ):
            reason = "unauthorised: missing or wrong bearer token (commands.token)"
            view = commands.refuse(device, name, params, reason)
            return "401 Unauthorized", "application/json", json.dumps({**view, "error": reason}, default=str)
        view = await commands.submit(device, name, params, ttl=ttl, wait=wait)
        if view["status"] == "rejected":
            status = "422 Unprocessable Content"
        elif view["status"] in _PENDING_STATES:
            status = "202 Accepted"
        else:
            status = "200 OK"
        return status, "application/json", json.dumps(view, default=str)

    def _route(self, method: bytes, path: bytes, body: bytes) -> tuple[str, str, str]:
        if path == b"/alarms/ack" and self._acknowledge is not None:
            if method != b"POST":
                return "405 Method Not Allowed", "text/plain", "POST only\n"
            try:
                rule, device = _parse_ack_body(body)
            except _BadRequest as exc:
                return exc.status, "application/json", _error(exc.message)
            alarm = self._acknowledge(rule, device)
            if alarm is None:
                return (
                    "404 Not Found",
                    "application/json",
                    _error(f"no raised alarm for rule {rule!r} on {device!r}"),
                )
            return "200 OK", "application/json", json.dumps(alarm, default=str)
        if method != b"GET":
            return "405 Method Not Allowed", "text/plain", "GET only\n"
        if path == b"/metrics":
            return "200 OK", "text/plain; version=0.0.4", render_metrics(self._snapshot())
        if path == b"/healthz":
            snapshot = self._snapshot()
            healthy = bool(snapshot.get("mqtt_connected")) and not snapshot.get("store_failing")
            health = json.dumps(
                {"healthy": healthy, **{k: snapshot.get(k) for k in ("mqtt_connected", "store_failing")}}
            )
            return ("200 OK" if healthy else "503 Service Unavailable"), "application/json", health
        if path == b"/status":
            return "200 OK", "application/json", json.dumps(self._snapshot(), default=str)
        if path == b"/alarms" and self._alarms is not None:
            return "200 OK", "application/json", json.dumps(self._alarms(), default=str)
        if path == b"/devices" and self._devices is not None:
            return "200 OK", "application/json", json.dumps(self._devices(), default=str)
        if path == b"/commands" and self._commands is not None:
            return "200 OK", "application/json", json.dumps(self._commands.list_commands(), default=str)
        return "404 Not Found", "text/plain", _NOT_FOUND_TEXT

    async def _respond(self, writer: asyncio.StreamWriter, status: str, kind: str, body: str) -> None:
        payload = body.encode()
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        try:
            writer.write(head.encode() + payload)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def _error(message: str) -> str:
    return json.dumps({"error": message})
