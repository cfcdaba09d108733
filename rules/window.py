"""Sliding windows over one device's readings: by time (sub-buckets) or by count (the last N readings).

A time window of duration D is kept as `TIME_BUCKETS` sub-buckets of width D / TIME_BUCKETS, aligned
to multiples of the width on the epoch. A reading at time `ts` goes to bucket `floor(ts / width)`; the
window holds the buckets `head - TIME_BUCKETS < k <= head`, where `head` is the bucket of the newest
time the window has been moved to. So a 5m window steps forward 15s at a time and always covers
between 4m45s and 5m of readings. Each bucket keeps only the aggregates its functions need (count,
sum, sum of squares, min, max, earliest and latest reading), and running totals are updated as
buckets enter and leave, so an update costs O(1) amortised whatever the rate. Only `percentile`
needs the readings themselves; those are kept sorted and capped at `MAX_SAMPLES`.

A count window holds the last N readings in arrival order however old they are, in a ring buffer.

Functions (the value of an empty window is None, "unknown", except count and sum, which are 0):
avg, min, max, sum, count, stddev (sample standard deviation, unknown below two readings), first
and last (by event time in a time window, by arrival in a count window), delta (last - first), rate
(delta per second between the first and last reading; unknown unless they differ in time), and
percentile(q) (linear interpolation between closest ranks, as numpy's default).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, insort
from collections.abc import Collection, Mapping
from typing import Any, Final

# 20 sub-buckets keep an avg window at ~0.5 KB (two arrays of 20 doubles plus the object), so three
# windowed rules fit the 2 KB-per-device budget of issue 3; 60 would triple that. The cost is
# granularity: a window moves in steps of 1/20 of its length.
TIME_BUCKETS: Final = 20
# percentile keeps readings; past this many in one window the oldest go first (the window shortens).
MAX_SAMPLES: Final = 1024
# Count windows keep every reading, so N is capped like the samples.
MAX_COUNT_WINDOW: Final = 10_000

FUNCTIONS: Final = (
    "avg",
    "min",
    "max",
    "sum",
    "count",
    "stddev",
    "first",
    "last",
    "delta",
    "rate",
    "percentile",
)
_INF = math.inf


def needs_of(functions: Collection[str]) -> frozenset[str]:
    """Return the aggregates (`sum`, `sumsq`, `minmax`, `edges`, `samples`) the functions need."""
    needs: set[str] = set()
    for name in functions:
        if name in ("avg", "sum"):
            needs.add("sum")
        elif name == "stddev":
            needs |= {"sum", "sumsq"}
        elif name in ("min", "max"):
            needs.add("minmax")
        elif name in ("first", "last", "delta", "rate"):
            needs.add("edges")
        elif name == "percentile":
            needs.add("samples")
    return frozenset(needs)


def _percentile(ordered: list[float], q: float) -> float | None:
    n = len(ordered)
    if n == 0:
        return None
    rank = (n - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, n - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stddev(count: float, total: float, total_sq: float) -> float | None:
    if count < 2:
        return None
    # Clamp: subtracting two nearly equal sums can leave a tiny negative variance.
    variance = max((total_sq - total * total / count) / (count - 1), 0.0)
    return math.sqrt(variance)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _ints(values: Any, length: int) -> list[int]:
    result = [_int(v) for v in values]
    if len(result) != length:
        raise ValueError(f"expected {length} numbers, got {len(result)}")
    return result


def _listed(values: array[float] | None) -> list[float] | None:
    return None if values is None else values.tolist()


def _restored(current: array[float] | None, data: Any) -> array[float] | None:
    """Return `data` as an array shaped like `current`; None must match None (the same functions)."""
    if (data is None) != (current is None):
        raise ValueError("window state with other functions")
    if current is None:
        return None
    restored = array("d", [float(v) for v in data])
    if len(restored) != len(current):
        raise ValueError(f"expected {len(current)} numbers, got {len(restored)}")
    return restored


class TimeWindow:
    """A sliding window of `size` seconds in `TIME_BUCKETS` sub-buckets; see the module docstring."""

    __slots__ = (
        "_count",
        "_counts",
        "_edges",
        "_first_ts",
        "_first_v",
        "_head",
        "_last_ts",
        "_last_v",
        "_max",
        "_maxs",
        "_min",
        "_minmax_stale",
        "_mins",
        "_moves",
        "_samples",
        "_sorted",
        "_sq",
        "_sqs",
        "_sum",
        "_sums",
        "width",
    )

    def __init__(self, size: float, needs: Collection[str] = ()) -> None:
        n = TIME_BUCKETS
        self.width = size / n
        self._head: int | None = None
        self._moves = 0
        self._count = 0
        self._counts = array("q", bytes(8 * n))
        self._sum = self._sq = 0.0
        self._sums = array("d", bytes(8 * n)) if "sum" in needs else None
        self._sqs = array("d", bytes(8 * n)) if "sumsq" in needs else None
        self._min, self._max, self._minmax_stale = _INF, -_INF, False
        self._mins = array("d", [_INF]) * n if "minmax" in needs else None
        self._maxs = array("d", [-_INF]) * n if "minmax" in needs else None
        self._edges = "edges" in needs
        self._first_ts = array("d", bytes(8 * n)) if self._edges else None
        self._first_v = array("d", bytes(8 * n)) if self._edges else None
        self._last_ts = array("d", bytes(8 * n)) if self._edges else None
        self._last_v = array("d", bytes(8 * n)) if self._edges else None
        # (bucket, value) sorted by bucket, and the values sorted, for percentile
        self._samples: list[tuple[int, float]] | None = [] if "samples" in needs else None
        self._sorted: list[float] | None = [] if "samples" in needs else None

    def update(self, ts: float, value: float | None) -> None:
        """Move the window forward to `ts` if it is newer, then add `value` (None adds nothing).

        A reading older than the window's oldest bucket is outside the window and is not added.
        """
        k = int(ts // self.width)
        head = self._head
        if head is None:
            self._head = k
        elif k > head:
            self._move(head, k)
        elif k <= head - TIME_BUCKETS:
            return
        if value is None:
            return
        i = k % TIME_BUCKETS
        counts = self._counts
        counts[i] += 1
        self._count += 1
        sums = self._sums
        if sums is not None:
            sums[i] += value
            self._sum += value
            sqs = self._sqs
            if sqs is not None:
                sqs[i] += value * value
                self._sq += value * value
        mins = self._mins
        if mins is not None:
            maxs = self._maxs
            assert maxs is not None
            if value < mins[i]:
                mins[i] = value
            if value > maxs[i]:
                maxs[i] = value
            if value < self._min:
                self._min = value
            if value > self._max:
                self._max = value
        if self._edges:
            self._add_edges(i, counts[i] == 1, ts, value)
        if self._samples is not None:
            self._add_sample(k, value)

    def _add_edges(self, i: int, fresh: bool, ts: float, value: float) -> None:
        first_ts, first_v, last_ts, last_v = self._first_ts, self._first_v, self._last_ts, self._last_v
        assert first_ts is not None and first_v is not None and last_ts is not None and last_v is not None
        # Ties keep the earlier arrival as first and the later one as last.
        if fresh or ts < first_ts[i]:
            first_ts[i], first_v[i] = ts, value
        if fresh or ts >= last_ts[i]:
            last_ts[i], last_v[i] = ts, value

    def _add_sample(self, k: int, value: float) -> None:
        samples, ordered = self._samples, self._sorted
        assert samples is not None and ordered is not None
        if len(samples) >= MAX_SAMPLES:
            _, oldest = samples.pop(0)
            del ordered[bisect_left(ordered, oldest)]
        if not samples or samples[-1][0] <= k:
            samples.append((k, value))
        else:  # allowed-late reading: keep the list in bucket order
            samples.insert(bisect_left(samples, (k, -_INF)), (k, value))
        insort(ordered, value)

    def _move(self, head: int, k: int) -> None:
        n = TIME_BUCKETS
        self._head = k
        if k - head >= n or self._count == 0:
            self._reset()
            return
        counts, sums, sqs, mins = self._counts, self._sums, self._sqs, self._mins
        for old in range(head + 1, k + 1):
            # Bucket `old` reuses the slot of bucket `old - n`, which has just left the window.
            i = old % n
            c = counts[i]
            if c == 0:
                continue
            counts[i] = 0
            self._count -= c
            if sums is not None:
                self._sum -= sums[i]
                sums[i] = 0.0
                if sqs is not None:
                    self._sq -= sqs[i]
                    sqs[i] = 0.0
            if mins is not None:
                maxs = self._maxs
                assert maxs is not None
                if mins[i] <= self._min or maxs[i] >= self._max:
                    self._minmax_stale = True
                mins[i], maxs[i] = _INF, -_INF
        if self._samples:
            self._expire_samples(k - n)
        self._moves += k - head
        if self._moves >= n:
            # Running sums drift as values are added and subtracted; recounting from the buckets once
            # per full turn of the ring keeps the error bounded at O(1) amortised cost.
            self._moves = 0
            if sums is not None:
                self._sum = math.fsum(sums)
                if sqs is not None:
                    self._sq = math.fsum(sqs)
        if self._count == 0:
            self._reset()

    def _expire_samples(self, last_out: int) -> None:
        samples, ordered = self._samples, self._sorted
        assert samples is not None and ordered is not None
        cut = 0
        while cut < len(samples) and samples[cut][0] <= last_out:
            del ordered[bisect_left(ordered, samples[cut][1])]
            cut += 1
        del samples[:cut]

    def _reset(self) -> None:
        n = TIME_BUCKETS
        self._count = 0
        self._moves = 0
        self._counts = array("q", bytes(8 * n))
        self._sum = self._sq = 0.0
        if self._sums is not None:
            self._sums = array("d", bytes(8 * n))
        if self._sqs is not None:
            self._sqs = array("d", bytes(8 * n))
        if self._mins is not None:
            self._mins = array("d", [_INF]) * n
            self._maxs = array("d", [-_INF]) * n
        self._min, self._max, self._minmax_stale = _INF, -_INF, False
        if self._samples is not None:
            self._samples = []
            self._sorted = []

    def export_state(self) -> dict[str, object]:
        """Return the window's contents as plain JSON-able data (see `restore_state`)."""
        return {
            "kind": "time",
            "width": self.width,
            "head": self._head,
            "moves": self._moves,
            "count": self._count,
            "counts": self._counts.tolist(),
            "sum": self._sum,
            "sq": self._sq,
            "sums": _listed(self._sums),
            "sqs": _listed(self._sqs),
            "min": self._min,
            "max": self._max,
            "minmax_stale": self._minmax_stale,
            "mins": _listed(self._mins),
            "maxs": _listed(self._maxs),
            "first_ts": _listed(self._first_ts),
            "first_v": _listed(self._first_v),
            "last_ts": _listed(self._last_ts),
            "last_v": _listed(self._last_v),
            "samples": None if self._samples is None else [[k, v] for k, v in self._samples],
        }

    def restore_state(self, data: Mapping[str, Any]) -> None:
        """Load what `export_state` returned, into a window built with the same size and functions.

        Raises:
            ValueError, TypeError, KeyError: the data does not fit this window.
        """
        if data["kind"] != "time" or float(data["width"]) != self.width:
            raise ValueError("time window state of another shape")
        head = data["head"]
        self._head = None if head is None else _int(head)
        self._moves = _int(data["moves"])
        self._count = _int(data["count"])
        self._counts = array("q", _ints(data["counts"], TIME_BUCKETS))
        self._sum = float(data["sum"])
        self._sq = float(data["sq"])
        self._sums = _restored(self._sums, data["sums"])
        self._sqs = _restored(self._sqs, data["sqs"])
        self._min, self._max = float(data["min"]), float(data["max"])
        self._minmax_stale = bool(data["minmax_stale"])
        self._mins = _restored(self._mins, data["mins"])
        self._maxs = _restored(self._maxs, data["maxs"])
        self._first_ts = _restored(self._first_ts, data["first_ts"])
        self._first_v = _restored(self._first_v, data["first_v"])
        self._last_ts = _restored(self._last_ts, data["last_ts"])
        self._last_v = _restored(self._last_v, data["last_v"])
        samples = data["samples"]
        if (samples is None) != (self._samples is None):
            raise ValueError("time window state with other functions")
        if samples is not None:
            pairs = [(_int(k), float(v)) for k, v in samples]
            if len(pairs) > MAX_SAMPLES:
                raise ValueError("too many samples")
            self._samples = pairs
            self._sorted = sorted(v for _, v in pairs)

    def _oldest_bucket(self) -> int | None:
        head = self._head
        if self._count == 0 or head is None:
            return None
        counts = self._counts
        for k in range(head - TIME_BUCKETS + 1, head + 1):
            if counts[k % TIME_BUCKETS]:
                return k % TIME_BUCKETS
        return None

    def _newest_bucket(self) -> int | None:
        head = self._head
        if self._count == 0 or head is None:
            return None
        counts = self._counts
        for k in range(head, head - TIME_BUCKETS, -1):
            if counts[k % TIME_BUCKETS]:
                return k % TIME_BUCKETS
        return None

    def _refresh_minmax(self) -> None:
        mins, maxs = self._mins, self._maxs
        assert mins is not None and maxs is not None
        self._min, self._max, self._minmax_stale = min(mins), max(maxs), False

    def count(self) -> int:
        """Return the number of readings in the window."""
        return self._count

    def sum(self) -> float:
        """Return the sum of the readings (0 for an empty window)."""
        return self._sum if self._count else 0.0

    def avg(self) -> float | None:
        """Return the mean of the readings."""
        return self._sum / self._count if self._count else None

    def stddev(self) -> float | None:
        """Return the sample standard deviation of the readings."""
        return _stddev(self._count, self._sum, self._sq)

    def min(self) -> float | None:
        """Return the smallest reading."""
        if not self._count:
            return None
        if self._minmax_stale:
            self._refresh_minmax()
        return self._min

    def max(self) -> float | None:
        """Return the largest reading."""
        if not self._count:
            return None
        if self._minmax_stale:
            self._refresh_minmax()
        return self._max

    def first(self) -> float | None:
        """Return the reading with the earliest event time."""
        i = self._oldest_bucket()
        return None if i is None or self._first_v is None else self._first_v[i]

    def last(self) -> float | None:
        """Return the reading with the latest event time."""
        i = self._newest_bucket()
        return None if i is None or self._last_v is None else self._last_v[i]

    def delta(self) -> float | None:
        """Return last - first."""
        first, last = self.first(), self.last()
        return None if first is None or last is None else last - first

    def rate(self) -> float | None:
        """Return (last - first) per second between the earliest and the latest reading."""
        old, new = self._oldest_bucket(), self._newest_bucket()
        if old is None or new is None or self._first_ts is None or self._last_ts is None:
            return None
        assert self._first_v is not None and self._last_v is not None
        elapsed = self._last_ts[new] - self._first_ts[old]
        if elapsed <= 0:
            return None
        return (self._last_v[new] - self._first_v[old]) / elapsed

    def percentile(self, q: float) -> float | None:
        """Return the q-th percentile (0-100) of the readings."""
        return None if self._sorted is None else _percentile(self._sorted, q)


