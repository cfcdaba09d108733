"""Keep the rule engine's state and the redelivery memory on local disk, so a restart carries on.

The state file is one JSON document::

    {"format": "tidegate-state", "version": 1, "rules": <RuleEngine.checkpoint()>,
     "seqs": <SeqTracker.export_state()>}

It is written like a spool segment: to `<file>.tmp`, fsynced, renamed over the file, and the
directory fsynced, so after a crash the file holds the last complete checkpoint or the one before.

Consistency with the store: the engine's state and the (device, seq) pairs are snapshotted together
on the event loop; the file is written only once every point queued before the snapshot (alert
records among them) has been written, so a checkpoint never claims an alert that a crash could
lose. Messages evaluated after the snapshot are not in it: after a crash they are redelivered
(unacknowledged) and evaluated again by the restored engine, as if for the first time. Commands are
sent at once, not through the store, so such a redelivery may send one again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from devices.dedupe import SeqTracker
from gateway.durable import write_atomically
from gateway.store.batcher import BatchWriter
from rules.action import Action
from rules.checkpoint import CheckpointError
from rules.engine import RuleEngine

log = logging.getLogger(__name__)

STATE_FORMAT: Final = "tidegate-state"
STATE_VERSION: Final = 1
CORRUPT_SUFFIX: Final = ".corrupt"


def write_state_file(path: Path, data: Mapping[str, Any]) -> int:
    """Write `data` as JSON to `path` atomically and durably; return the size in bytes."""
    encoded = json.dumps(data, separators=(",", ":")).encode()
    write_atomically(path, encoded)
    return len(encoded)


def read_state_file(path: Path) -> Any:
    """Return the decoded state file, or None if there is none.

    Raises:
        CheckpointError: the file cannot be read or is not JSON.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not JSON ({exc})") from exc


class RuleStateCheckpointer:
    """Restore the engine and dedupe state at start, checkpoint it every `interval` and at the end.

    Attributes:
        written: checkpoints written.
        failures: checkpoints that could not be written (the previous file stays).
    """

    def __init__(
        self,
        path: Path,
        *,
        engine: RuleEngine,
        seqs: SeqTracker,
        writer: BatchWriter,
        interval: float,
    ) -> None:
        self.path = path
        self._engine = engine
        self._seqs = seqs
        self._writer = writer
        self._interval = interval
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future[int] | None = None
        self._closed = False
        self.written = 0
        self.failures = 0

    async def restore(self, now: float) -> list[Action]:
        """Load the state file into the engine and the dedupe memory; return the actions it causes.

        A missing file starts fresh. A file that cannot be used is logged, moved aside to
        `<file>.corrupt`, and ignored: the gateway starts fresh rather than not at all.
        """
        try:
            data = await asyncio.to_thread(read_state_file, self.path)
            if data is None:
                log.info("no rule state file at %s; rules start fresh", self.path)
                return []
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
                raise CheckpointError(f"{self.path}: not a tidegate state file")
            if data.get("version") != STATE_VERSION:
                raise CheckpointError(
                    f"{self.path}: version {data.get('version')!r} is not the supported {STATE_VERSION}"
                )
            try:
                self._seqs.restore_state(data.get("seqs"))
            except ValueError as exc:
                raise CheckpointError(f"{self.path}: seqs: {exc}") from exc
            try:
                actions = self._engine.restore(data.get("rules"), now)
            except CheckpointError:
                self._seqs.restore_state({})  # the two are only consistent together
                raise
        except CheckpointError as exc:
            log.error("ignoring rule state file: %s; rules start fresh", exc)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(
                    os.replace, self.path, self.path.with_name(self.path.name + CORRUPT_SUFFIX)
                )
            return []
        log.info(
            "restored rule state from %s: %d active alarm(s), %d device(s) with seqs",
            self.path,
            len(self._engine.active_alarms()),
            len(self._seqs),
        )
        return actions

    async def run(self) -> None:
        """Checkpoint every `interval` seconds; runs until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.checkpoint()

    async def checkpoint(self) -> bool:
        """Snapshot the state, wait until everything queued before it is written, write the file."""
        async with self._lock:
            if self._closed:
                return False
            data = self._snapshot()
            written = asyncio.Event()
            self._writer.add([], written.set)
            await written.wait()
            return await self._write(data)

    async def close(self) -> bool:
        """Write the last checkpoint; call once the writer has written everything (clean shutdown)."""
        async with self._lock:
            self._closed = True
            return await self._write(self._snapshot())

    def _snapshot(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "rules": self._engine.checkpoint(),
            "seqs": self._seqs.export_state(),
        }

    async def _write(self, data: dict[str, Any]) -> bool:
        previous = self._inflight
        if previous is not None and not previous.done():
            # A write whose caller was cancelled runs on in its thread; never two at once.
            await asyncio.wait([previous])
        task = asyncio.ensure_future(asyncio.to_thread(write_state_file, self.path, data))
        task.add_done_callback(self._on_written)
        self._inflight = task
        with contextlib.suppress(OSError):
            await asyncio.shield(task)
        return not task.cancelled() and task.exception() is None

    def _on_written(self, task: asyncio.Future[int]) -> None:
        # Counted here rather than by the awaiting caller, which may have been cancelled meanwhile.
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self.written += 1
        elif isinstance(error, OSError):
            self.failures += 1
            log.error("could not write rule state file %s: %s", self.path, error)
