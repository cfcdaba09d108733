"""The durable spool: an on-disk, crash-safe FIFO of point batches for while the store cannot take them.

The `BatchWriter` hands a batch to the spool when the store fails it with a retryable error, and
every later batch too while the spool holds anything, so order is kept. A batch counts as handed off
(and its MQTT messages are acknowledged) once its segment file is on disk and fsynced. A drain loop
writes the oldest segment to the store and deletes it only after the store took it.

On-disk format
    `<dir>/<seq>.seg`, one file per batch, `seq` a 16-digit decimal counter giving the FIFO order.
    A segment is a 16-byte header followed by the payload::

        offset  size  field
        0       4     magic b"TGS1" (format version 1)
        4       4     number of points, unsigned big-endian
        8       4     payload length in bytes, unsigned big-endian
        12      4     CRC-32 (zlib) of bytes 4..11 followed by the payload, unsigned big-endian
        16      n     payload: ASCII JSON, a list of [measurement, [[tag, value], ...], {field: value}, ts]

    JSON keeps str, int, float and bool apart, and Python writes floats with `repr`, so every value
    reads back with the same type and value (NaN and +-Infinity use Python's JSON extensions; a NaN's
    sign and payload bits are not kept). Integers longer than Python's 4300-digit conversion limit
    cannot be written (`UnspoolablePointsError`); no store accepts them either.

    A segment is written to `<seq>.seg.tmp`, fsynced, renamed to `<seq>.seg`, and then the directory
    is fsynced, so after a crash a `.seg` file is complete or absent. `<dir>/lock` holds an
    exclusive `flock` while a spool is open: two gateways cannot share a directory.

Ordering
    Segments drain in `seq` order, oldest first, and the writer sends new batches to the spool while
    it holds anything, so the store sees batches in the order they were added, across restarts too.
    A segment is deleted only after the store took it; the deletion is not fsynced, so a crash right
    after can write a segment a second time. Writes are idempotent (same series and timestamp), so
    this duplicates nothing in the store.

Full spool
    The spool holds at most `max_bytes` of segment files (header included), except that an empty
    spool accepts one segment of any size so a small cap cannot stall the writer. When a segment does
    not fit, `append` raises `SpoolFullError` and nothing is dropped: the writer keeps the batch in
    memory, unacknowledged, its pending points reach `max_pending`, the ingest stops reading, and the
    broker holds the messages until the drain makes room. Disk errors (ENOSPC, EIO) while appending
    are treated the same way, with a retry after a backoff.

Crash behaviour
    A batch is acknowledged only after its segment is durable, so a crash loses nothing acknowledged.
    At startup leftover `.seg.tmp` files (writes that never completed, so never acknowledged; the
    broker redelivers them) are deleted with a warning. A segment with a bad header or a wrong size
    (torn) is found when the spool opens; a bad CRC or undecodable payload (corrupt) when it is read
    for draining. Either way the file is moved to `<dir>/corrupt/`, logged at ERROR and counted in
    `SpoolStats.corrupt_segments`; it is never deleted and never stops the spool.

Threads
    All file I/O, encoding and decoding run on one worker thread per spool, so the event loop never
    waits for the disk, and operations run in the order they were issued. One producer (`append`)
    and one consumer (`oldest`, `remove`) may run concurrently.

Errors::

    SpoolError                    the spool cannot do what was asked
     ├── SpoolFullError           the segment does not fit under max_bytes; wait_for_room and retry
     ├── SpoolLockedError         another process (or Spool) has the directory open
     ├── CorruptSegmentError      a segment failed its checks (`reason`); handled inside the spool
     └── UnspoolablePointsError   points JSON cannot hold (`points`); the rest of the batch can go
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import json
import logging
import os
import re
import struct
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway.durable import fsync_dir, write_atomically
from gateway.store.base import Point

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CorruptSegmentError",
    "Segment",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpoolLockedError",
    "SpoolStats",
    "UnspoolablePointsError",
    "decode_segment",
    "encode_segment",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BYTES: Final = 1 << 30
MAGIC: Final = b"TGS1"
_HEADER: Final = struct.Struct(">4sIII")
_COUNTS: Final = struct.Struct(">II")
_U32_MAX: Final = 0xFFFF_FFFF
_SEGMENT_NAME: Final = re.compile(r"^(\d{16})\.seg$")
_TEMP_SUFFIX: Final = ".seg.tmp"
CORRUPT_DIR: Final = "corrupt"
LOCK_FILE: Final = "lock"


class SpoolError(Exception):
    """The spool cannot do what was asked."""


class SpoolFullError(SpoolError):
    """The segment does not fit under `max_bytes`; nothing was written."""

    def __init__(self, size: int, used: int, max_bytes: int) -> None:
        super().__init__(f"spool full: a {size}-byte segment does not fit ({used} of {max_bytes} bytes used)")
        self.size = size
        self.used = used
        self.max_bytes = max_bytes


class SpoolLockedError(SpoolError):
    """Another process (or another Spool in this one) has the directory open."""

    def __init__(self, directory: Path) -> None:
        super().__init__(f"spool directory {directory} is in use by another tidegate")
        self.directory = directory


class CorruptSegmentError(SpoolError):
    """A segment failed its checks; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnspoolablePointsError(SpoolError):
    """Some points cannot be encoded (integers beyond Python's digit limit); `points` lists them."""

    def __init__(self, reason: str, points: Sequence[Point]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.points = list(points)


@dataclass(slots=True)
class SpoolStats:
    """What the spool holds now, and totals since it was last opened."""

    batches: int = 0  # segments held now
    points: int = 0
    bytes: int = 0
    recovered_batches: int = 0  # segments found on disk when the spool opened
    recovered_points: int = 0
    spooled_batches: int = 0  # appended since open
    spooled_points: int = 0
    drained_batches: int = 0  # removed after the store took them
    drained_points: int = 0
    corrupt_segments: int = 0  # moved to corrupt/
    temp_files_removed: int = 0  # incomplete writes found at startup


@dataclass(frozen=True, slots=True)
class Segment:
    """The oldest batch, as read back for draining."""

    seq: int
    points: list[Point]
    size: int


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int
    count: int
    size: int


def _crc(count: int, length: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_COUNTS.pack(count, length)))


