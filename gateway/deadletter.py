"""The dead-letter file: every payload and point tidegate refuses, with the reason, one JSON per line.

Bad payloads are also published to the MQTT dead-letter topic; the file is the record that stays
when nobody listens there, and the only record of points the store refused. It rotates once it
exceeds `max_bytes` (one previous file kept as `<name>.1`), so it cannot fill the disk.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from gateway.store.base import Point

log = logging.getLogger(__name__)


class DeadLetterFile:
    """Append refused input to a JSON-lines file.

    Writes go straight to the OS page cache (a few microseconds, acceptable on the event loop for
    what is a rare path); `sync()` makes them durable. The gateway syncs before acknowledging a
    dead-lettered message; records that arrive together share one fsync.
    """

    def __init__(self, path: Path, *, max_bytes: int = 100 * 1024 * 1024) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._file: IO[str] | None = None
        self._dirty = False
        self.records = 0
        self.failures = 0

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def _append(self, record: dict[str, Any]) -> None:
        try:
            handle = self._open()
            if handle.tell() > self._max_bytes:
                self._rotate()
                handle = self._open()
            handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            handle.flush()
            self._dirty = True
            self.records += 1
        except OSError as exc:  # a full disk must not stop the flow; the log line is then the record
            self.failures += 1
            log.error("cannot write dead-letter file %s: %s; record: %s", self.path, exc, record)

    def _rotate(self) -> None:
        assert self._file is not None
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))

    def payload(
        self, *, topic: str, device_id: str | None, reason: str, received_at: float, payload: bytes
    ) -> None:
        """Record a refused MQTT payload (kept whole up to 64 KiB, as text with bad bytes replaced)."""
        self._append(
            {
                "kind": "payload",
                "received_at": received_at,
                "topic": topic,
                "device_id": device_id,
                "reason": reason,
                "payload_bytes": len(payload),
                "payload": payload[:65_536].decode("utf-8", errors="replace"),
            }
        )

    def points(self, points: list[Point], reason: str, at: float) -> None:
        """Record points the store refused, with the store's reason."""
        for point in points:
            self._append(
                {
                    "kind": "point",
                    "at": at,
                    "reason": reason,
                    "measurement": point.measurement,
                    "tags": dict(point.tags),
                    "fields": dict(point.fields),
                    "ts": point.ts,
                }
            )

    def sync(self) -> None:
        """Make appended records durable (a no-op when nothing was appended since the last sync)."""
        if self._file is not None and self._dirty:
            self._dirty = False
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                self.failures += 1
                log.error("cannot fsync dead-letter file %s: %s", self.path, exc)

    def close(self) -> None:
        """Flush, sync and close the file."""
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