class CountWindow:
    """The last `size` readings in arrival order, in a ring buffer with running aggregates."""

    __slots__ = (
        "_filled",
        "_max",
        "_min",
        "_minmax_stale",
        "_pos",
        "_sorted",
        "_sq",
        "_sum",
        "_ts",
        "_values",
        "_writes",
        "size",
    )

    def __init__(self, size: int, needs: Collection[str] = ()) -> None:
        self.size = size
        self._values = array("d", bytes(8 * size))
        self._ts = array("d", bytes(8 * size)) if "edges" in needs else None
        self._filled = 0
        self._pos = 0  # where the next reading goes; the oldest reading once the ring is full
        self._writes = 0
        self._sum = self._sq = 0.0
        self._min, self._max, self._minmax_stale = _INF, -_INF, False
        self._sorted: list[float] | None = [] if "samples" in needs else None

    def update(self, ts: float, value: float | None) -> None:
        """Add a reading (None adds nothing; a count window does not move with time)."""
        if value is None:
            return
        values, pos = self._values, self._pos
        if self._filled == self.size:
            old = values[pos]
            self._sum -= old
            self._sq -= old * old
            if old <= self._min or old >= self._max:
                self._minmax_stale = True
            if self._sorted is not None:
                del self._sorted[bisect_left(self._sorted, old)]
        else:
            self._filled += 1
        values[pos] = value
        if self._ts is not None:
            self._ts[pos] = ts
        self._pos = pos + 1 if pos + 1 < self.size else 0
        self._sum += value
        self._sq += value * value
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value
        if self._sorted is not None:
            insort(self._sorted, value)
        self._writes += 1
        if self._writes >= self.size:
            # As in TimeWindow: recount once per turn of the ring so float drift cannot accumulate.
            self._writes = 0
            held = self._values if self._filled == self.size else self._values[: self._filled]
            self._sum = math.fsum(held)
            self._sq = math.fsum(v * v for v in held)

    def export_state(self) -> dict[str, object]:
        """Return the window's contents as plain JSON-able data (see `restore_state`)."""
        return {
            "kind": "count",
            "size": self.size,
            "values": self._values.tolist(),
            "ts": _listed(self._ts),
            "filled": self._filled,
            "pos": self._pos,
            "writes": self._writes,
            "sum": self._sum,
            "sq": self._sq,
            "min": self._min,
            "max": self._max,
            "minmax_stale": self._minmax_stale,
        }

    def restore_state(self, data: Mapping[str, Any]) -> None:
        """Load what `export_state` returned, into a window built with the same size and functions.

        Raises:
            ValueError, TypeError, KeyError: the data does not fit this window.
        """
        if data["kind"] != "count" or _int(data["size"]) != self.size:
            raise ValueError("count window state of another shape")
        values = _restored(self._values, data["values"])
        assert values is not None
        self._values = values
        self._ts = _restored(self._ts, data["ts"])
        filled, pos = _int(data["filled"]), _int(data["pos"])
        if not 0 <= filled <= self.size or not 0 <= pos < self.size:
            raise ValueError("count window position out of range")
        self._filled, self._pos = filled, pos
        self._writes = _int(data["writes"])
        self._sum, self._sq = float(data["sum"]), float(data["sq"])
        self._min, self._max = float(data["min"]), float(data["max"])
        self._minmax_stale = bool(data["minmax_stale"])
        if self._sorted is not None:
            self._sorted = sorted(self._held())

    def _held(self) -> array[float]:
        return self._values if self._filled == self.size else self._values[: self._filled]

    def _oldest(self) -> int:
        return self._pos if self._filled == self.size else 0

    def _newest(self) -> int:
        return self._pos - 1 if self._pos else self.size - 1

    def count(self) -> int:
        """Return the number of readings held (at most `size`)."""
        return self._filled

    def sum(self) -> float:
        """Return the sum of the readings (0 for an empty window)."""
        return self._sum if self._filled else 0.0

    def avg(self) -> float | None:
        """Return the mean of the readings."""
        return self._sum / self._filled if self._filled else None

    def stddev(self) -> float | None:
        """Return the sample standard deviation of the readings."""
        return _stddev(self._filled, self._sum, self._sq)

    def min(self) -> float | None:
        """Return the smallest reading."""
        if not self._filled:
            return None
        if self._minmax_stale:
            held = self._held()
            self._min, self._max, self._minmax_stale = min(held), max(held), False
        return self._min

    def max(self) -> float | None:
        """Return the largest reading."""
        if not self._filled:
            return None
        if self._minmax_stale:
            self.min()
        return self._max

    def first(self) -> float | None:
        """Return the oldest reading."""
        return self._values[self._oldest()] if self._filled else None

    def last(self) -> float | None:
        """Return the newest reading."""
        return self._values[self._newest()] if self._filled else None

    def delta(self) -> float | None:
        """Return last - first."""
        return self._values[self._newest()] - self._values[self._oldest()] if self._filled else None

    def rate(self) -> float | None:
        """Return (last - first) per second between the oldest and the newest reading."""
        if not self._filled or self._ts is None:
            return None
        old, new = self._oldest(), self._newest()
        elapsed = self._ts[new] - self._ts[old]
        if elapsed <= 0:
            return None
        return (self._values[new] - self._values[old]) / elapsed

    def percentile(self, q: float) -> float | None:
        """Return the q-th percentile (0-100) of the readings."""
        return None if self._sorted is None else _percentile(self._sorted, q)


class EmptyWindow:
    """A window that never holds anything: stands in when an expression is checked without data."""

    __slots__ = ()

    def count(self) -> int:
        """Return 0."""
        return 0

    def sum(self) -> float:
        """Return 0."""
        return 0.0

    def _none(self) -> float | None:
        return None

    avg = stddev = min = max = first = last = delta = rate = _none

    def percentile(self, q: float) -> float | None:
        """Return None: there is nothing to rank."""
        return None


SlidingWindow = TimeWindow | CountWindow
Window = TimeWindow | CountWindow | EmptyWindow
