"""Show a simulation's progress while it runs, and its summary at the end (for `tidegate simulate`)."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, Self, TextIO

from simulator.runner import SimulationSummary

PLAIN_EVERY = 5.0  # seconds between progress lines when the output is not a terminal


def progress_line(summary: SimulationSummary, rate: float | None = None) -> str:
    """One line: elapsed, throughput, faults, commands and errors so far."""
    kinds = summary.sent_by_kind
    parts = [
        f"{summary.elapsed:6.1f}s",
        f"{summary.devices:,} devices/{summary.connections} conn",
        f"sent {summary.sent:,}" + (f" ({rate:,.0f}/s)" if rate is not None else ""),
        f"malformed {summary.malformed:,}",
        f"late {kinds.get('late', 0):,}",
        f"offline {summary.offline:,}",
        f"disconnects {summary.disconnects:,}",
        f"commands {summary.commands_received:,} in/{summary.commands_acked:,} acked",
        f"errors {summary.errors}",
    ]
    if summary.lag > 1.0:
        parts.append(f"lag {summary.lag:.1f}s")
    return "  ".join(parts)


def summary_text(summary: SimulationSummary) -> str:
    """The end-of-run report, a few aligned lines."""
    kinds = ", ".join(f"{kind} {count:,}" for kind, count in sorted(summary.sent_by_kind.items())) or "none"
    rows = [
        ("devices", f"{summary.devices:,} over {summary.connections} connection(s), seed {summary.seed}"),
        ("elapsed", f"{summary.elapsed:.1f}s"),
        (
            "telemetry sent",
            f"{summary.sent:,} messages, {summary.readings:,} readings, {summary.malformed:,} malformed",
        ),
        ("sent by kind", kinds),
        ("disconnects", f"{summary.disconnects:,} (readings dropped by design {summary.dropped:,})"),
        (
            "commands",
            f"{summary.commands_received:,} received, {summary.commands_acked:,} acked "
            f"({summary.commands_rejected:,} error, {summary.commands_expired:,} expired, "
            f"{summary.commands_repeated:,} repeats), {summary.commands_ignored:,} ignored",
        ),
        ("not sent", f"{summary.held:,} readings held at the end, {summary.unsent:,} messages undelivered"),
        ("errors", f"{summary.errors:,} (reconnects {summary.reconnects:,}), most lag {summary.lag:.2f}s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class ProgressDisplay:
    """A live line on a terminal (rich), or a plain line every few seconds otherwise.

    Use as a context manager and pass `update` as the simulation's `on_progress`.
    """

    def __init__(
        self, stream: TextIO | None = None, *, live: bool | None = None, every: float = PLAIN_EVERY
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._live_wanted = self._stream.isatty() if live is None else live
        self._every = every
        self._live: Any = None
        self._last_print = time.monotonic()
        self._last: tuple[float, int] | None = None  # (elapsed, sent) of the previous update
        self._rate: float | None = None

    def __enter__(self) -> Self:
        if self._live_wanted:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                "starting ...", console=Console(file=self._stream), auto_refresh=False, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(t, e, tb)
            self._live = None

    def update(self, summary: SimulationSummary) -> None:
        """Show `summary` (called every 0.5 s by the simulation)."""
        if self._last is not None and summary.elapsed - self._last[0] >= 0.25:
            self._rate = (summary.sent - self._last[1]) / (summary.elapsed - self._last[0])
        if self._last is None or summary.elapsed - self._last[0] >= 0.25:
            self._last = (summary.elapsed, summary.sent)
        line = progress_line(summary, self._rate)
        if self._live is not None:
            from rich.text import Text

            # Plain text on one line: no markup or number highlighting, cut to the terminal's width.
            self._live.update(Text(line, no_wrap=True, overflow="ellipsis"), refresh=True)
            return
        now = time.monotonic()
        if now - self._last_print >= self._every:
            self._last_print = now
            print(line, file=self._stream, flush=True)