def encode_segment(points: Sequence[Point]) -> bytes:
    """Return the segment file contents (header and payload) for a batch.

    Raises:
        UnspoolablePointsError: some points hold an integer too long to convert to text.
    """
    items = [
        [p.measurement, p.tags, p.fields if type(p.fields) is dict else dict(p.fields), p.ts] for p in points
    ]
    try:
        payload = json.dumps(items, separators=(",", ":"), check_circular=False).encode("ascii")
    except ValueError as exc:
        bad = [p for p in points if not _encodes(p)]
        raise UnspoolablePointsError(f"cannot be spooled: {exc}", bad) from exc
    count, length = len(points), len(payload)
    if count > _U32_MAX or length > _U32_MAX:
        raise ValueError(f"batch too large for one segment: {count} points, {length} bytes")
    return _HEADER.pack(MAGIC, count, length, _crc(count, length, payload)) + payload


def _encodes(point: Point) -> bool:
    try:
        json.dumps([point.tags, dict(point.fields), point.ts])
    except ValueError:
        return False
    return True


def _check_header(header: bytes, size: int) -> tuple[int, int, int]:
    """Return (count, length, crc) from a header, checking the magic and the file size."""
    if len(header) < _HEADER.size:
        raise CorruptSegmentError(f"torn: {size} bytes, shorter than the {_HEADER.size}-byte header")
    magic, count, length, crc = _HEADER.unpack_from(header)
    if magic != MAGIC:
        raise CorruptSegmentError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if size != _HEADER.size + length:
        raise CorruptSegmentError(f"torn: {size} bytes, the header says {_HEADER.size + length}")
    return count, length, crc


def _is_field_value(value: object) -> bool:
    return type(value) in (str, int, float, bool)


def decode_segment(data: bytes) -> list[Point]:
    """Return the points a segment holds.

    Raises:
        CorruptSegmentError: a wrong magic or length, a CRC mismatch, or a payload of the wrong shape.
    """
    count, length, crc = _check_header(data[: _HEADER.size], len(data))
    payload = data[_HEADER.size :]
    if _crc(count, length, payload) != crc:
        raise CorruptSegmentError("CRC mismatch")
    try:
        items = json.loads(payload)
        points = []
        for measurement, tags, fields, ts in items:
            tag_pairs = tuple((key, value) for key, value in tags)
            if (
                type(measurement) is not str
                or type(fields) is not dict
                or type(ts) not in (int, float)
                or not all(type(key) is str and type(value) is str for key, value in tag_pairs)
                or not all(_is_field_value(value) for value in fields.values())
            ):
                raise TypeError("unexpected value types")
            points.append(Point(measurement, tag_pairs, fields, ts))
    except (ValueError, TypeError) as exc:
        raise CorruptSegmentError(f"undecodable payload: {exc}") from None
    if len(points) != count:
        raise CorruptSegmentError(f"{len(points)} points, the header says {count}")
    return points


