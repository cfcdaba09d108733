"""The demo's live console view: devices, message rate, alerts and commands, redrawn twice a second."""

from __future__ import annotations

import asyncio
import time

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gateway.app import Gateway

REFRESH = 0.5
MAX_ROWS = 20


class LiveView:
    """Render the gateway's state to the terminal until cancelled."""

    def __init__(self, gateway: Gateway, started: float) -> None:
        self._gateway = gateway
        gateway.ingest.latest_limit = MAX_ROWS  # ingest keeps the last event of this many devices for us
        self._started = started
        self._last_received = 0
        self._last_time = time.monotonic()
        self._rate = 0.0

    def _render(self) -> Group:
        gateway = self._gateway
        stats = gateway.snapshot()
        now = time.monotonic()
        elapsed = now - self._last_time
        if elapsed >= 1.0:
            self._rate = (stats["received"] - self._last_received) / elapsed
            self._last_received, self._last_time = stats["received"], now
        raised = {(a.rule_id, a.device_id) for a in gateway.engine.active_alarms()}
        header = Text.assemble(
            ("tidegate demo ", "bold cyan"),
            f"{now - self._started:5.0f}s   ",
            f"{self._rate:7.1f} msg/s   received {stats['received']}   stored {stats['stored']}   ",
            f"alerts {stats['alerts']}   commands sent {stats['commands_sent']} acked {stats['commands_acked']}",
        )
        table = Table(expand=False)
        for column in ("device", "seq", "temperature", "humidity", "fan", "alarm"):
            table.add_column(column)
        latest = gateway.ingest.latest
        for device_id in sorted(latest)[:MAX_ROWS]:
            event = latest[device_id]
            alarm = ", ".join(rule for rule, dev in sorted(raised) if dev == device_id)
            table.add_row(
                device_id,
                str(event.seq if event.seq is not None else ""),
                _fmt(event.fields.get("temperature")),
                _fmt(event.fields.get("humidity")),
                _fan(event.fields.get("fan")),
                Text(alarm or "ok", style="bold red" if alarm else "green"),
            )
        return Group(header, table, Text("Ctrl-C stops the demo and prints the summary", style="dim"))

    async def run(self) -> None:
        """Redraw until cancelled."""
        with Live(self._render(), auto_refresh=False, transient=False) as live:
            while True:
                await asyncio.sleep(REFRESH)
                live.update(self._render(), refresh=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return "" if value is None else str(value)


def _fan(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ""
