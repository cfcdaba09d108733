"""Batch points for a store, retry or spool failed batches in order, and acknowledge them once handed off."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from gateway.store.base import Point, RejectedPointsError, Store, StoreError
from gateway.store.spool import Segment, Spool, SpoolFullError, UnspoolablePointsError

__all__ = ["BatchWriter", "HandOff"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Marks a `_callbacks` entry made by `add` (called without arguments), not by `add_grouped`.
_SINGLE: Final[Any] = object()


# Callbacks (or grouped items) made per event-loop turn once a batch is handed off: the acks of a
# 5,000-message batch held the loop ~7 ms in one go (the bench's paced diagnostics; ~2 ms per 1,000),
# and incoming messages and command publishes waited behind them.
CALLBACKS_PER_TURN: Final = 1_000


def _no_group(items: list[Any]) -> None:
    """Stand in for a group's callback until the group has its first item."""
    raise AssertionError("a group of add_grouped items without a callback")


class HandOff(enum.Enum):
    """How the points of one `add` call were handed off (`BatchWriter.current_hand_off`)."""

    STORED = "stored"  # every point written to the store (or there were none)
    SPOOLED = "spooled"  # some went to the spool (the store was failing), none refused
    REFUSED = "refused"  # at least one was refused for good (`on_rejected` has it); the rest handed off