def _segment_name(seq: int) -> str:
    return f"{seq:016d}.seg"


class Spool:
    """A directory of segment files, oldest drained first; see the module docstring.

    `open` must be awaited before anything else; `close` releases the directory. Counters are in
    `stats`, updated on the event loop.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """Create the spool; nothing touches the disk until `open`.

        Args:
            directory: where segments live; created if missing.
            max_bytes: most bytes of segment files held (see "Full spool").
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.stats = SpoolStats()
        self._index: deque[_Entry] = deque()
        self._next_seq = 1
        self._reserved = 0  # bytes of segments being written
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._open = False
        self._lock_fd: int | None = None
        self._not_empty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r}, max_bytes={self.max_bytes})"

    @property
    def is_open(self) -> bool:
        """Return whether `open` succeeded and `close` has not been called."""
        return self._open

    @property
    def empty(self) -> bool:
        """Return whether no segment is held (segments being written count once written)."""
        return not self._index

    async def open(self) -> None:
        """Lock the directory and index its segments, moving torn ones aside.

        Raises:
            SpoolLockedError: another tidegate has the directory open.
            OSError: the directory cannot be created or read.
        """
        if self._executor is not None:
            raise RuntimeError(f"{self!r} is already open")
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tidegate-spool")
        # Fresh events and counters: a spool may be reopened under another event loop (tests do).
        self._not_empty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.stats = SpoolStats()
        self._reserved = 0
        try:
            entries, corrupt, temp_removed = await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        stats = self.stats
        stats.corrupt_segments += corrupt
        stats.temp_files_removed += temp_removed
        self._index = deque(entries)
        for entry in entries:
            stats.batches += 1
            stats.points += entry.count
            stats.bytes += entry.size
            stats.recovered_batches += 1
            stats.recovered_points += entry.count
        self._next_seq = entries[-1].seq + 1 if entries else 1
        self._open = True
        if entries:
            self._not_empty.set()
            logger.warning(
                "spool %s holds %d batch(es), %d point(s), %d bytes from an earlier run; draining them first",
                self.directory,
                stats.batches,
                stats.points,
                stats.bytes,
            )

    async def close(self) -> None:
        """Finish queued file operations and release the directory; `open` may be called again."""
        executor = self._executor
        if executor is None:
            return
        self._executor = None
        self._open = False
        # Queued behind any write still running, so no descriptor closes under it; shielded so a
        # cancelled caller cannot leave the lock held.
        future = asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        try:
            await asyncio.shield(future)
        finally:
            executor.shutdown(wait=False)

    async def append(self, points: Sequence[Point]) -> int:
        """Write a batch as the newest segment and fsync it; return the segment's size in bytes.

        When this returns the batch survives a crash. Cancelling the caller does not cancel a write
        already started; the segment is then kept and drained like any other.

        Raises:
            SpoolFullError: the segment does not fit; nothing was written (see `wait_for_room`).
            UnspoolablePointsError: some points cannot be encoded; nothing was written.
            OSError: writing failed (disk full, I/O error); nothing was kept.
        """
        data = await self._run(encode_segment, points)
        size = len(data)
        used = self.stats.bytes + self._reserved
        if used + size > self.max_bytes and (self._index or self._reserved):
            self._room.clear()
            raise SpoolFullError(size, used, self.max_bytes)
        seq = self._next_seq
        self._next_seq += 1
        self._reserved += size
        entry = _Entry(seq, len(points), size)
        future = asyncio.get_running_loop().run_in_executor(
            self._require_executor(), self._write_sync, seq, data
        )
        future.add_done_callback(lambda done: self._written(entry, done))
        await asyncio.shield(future)
        return size

    async def oldest(self) -> Segment | None:
        """Read the oldest segment, or return None when the spool is empty.

        A segment that fails its checks is moved to `corrupt/`, counted, and the next one is read.
        """
        while self._index:
            entry = self._index[0]
            try:
                points = await self._run(self._read_sync, entry.seq)
            except CorruptSegmentError as err:
                where = await self._run(self._quarantine_sync, entry.seq)
                self._corrupt(entry, err.reason, where)
                continue
            return Segment(entry.seq, points, entry.size)
        return None

    async def remove(self, segment: Segment) -> None:
        """Delete a drained segment (the oldest); it no longer counts against `max_bytes`."""
        if not self._index or self._index[0].seq != segment.seq:
            raise RuntimeError(f"segment {segment.seq} is not the oldest in {self!r}")
        entry = self._index.popleft()
        stats = self.stats
        stats.drained_batches += 1
        stats.drained_points += entry.count
        self._forget(entry)
        # Not fsynced: should the deletion be lost in a crash, the segment is written again, which
        # is idempotent. Failing to delete is logged and leaves the same outcome. Shielded so that
        # cancelling the drain (at shutdown) cannot leave a drained segment behind.
        future = asyncio.get_running_loop().run_in_executor(
            self._require_executor(), self._unlink_sync, entry.seq
        )
        try:
            await asyncio.shield(future)
        except OSError as exc:
            logger.error("could not delete drained spool segment %s: %s", _segment_name(entry.seq), exc)

    async def wait_not_empty(self) -> None:
        """Return once the spool holds a segment."""
        while not self._index:
            self._not_empty.clear()
            await self._not_empty.wait()

    async def wait_for_room(self) -> None:
        """Return once a segment was removed since the last `SpoolFullError` (at once if none was raised)."""
        await self._room.wait()

    # -- on the event loop

    def _require_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._executor

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._require_executor(), function, *args)

    def _written(self, entry: _Entry, done: asyncio.Future[None]) -> None:
        self._reserved -= entry.size
        if done.cancelled() or done.exception() is not None:
            self._room.set()
            return
        self._index.append(entry)
        stats = self.stats
        stats.batches += 1
        stats.points += entry.count
        stats.bytes += entry.size
        stats.spooled_batches += 1
        stats.spooled_points += entry.count
        self._not_empty.set()

    def _forget(self, entry: _Entry) -> None:
        stats = self.stats
        stats.batches -= 1
        stats.points -= entry.count
        stats.bytes -= entry.size
        self._room.set()

    def _corrupt(self, entry: _Entry, reason: str, where: Path | None) -> None:
        if self._index and self._index[0] is entry:
            self._index.popleft()
            self._forget(entry)
        self.stats.corrupt_segments += 1
        logger.error(
            "spool segment %s is corrupt (%s), %d point(s) not drained; moved to %s",
            _segment_name(entry.seq),
            reason,
            entry.count,
            where if where is not None else "(could not move it)",
        )

    # -- on the worker thread

    def _path(self, seq: int) -> Path:
        return self.directory / _segment_name(seq)

    def _open_sync(self) -> tuple[list[_Entry], int, int]:
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolLockedError(directory) from None
            raise
        self._lock_fd = lock_fd
        try:
            return self._scan_sync()
        except BaseException:
            self._close_sync()
            raise

    def _scan_sync(self) -> tuple[list[_Entry], int, int]:
        entries: list[_Entry] = []
        corrupt = temp_removed = 0
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.endswith(_TEMP_SUFFIX):
                logger.warning("removing %s: a spool write that never completed (never acknowledged)", path)
                path.unlink()
                temp_removed += 1
                continue
            match = _SEGMENT_NAME.match(name)
            if match is None:
                continue
            seq = int(match.group(1))
            try:
                with path.open("rb") as file:
                    size = os.fstat(file.fileno()).st_size
                    count, _, _ = _check_header(file.read(_HEADER.size), size)
            except CorruptSegmentError as err:
                where = self._quarantine_sync(seq)
                corrupt += 1
                logger.error("spool segment %s is corrupt (%s); moved to %s", name, err.reason, where)
                continue
            entries.append(_Entry(seq, count, size))
        if temp_removed:
            fsync_dir(self.directory)
        return entries, corrupt, temp_removed

    def _close_sync(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _write_sync(self, seq: int, data: bytes) -> None:
        final = self._path(seq)
        temp = final.with_name(final.name[: -len(".seg")] + _TEMP_SUFFIX)
        write_atomically(final, data, temp=temp, exclusive=True)

    def _read_sync(self, seq: int) -> list[Point]:
        try:
            data = self._path(seq).read_bytes()
        except FileNotFoundError:
            raise CorruptSegmentError("the file disappeared") from None
        return decode_segment(data)

    def _quarantine_sync(self, seq: int) -> Path | None:
        source = self._path(seq)
        corrupt_dir = self.directory / CORRUPT_DIR
        try:
            corrupt_dir.mkdir(exist_ok=True)
            target = corrupt_dir / source.name
            suffix = 0
            while target.exists():
                suffix += 1
                target = corrupt_dir / f"{source.name}.{suffix}"
            os.rename(source, target)
            fsync_dir(corrupt_dir)
            fsync_dir(self.directory)
        except OSError as exc:
            logger.error("could not move corrupt spool segment %s aside: %s", source, exc)
            return None
        return target

    def _unlink_sync(self, seq: int) -> None:
        self._path(seq).unlink(missing_ok=True)