class BatchWriter:
    """Collect points from the ingest, write them to a store in batches, and report when each is handed off.

    `add` is called synchronously on the event loop (from the MQTT client's callback) and only
    appends; `run` is the flush loop, to be run in the caller's TaskGroup. A batch is written when
    `batch_size` points are pending or `flush_interval` seconds after its oldest point arrived.

    Nothing is dropped. Without a spool, a batch that fails with RetryableStoreError is retried
    unchanged, with exponential backoff and jitter, forever, and later batches wait behind it, so
    order is kept. With a `spool` (see gateway/store/spool.py), such a batch goes to the spool
    instead, and so does every later batch while the spool holds anything; a second loop inside
    `run` drains the spool oldest first, with backoff and jitter, deleting a segment only once the
    store took it. A spool left by an earlier run is drained before anything newer. When the spool
    is full the batch stays here, unacknowledged, until the drain makes room.

    Points a store refuses for good (RejectedPointsError) go to `on_rejected`, the rest count as
    written. `on_written` callbacks (the MQTT PUBACKs) fire in the order they were added, each once
    all its points are handed off: written, rejected, or fsynced to the spool; while one runs,
    `current_hand_off` tells which of those happened to its points. `add_grouped` is the cheap form
    for one callback per message: such callbacks, in a row, are made as one call with a list of the
    items they were given, per batch and outcome. Callbacks that are due together are made at most
    `CALLBACKS_PER_TURN` per event-loop turn. When `max_pending` points are held (not yet handed
    off), `is_full` turns true and the ingest should stop reading (`wait_until_not_full`) so the
    broker holds the backlog.

    Cancelling `run` (or bounding `close` with a timeout) loses only points whose callbacks have not
    fired, which the broker will deliver again. `close` does not wait for the spool to drain: what it
    holds is on disk and drains on the next start.
    """

    def __init__(
        self,
        store: Store,
        *,
        batch_size: int = 5000,
        flush_interval: float = 1.0,
        max_pending: int = 50_000,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        on_rejected: Callable[[RejectedPointsError], None] | None = None,
        spool: Spool | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """Create the writer; nothing runs until `run` is awaited.

        Args:
            store: where batches go.
            batch_size: most points per write; a full batch is written at once.
            flush_interval: seconds a point may wait for its batch to fill.
            max_pending: points held (pending and being written) at which `is_full` turns true.
            retry_initial: first retry delay in seconds, doubled on each failure of the same batch.
            retry_max: longest retry delay.
            on_rejected: called with each RejectedPointsError (to dead-letter the points).
            spool: where batches go while the store fails them; opened by `run` (or `close`) and
                closed when it returns. None: retry in place.
            clock: monotonic seconds, for the flush interval (injectable for tests).
            sleep: awaited between retries (injectable for tests).
            jitter: returns a float in [0, 1); each delay is scaled to between 50% and 100%.
        """
        if batch_size < 1 or max_pending < 1:
            raise ValueError(f"batch_size and max_pending must be positive, got {batch_size}, {max_pending}")
        if flush_interval <= 0 or retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError(
                "flush_interval and retry_initial must be positive and retry_max >= retry_initial"
            )
        self._store = store
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._on_rejected = on_rejected
        self._spool = spool
        self._spool_full = False
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter

        self._pending: list[Point] = []
        self._first_pending_at: float | None = None
        # Points are numbered in the order they were added; a callback waits for its last number.
        self._added = 0
        self._done = 0
        # (first, last, callback, item): `item` is _SINGLE for `add`, else what `add_grouped` was given
        self._callbacks: deque[tuple[int, int, Callable[..., None], Any]] = deque()
        # Where points were refused or spooled, by number, kept until no waiting callback covers them.
        self._refused_at: deque[int] = deque()
        self._spooled_ranges: deque[tuple[int, int]] = deque()  # (after, through)
        self.current_hand_off = HandOff.STORED
        self._wakeup = asyncio.Event()
        self._space = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = False
        self._closing = False

        self.written = 0
        self.rejected = 0
        self.retries = 0
        self.batches = 0
        self.spooled = 0  # points handed to the spool
        self.drained = 0  # points written (or refused) from the spool
        self.spool_errors = 0  # appends that failed with an OSError (disk full, I/O error)
        self.spool_full_waits = 0
        self.last_error: str | None = None

    @property
    def spool(self) -> Spool | None:
        """Return the spool, if one is configured."""
        return self._spool

    @property
    def pending(self) -> int:
        """Return how many points are held: waiting for a batch or being written."""
        return self._added - self._done

    @property
    def is_full(self) -> bool:
        """Return whether the ingest should stop reading until points are written."""
        return self._added - self._done >= self._max_pending

    def add(self, points: Sequence[Point], on_written: Callable[[], None] | None = None) -> None:
        """Queue points; call `on_written` (in order with earlier callbacks) once they are all written.

        Cheap and synchronous: meant for the MQTT client's callback on the event loop thread.
        """
        self._queue(points)
        if on_written is not None:
            if self._added == self._done and not self._callbacks:
                self.current_hand_off = HandOff.STORED
                on_written()
            else:
                self._callbacks.append((self._added - len(points), self._added, on_written, _SINGLE))

    def add_grouped(self, points: Sequence[Point], on_written: Callable[[list[T]], None], item: T) -> None:
        """Queue points like `add`; once they are handed off, call `on_written` with a list holding `item`.

        The cheap form of one callback per message (no closure per message, one call per batch):
        items whose points are handed off together, with the same outcome (`current_hand_off`),
        added in a row with the same `on_written` object (`is`, so keep one bound method), go in one
        list, in the order added. Lists and `add` callbacks are called in the order they were added.
        """
        self._queue(points)
        count = len(points)
        if self._added == self._done and not self._callbacks:
            self.current_hand_off = HandOff.STORED
            on_written([item])
        else:
            self._callbacks.append((self._added - count, self._added, on_written, item))

    def _queue(self, points: Sequence[Point]) -> None:
        if self._closing:
            raise RuntimeError("BatchWriter is closed")
        count = len(points)
        if count:
            pending = self._pending
            if not pending:
                self._first_pending_at = self._clock()
                self._wakeup.set()  # the loop may be idle: start the flush interval
            pending.extend(points)
            self._added += count
            if len(pending) >= self._batch_size:
                self._wakeup.set()

    async def wait_until_not_full(self) -> None:
        """Return once fewer than `max_pending` points are held."""
        while self.is_full:
            self._space.clear()
            await self._space.wait()

    async def run(self) -> None:
        """Write batches until `close` is called and everything pending is handed off."""
        if self._running:
            raise RuntimeError("BatchWriter.run is already running")
        if self._closing:
            return
        self._running = True
        self._stopped.clear()
        try:
            spool = self._spool
            if spool is None:
                await self._flush_loop()
                return
            try:
                await spool.open()
                async with asyncio.TaskGroup() as group:
                    drain = group.create_task(self._drain(spool), name="spool-drain")
                    await self._flush_loop()
                    drain.cancel()
            finally:
                await spool.close()
        finally:
            self._running = False
            self._stopped.set()

    async def close(self) -> None:
        """Hand off everything pending, then make `run` return; `add` raises afterwards."""
        self._closing = True
        self._wakeup.set()
        if self._running:
            await self._stopped.wait()
        elif self._pending:
            spool = self._spool
            if spool is not None and not spool.is_open:
                await spool.open()
                try:
                    while self._pending:
                        await self._write_next_batch()
                finally:
                    await spool.close()
            else:
                while self._pending:
                    await self._write_next_batch()

    async def _flush_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._closing and len(self._pending) < self._batch_size:
                started = self._first_pending_at if self._first_pending_at is not None else self._clock()
                delay = started + self._flush_interval - self._clock()
                if delay > 0:
                    self._wakeup.clear()
                    try:
                        async with asyncio.timeout(delay):
                            await self._wakeup.wait()
                    except TimeoutError:
                        pass
                    continue
            await self._write_next_batch()

    async def _write_next_batch(self) -> None:
        size = min(len(self._pending), self._batch_size)
        batch = self._pending[:size]
        del self._pending[:size]
        # Points left behind arrived after this batch's oldest point: keeping its time flushes them
        # early rather than late, without a timestamp per point.
        if not self._pending:
            self._first_pending_at = None
        start = self._done
        if self._spool is None:
            await self._write_in_place(batch, start)
        else:
            await self._hand_off(batch, self._spool, start)
        self.batches += 1
        self._done += len(batch)
        await self._call_back()
        if not self.is_full:
            self._space.set()

    async def _call_back(self) -> None:
        """Make the callbacks whose points are all handed off now, in order (`add_grouped` ones in lists)."""
        callbacks, done = self._callbacks, self._done
        # Nothing refused or spooled (the usual case): every outcome is STORED, none to work out.
        mixed = bool(self._refused_at or self._spooled_ranges)
        outcome = HandOff.STORED
        group: list[Any] = []
        group_call: Callable[[list[Any]], None] = _no_group
        group_outcome = outcome
        made = 0
        while callbacks and callbacks[0][1] <= done:
            if made == CALLBACKS_PER_TURN:
                if group:
                    self.current_hand_off = group_outcome
                    group_call(group)
                    group = []
                made = 0
                # Later adds queue behind what is left, so the order holds; only this task writes
                # batches, so `done` and the outcomes stay as they were.
                await asyncio.sleep(0)
            made += 1
            first, last, callback, item = callbacks.popleft()
            if mixed:
                outcome = self._outcome(first, last)
            if group and (item is _SINGLE or callback is not group_call or outcome is not group_outcome):
                self.current_hand_off = group_outcome
                group_call(group)
                group = []
            if item is _SINGLE:
                self.current_hand_off = outcome
                callback()
            else:
                if not group:
                    group_call, group_outcome = callback, outcome
                group.append(item)
        if group:
            self.current_hand_off = group_outcome
            group_call(group)
        self._forget_outcomes_through(callbacks[0][0] if callbacks else done)

    def _outcome(self, first: int, last: int) -> HandOff:
        """Tell how points `first + 1 .. last` were handed off (all of them are, by now)."""
        self._forget_outcomes_through(first)
        if first == last:
            return HandOff.STORED
        if self._refused_at and self._refused_at[0] <= last:
            return HandOff.REFUSED
        if self._spooled_ranges and self._spooled_ranges[0][0] < last:
            return HandOff.SPOOLED
        return HandOff.STORED

    def _forget_outcomes_through(self, number: int) -> None:
        # Callbacks fire in order and cover ever later numbers: what is at or below `number`
        # concerns none of those still waiting.
        refused, spooled = self._refused_at, self._spooled_ranges
        while refused and refused[0] <= number:
            refused.popleft()
        while spooled and spooled[0][1] <= number:
            spooled.popleft()

    def _note_refused(self, refused: Sequence[Point], batch: Sequence[Point], start: int) -> None:
        """Remember the numbers of `refused` points, taken from `batch` (numbered from `start` + 1)."""
        index = {id(point): start + i for i, point in enumerate(batch, 1)}
        numbers = []
        for point in refused:
            number = index.get(id(point))
            if number is None:  # a store that handed back copies: find them by value
                number = next((start + i for i, p in enumerate(batch, 1) if p == point), None)
            if number is not None:
                numbers.append(number)
        self._refused_at.extend(sorted(numbers))

    async def _write_in_place(self, batch: list[Point], start: int) -> None:
        attempt = 0
        while not await self._try_write(batch, start):
            attempt = await self._back_off(attempt, len(batch))

    async def _hand_off(self, batch: list[Point], spool: Spool, start: int) -> None:
        """Write the batch to the store, or to the spool once the store fails or the spool holds anything."""
        attempt = 0
        numbered = batch  # as numbered, before points the spool cannot hold are taken out
        while True:
            # An empty spool means every earlier batch is in the store, so this one may go straight
            # there; otherwise it must queue behind them.
            if spool.empty:
                if await self._try_write(batch, start, numbered):
                    return
                logger.warning(
                    "store write of %d points failed, spooling them: %s", len(batch), self.last_error
                )
            try:
                await spool.append(batch)
            except SpoolFullError as err:
                self.spool_full_waits += 1
                if not self._spool_full:  # once per episode: a long outage would repeat it per batch
                    self._spool_full = True
                    logger.warning(
                        "%s; holding up to %d points unacknowledged (then reading stops) until the "
                        "store drains it",
                        err,
                        self._max_pending,
                    )
                await spool.wait_for_room()
                continue
            except UnspoolablePointsError as err:
                # No store takes these either (line protocol integers are 64-bit); the rest go on.
                bad = {id(point) for point in err.points}
                self._note_refused(err.points, numbered, start)
                self.rejected += len(bad)
                self.last_error = err.reason
                logger.warning("refusing %d of %d points: %s", len(bad), len(batch), err.reason)
                if self._on_rejected is not None:
                    self._on_rejected(RejectedPointsError(err.reason, err.points))
                batch = [point for point in batch if id(point) not in bad]
                if not batch:
                    return
                continue
            except OSError as err:
                self.spool_errors += 1
                delay = self._retry_delay(attempt)
                attempt += 1
                logger.error(
                    "could not write %d points to the spool, retrying in %.2fs: %s", len(batch), delay, err
                )
                await self._sleep(delay)
                continue
            if self._spool_full:
                self._spool_full = False
                logger.info("the spool has room again after %d wait(s)", self.spool_full_waits)
            self.spooled += len(batch)
            self._spooled_ranges.append((start, start + len(numbered)))
            return

    async def _try_write(
        self, batch: list[Point], start: int | None = None, numbered: list[Point] | None = None
    ) -> bool:
        """Write a batch once; return False when it should be tried again later.

        `start` numbers a new batch's points (from `start` + 1, as in `numbered` when points were
        taken out of it) so that refusals reach the right callbacks; the drain passes None: its
        points were handed off (spooled) long ago.
        """
        try:
            await self._store.write(batch)
        except RejectedPointsError as err:
            if start is not None:
                self._note_refused(err.rejected, batch if numbered is None else numbered, start)
            self._rejected(err, len(batch))
        except StoreError as err:
            # RetryableStoreError, or a store error of unknown kind: retrying keeps the points,
            # dropping them would not.
            self.retries += 1
            self.last_error = str(err)
            return False
        else:
            self.written += len(batch)
        return True

    async def _back_off(self, attempt: int, points: int) -> int:
        """Log the failed attempt, sleep before the next one, and return the next attempt number."""
        delay = self._retry_delay(attempt)
        logger.warning(
            "store write of %d points failed (attempt %d), retrying in %.2fs: %s",
            points,
            attempt + 1,
            delay,
            self.last_error,
        )
        await self._sleep(delay)
        return attempt + 1

    def _rejected(self, err: RejectedPointsError, batch_size: int) -> None:
        refused = len(err.rejected)
        self.rejected += refused
        self.written += batch_size - refused
        self.last_error = err.reason
        logger.warning("store refused %d of %d points: %s", refused, batch_size, err.reason)
        if self._on_rejected is not None:
            self._on_rejected(err)

    async def _drain(self, spool: Spool) -> None:
        """Write the spool's segments to the store, oldest first, until cancelled."""
        attempt = 0
        while True:
            await spool.wait_not_empty()
            segment: Segment | None = await spool.oldest()
            if segment is None:
                continue  # every segment left was corrupt (moved aside and counted)
            while not await self._try_write(segment.points):
                attempt = await self._back_off(attempt, len(segment.points))
            if attempt:
                logger.info("store took a spooled batch again after %d failed attempt(s)", attempt)
            attempt = 0
            self.drained += len(segment.points)
            await spool.remove(segment)

    def _retry_delay(self, attempt: int) -> float:
        ceiling = min(self._retry_max, self._retry_initial * 2.0 ** min(attempt, 62))
        return ceiling * (0.5 + self._jitter() / 2)
