"""Windows over readings: sliding by time (sub-buckets), sliding by count (the last N), and tumbling.

A sliding time window of duration D is kept as `TIME_BUCKETS` sub-buckets of width D / TIME_BUCKETS,
aligned to multiples of the width on the epoch. A reading at time `ts` goes to bucket
`floor(ts / width)`; the window holds the buckets `head - TIME_BUCKETS < k <= head`, where `head` is
the bucket of the newest time the window has been moved to. So a 5m window steps forward 15s at a
time and always covers between 4m45s and 5m of readings. Each bucket keeps only the aggregates its
functions need (count, sum, sum of squares, min and max, earliest reading), plus running totals
updated as buckets enter and leave, so an update costs O(1) amortised whatever the rate. Only
`percentile` needs the readings themselves; those are kept sorted and capped at `MAX_SAMPLES`.

A count window holds the last N readings in arrival order however old they are, in a ring buffer.

Functions (the value of an empty window is None, "unknown", except count and sum, which are 0):
avg, min, max, sum, count, stddev (sample standard deviation, unknown below two readings), first
and last (by event time in a time window, by arrival in a count window), delta (last - first), rate
(delta per second between the first and last reading; unknown unless they differ in time), and
percentile(q) (linear interpolation between closest ranks, as numpy's default).

Storage. The engine keeps, per rule and device (or group), one flat `array('d')` holding the rule's
own scalars and every window of the rule; a *shape* (`TimeShape`, `CountShape`) knows where its
window sits in that array and computes on it. Measured for issue 3's budget (10,000 devices, three
5-minute windows each): an object per window with an array per aggregate cost ~4.6 KB per device,
one array per rule and device ~1.7 KB, because each Python object and array header costs 50-80
bytes, as much as ten buckets. Percentile samples are variable-sized, so they live in a separate
object (`TimeSamples`, `CountSamples`). `TimeWindow` and `CountWindow` wrap a shape with its own
array, for use on their own.

A tumbling window (`Tumbling`) aggregates the readings of one interval and is then emitted and
dropped; see `rules.engine` for when intervals close.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final

# 20 sub-buckets keep an avg window at ~0.4 KB (two columns of 20 doubles and a few totals), so
# three windowed rules fit the 2 KB-per-device budget of issue 3; 60 would triple that. The cost is
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
_N = TIME_BUCKETS


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


def _percentile(ordered: Sequence[float], q: float) -> float | None:
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


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


class _Layout:
    """Hands out consecutive positions in a state array."""

    __slots__ = ("initial", "next")

    def __init__(self, offset: int) -> None:
        self.next = offset
        self.initial: list[tuple[int, int, float]] = []  # (start, length, value) to fill a fresh state

    def take(self, length: int, initial: float = 0.0) -> int:
        start = self.next
        self.next += length
        if initial:
            self.initial.append((start, length, initial))
        return start


class TimeShape:
    """Where a sliding time window sits in a state array, and its functions; see the module docstring.

    Positions of unused aggregates are -1. All bucket numbers are stored as floats (exact far beyond
    any epoch time).
    """

    __slots__ = (
        "count",
        "counts",
        "end",
        "first_ts",
        "first_v",
        "head",
        "initial",
        "last_ts",
        "last_v",
        "max",
        "maxs",
        "min",
        "mins",
        "moves",
        "offset",
        "oldest",
        "size",
        "sq",
        "sqs",
        "stale",
        "sum",
        "sums",
        "update",
        "width",
    )

    def __init__(self, size: float, needs: Collection[str] = (), offset: int = 0) -> None:
        self.size = size
        self.width = size / _N
        self.offset = offset
        layout = _Layout(offset)
        self.head = layout.take(1, -_INF)  # -inf: never moved
        self.count = layout.take(1)
        self.counts = layout.take(_N)
        summed = "sum" in needs or "sumsq" in needs
        self.moves = layout.take(1) if summed else -1
        self.sum = layout.take(1) if summed else -1
        self.sums = layout.take(_N) if summed else -1
        self.sq = layout.take(1) if "sumsq" in needs else -1
        self.sqs = layout.take(_N) if "sumsq" in needs else -1
        minmax = "minmax" in needs
        self.min = layout.take(1, _INF) if minmax else -1
        self.max = layout.take(1, -_INF) if minmax else -1
        self.stale = layout.take(1) if minmax else -1
        self.mins = layout.take(_N, _INF) if minmax else -1
        self.maxs = layout.take(_N, -_INF) if minmax else -1
        edges = "edges" in needs
        self.oldest = layout.take(1, _INF) if edges else -1  # bucket number of the oldest reading
        self.last_ts = layout.take(1) if edges else -1
        self.last_v = layout.take(1) if edges else -1
        self.first_ts = layout.take(_N) if edges else -1
        self.first_v = layout.take(_N) if edges else -1
        self.end = layout.next
        self.initial = tuple(layout.initial)
        self.update: Callable[[array[float], float, float | None], None] = self._compile_update()

    def init(self, d: array[float]) -> None:
        """Write an empty window into `d`."""
        d[self.offset : self.end] = array("d", bytes(8 * (self.end - self.offset)))
        for start, length, value in self.initial:
            d[start : start + length] = array("d", [value]) * length

    def _compile_update(self) -> Callable[[array[float], float, float | None], None]:
        """Generate `update(d, ts, value)`, which adds a reading, for this shape.

        `update` moves the window forward to `ts` if it is newer, then adds `value` (None adds
        nothing); a reading older than the window's oldest bucket is not added. The function is generated for this shape, with its positions as constants and only the
        aggregates it keeps: measured ~2x faster than one generic method reading them from
        attributes, and window updates are most of the engine's time on windowed rules. Only
        numbers from this shape reach the text.
        """
        lines = [
            "def update(d, ts, value):",
            f"    k = ts // {self.width!r}",
            f"    head = d[{self.head}]",
            "    if k > head:",
            "        move(d, head, k)",
            f"    elif k <= head - {_N}:",
            "        return",
            "    if value is None:",
            "        return",
            f"    i = int(k) % {_N}",
            f"    was = d[{self.count}]",
            f"    d[{self.count}] = was + 1.0",
            f"    n = d[{self.counts} + i] + 1.0",
            f"    d[{self.counts} + i] = n",
        ]
        if self.sum >= 0:
            lines += [f"    d[{self.sums} + i] += value", f"    d[{self.sum}] += value"]
        if self.sq >= 0:
            lines += ["    sq = value * value", f"    d[{self.sqs} + i] += sq", f"    d[{self.sq}] += sq"]
        if self.min >= 0:
            for bound, op in ((self.mins, "<"), (self.maxs, ">")):
                lines += [f"    if value {op} d[{bound} + i]:", f"        d[{bound} + i] = value"]
            for total, op in ((self.min, "<"), (self.max, ">")):
                lines += [f"    if value {op} d[{total}]:", f"        d[{total}] = value"]
        if self.oldest >= 0:
            # Ties keep the earlier arrival as first and the later one as last.
            lines += [
                f"    if n == 1.0 or ts < d[{self.first_ts} + i]:",
                f"        d[{self.first_ts} + i] = ts",
                f"        d[{self.first_v} + i] = value",
                f"    if k < d[{self.oldest}]:",
                f"        d[{self.oldest}] = k",
                f"    if not was or ts >= d[{self.last_ts}]:",
                f"        d[{self.last_ts}] = ts",
                f"        d[{self.last_v}] = value",
            ]
        scope: dict[str, Any] = {"move": self._move}
        exec(compile("\n".join(lines), "<time window>", "exec"), scope)
        update: Callable[[array[float], float, float | None], None] = scope["update"]
        return update

    def inline(self, function: str) -> str | None:
        """Return `function` over the state array `d` as a Python expression, or None to call it.

        `{shape}` in the text stands for the name the caller gives this shape.
        """
        count, o = f"d[{self.count}]", f"int(d[{self.oldest}]) % {_N}"
        if function == "count":
            return f"int({count})"
        if function == "sum" and self.sum >= 0:
            return f"(d[{self.sum}] if {count} else 0.0)"
        if function == "avg" and self.sum >= 0:
            return f"(d[{self.sum}] / {count} if {count} else None)"
        if function in ("min", "max") and self.min >= 0:
            total = self.min if function == "min" else self.max
            method = "min_of" if function == "min" else "max_of"
            # the method only when the window is empty or a bucket holding the extreme has left
            return f"(d[{total}] if {count} and not d[{self.stale}] else {{shape}}.{method}(d))"
        if function == "last" and self.oldest >= 0:
            return f"(d[{self.last_v}] if {count} else None)"
        if function == "first" and self.oldest >= 0:
            return f"(d[{self.first_v} + {o}] if {count} else None)"
        if function == "delta" and self.oldest >= 0:
            return f"(d[{self.last_v}] - d[{self.first_v} + {o}] if {count} else None)"
        return None

    def _move(self, d: array[float], head: float, k: float) -> None:
        if k - head >= _N or not d[self.count]:
            self.init(d)
            d[self.head] = k
            return
        d[self.head] = k
        counts, sums, sqs, mins, maxs = self.counts, self.sums, self.sqs, self.mins, self.maxs
        for old in range(int(head) + 1, int(k) + 1):
            # Bucket `old` reuses the slot of bucket `old - N`, which has just left the window.
            i = old % _N
            c = d[counts + i]
            if not c:
                continue
            d[counts + i] = 0.0
            d[self.count] -= c
            if sums >= 0:
                d[self.sum] -= d[sums + i]
                d[sums + i] = 0.0
                if sqs >= 0:
                    d[self.sq] -= d[sqs + i]
                    d[sqs + i] = 0.0
            if mins >= 0:
                if d[mins + i] <= d[self.min] or d[maxs + i] >= d[self.max]:
                    d[self.stale] = 1.0
                d[mins + i] = _INF
                d[maxs + i] = -_INF
        if not d[self.count]:
            self.init(d)
            d[self.head] = k
            return
        if sums >= 0:
            moves = d[self.moves] + (k - head)
            if moves >= _N:
                # Running sums drift as values are added and subtracted; recounting from the buckets
                # once per full turn of the ring keeps the error bounded at O(1) amortised cost.
                moves = 0.0
                d[self.sum] = math.fsum(d[sums : sums + _N])
                if sqs >= 0:
                    d[self.sq] = math.fsum(d[sqs : sqs + _N])
            d[self.moves] = moves
        if self.oldest >= 0 and d[self.oldest] <= k - _N:
            for bucket in range(int(k) - _N + 1, int(k) + 1):
                if d[counts + bucket % _N]:
                    d[self.oldest] = float(bucket)
                    break

    # -- functions -------------------------------------------------------------------------------------

    def n(self, d: array[float]) -> int:
        """Return the number of readings in the window (`count`, for callers that shadow the name)."""
        return int(d[self.count])

    def sum_of(self, d: array[float]) -> float:
        """Return the sum of the readings (0 for an empty window)."""
        return d[self.sum] if d[self.count] else 0.0

    def avg(self, d: array[float]) -> float | None:
        """Return the mean of the readings."""
        c = d[self.count]
        return d[self.sum] / c if c else None

    def stddev(self, d: array[float]) -> float | None:
        """Return the sample standard deviation of the readings."""
        return _stddev(d[self.count], d[self.sum], d[self.sq])

    def _refresh_minmax(self, d: array[float]) -> None:
        mins, maxs = self.mins, self.maxs
        d[self.min] = min(d[mins : mins + _N])
        d[self.max] = max(d[maxs : maxs + _N])
        d[self.stale] = 0.0

    def min_of(self, d: array[float]) -> float | None:
        """Return the smallest reading."""
        if not d[self.count]:
            return None
        if d[self.stale]:
            self._refresh_minmax(d)
        return d[self.min]

    def max_of(self, d: array[float]) -> float | None:
        """Return the largest reading."""
        if not d[self.count]:
            return None
        if d[self.stale]:
            self._refresh_minmax(d)
        return d[self.max]

    def first(self, d: array[float]) -> float | None:
        """Return the reading with the earliest event time."""
        if not d[self.count]:
            return None
        return d[self.first_v + int(d[self.oldest]) % _N]

    def last(self, d: array[float]) -> float | None:
        """Return the reading with the latest event time."""
        return d[self.last_v] if d[self.count] else None

    def delta(self, d: array[float]) -> float | None:
        """Return last - first."""
        if not d[self.count]:
            return None
        return d[self.last_v] - d[self.first_v + int(d[self.oldest]) % _N]

    def rate(self, d: array[float]) -> float | None:
        """Return (last - first) per second between the earliest and the latest reading."""
        if not d[self.count]:
            return None
        i = int(d[self.oldest]) % _N
        elapsed = d[self.last_ts] - d[self.first_ts + i]
        if elapsed <= 0:
            return None
        return (d[self.last_v] - d[self.first_v + i]) / elapsed

    def check(self, d: Sequence[float]) -> None:
        """Raise `ValueError` unless `d` holds a window this shape could have written."""
        head, count = d[self.head], d[self.count]
        if not (head == -_INF or math.isfinite(head)) or count < 0:
            raise ValueError("time window state out of range")
        counts = d[self.counts : self.counts + _N]
        if any(c < 0 or c != int(c) for c in counts) or math.fsum(counts) != count:
            raise ValueError("time window counts do not add up")


class CountShape:
    """Where a count window (the last `size` readings) sits in a state array, and its functions."""

    __slots__ = (
        "end",
        "filled",
        "max",
        "min",
        "offset",
        "pos",
        "size",
        "sq",
        "stale",
        "sum",
        "ts",
        "values",
        "writes",
    )

    def __init__(self, size: int, needs: Collection[str] = (), offset: int = 0) -> None:
        self.size = size
        self.offset = offset
        layout = _Layout(offset)
        self.filled = layout.take(1)
        self.pos = layout.take(1)  # where the next reading goes; the oldest once the ring is full
        self.writes = layout.take(1)
        self.sum = layout.take(1)
        self.sq = layout.take(1)
        self.min = layout.take(1, _INF)
        self.max = layout.take(1, -_INF)
        self.stale = layout.take(1)
        self.values = layout.take(size)
        self.ts = layout.take(size) if "edges" in needs else -1
        self.end = layout.next

    def init(self, d: array[float]) -> None:
        """Write an empty window into `d`."""
        d[self.offset : self.end] = array("d", bytes(8 * (self.end - self.offset)))
        d[self.min] = _INF
        d[self.max] = -_INF

    def update(self, d: array[float], ts: float, value: float | None) -> None:
        """Add a reading (None adds nothing; a count window does not move with time)."""
        if value is None:
            return
        size = self.size
        pos = int(d[self.pos])
        slot = self.values + pos
        if d[self.filled] == size:
            old = d[slot]
            d[self.sum] -= old
            d[self.sq] -= old * old
            if old <= d[self.min] or old >= d[self.max]:
                d[self.stale] = 1.0
        else:
            d[self.filled] += 1.0
        d[slot] = value
        if self.ts >= 0:
            d[self.ts + pos] = ts
        d[self.pos] = pos + 1.0 if pos + 1 < size else 0.0
        d[self.sum] += value
        d[self.sq] += value * value
        if value < d[self.min]:
            d[self.min] = value
        if value > d[self.max]:
            d[self.max] = value
        writes = d[self.writes] + 1.0
        if writes >= size:
            # As in TimeShape: recount once per turn of the ring so float drift cannot accumulate.
            writes = 0.0
            held = self._held(d)
            d[self.sum] = math.fsum(held)
            d[self.sq] = math.fsum(v * v for v in held)
        d[self.writes] = writes

    def _held(self, d: array[float]) -> array[float]:
        return d[self.values : self.values + int(d[self.filled])]

    def inline(self, function: str) -> str | None:
        """Return `function` over the state array `d` as a Python expression, or None to call it."""
        if function == "count":
            return f"int(d[{self.filled}])"
        if function == "avg":
            return f"(d[{self.sum}] / d[{self.filled}] if d[{self.filled}] else None)"
        return None

    def _oldest(self, d: array[float]) -> int:
        return int(d[self.pos]) if d[self.filled] == self.size else 0

    def _newest(self, d: array[float]) -> int:
        pos = int(d[self.pos])
        return pos - 1 if pos else self.size - 1

    def n(self, d: array[float]) -> int:
        """Return the number of readings held (at most `size`)."""
        return int(d[self.filled])

    def sum_of(self, d: array[float]) -> float:
        """Return the sum of the readings (0 for an empty window)."""
        return d[self.sum] if d[self.filled] else 0.0

    def avg(self, d: array[float]) -> float | None:
        """Return the mean of the readings."""
        filled = d[self.filled]
        return d[self.sum] / filled if filled else None

    def stddev(self, d: array[float]) -> float | None:
        """Return the sample standard deviation of the readings."""
        return _stddev(d[self.filled], d[self.sum], d[self.sq])

    def _refresh_minmax(self, d: array[float]) -> None:
        held = self._held(d)
        d[self.min], d[self.max], d[self.stale] = min(held), max(held), 0.0

    def min_of(self, d: array[float]) -> float | None:
        """Return the smallest reading."""
        if not d[self.filled]:
            return None
        if d[self.stale]:
            self._refresh_minmax(d)
        return d[self.min]

    def max_of(self, d: array[float]) -> float | None:
        """Return the largest reading."""
        if not d[self.filled]:
            return None
        if d[self.stale]:
            self._refresh_minmax(d)
        return d[self.max]

    def first(self, d: array[float]) -> float | None:
        """Return the oldest reading."""
        return d[self.values + self._oldest(d)] if d[self.filled] else None

    def last(self, d: array[float]) -> float | None:
        """Return the newest reading."""
        return d[self.values + self._newest(d)] if d[self.filled] else None

    def delta(self, d: array[float]) -> float | None:
        """Return last - first."""
        if not d[self.filled]:
            return None
        return d[self.values + self._newest(d)] - d[self.values + self._oldest(d)]

    def rate(self, d: array[float]) -> float | None:
        """Return (last - first) per second between the oldest and the newest reading."""
        if not d[self.filled] or self.ts < 0:
            return None
        old, new = self._oldest(d), self._newest(d)
        elapsed = d[self.ts + new] - d[self.ts + old]
        if elapsed <= 0:
            return None
        return (d[self.values + new] - d[self.values + old]) / elapsed

    def check(self, d: Sequence[float]) -> None:
        """Raise `ValueError` unless `d` holds a window this shape could have written."""
        filled, pos = d[self.filled], d[self.pos]
        if (
            filled != int(filled)
            or pos != int(pos)
            or not 0 <= filled <= self.size
            or not 0 <= pos < self.size
        ):
            raise ValueError("count window position out of range")


Shape = TimeShape | CountShape

# Window function name -> shape method name (`count`, `sum`, `min` and `max` are taken by offsets).
SHAPE_METHODS: Final = {
    "count": "n",
    "sum": "sum_of",
    "min": "min_of",
    "max": "max_of",
    "avg": "avg",
    "stddev": "stddev",
    "first": "first",
    "last": "last",
    "delta": "delta",
    "rate": "rate",
}


def new_shape(by_count: bool, size: float, needs: Collection[str], offset: int) -> Shape:
    """Return the shape of a count window of `size` readings, or of a time window of `size` seconds."""
    if by_count:
        return CountShape(int(size), needs, offset)
    return TimeShape(size, needs, offset)


# -- percentile samples ------------------------------------------------------------------------------


class TimeSamples:
    """The readings of a sliding time window (bucketed as `TimeShape` does), sorted, for percentile."""

    __slots__ = ("head", "samples", "sorted", "width")

    def __init__(self, size: float) -> None:
        self.width = size / _N
        self.head = -_INF
        self.samples: list[tuple[float, float]] = []  # (bucket, value) in bucket order
        self.sorted: list[float] = []

    def update(self, ts: float, value: float | None) -> None:
        """Move to `ts` if newer (dropping readings that leave), then add `value` if it is in the window."""
        k = ts // self.width
        if k > self.head:
            self.head = k
            self._expire(k - _N)
        elif k <= self.head - _N:
            return
        if value is None:
            return
        samples, ordered = self.samples, self.sorted
        if len(samples) >= MAX_SAMPLES:
            _, oldest = samples.pop(0)
            del ordered[bisect_left(ordered, oldest)]
        if not samples or samples[-1][0] <= k:
            samples.append((k, value))
        else:  # allowed-late reading: keep the list in bucket order
            samples.insert(bisect_left(samples, (k, -_INF)), (k, value))
        insort(ordered, value)

    def _expire(self, last_out: float) -> None:
        samples, ordered = self.samples, self.sorted
        cut = 0
        while cut < len(samples) and samples[cut][0] <= last_out:
            del ordered[bisect_left(ordered, samples[cut][1])]
            cut += 1
        del samples[:cut]

    def percentile(self, q: float) -> float | None:
        """Return the q-th percentile (0-100) of the readings."""
        return _percentile(self.sorted, q)

    def export_state(self) -> list[Any]:
        """Return the samples as plain data: [head, [[bucket, value], ...]]."""
        return [None if self.head == -_INF else self.head, [[k, v] for k, v in self.samples]]

    def restore_state(self, data: Any) -> None:
        """Load what `export_state` returned."""
        head, samples = data
        self.head = -_INF if head is None else _float(head)
        pairs = [(_float(k), _float(v)) for k, v in samples]
        if len(pairs) > MAX_SAMPLES:
            raise ValueError("too many samples")
        self.samples = sorted(pairs, key=lambda pair: pair[0])
        self.sorted = sorted(v for _, v in pairs)


class CountSamples:
    """The last `size` readings, sorted, for percentile over a count window."""

    __slots__ = ("size", "sorted", "values")

    def __init__(self, size: float) -> None:
        self.size = int(size)
        self.values: deque[float] = deque()
        self.sorted: list[float] = []

    def update(self, ts: float, value: float | None) -> None:
        """Add a reading; the oldest leaves once `size` are held."""
        if value is None:
            return
        if len(self.values) == self.size:
            del self.sorted[bisect_left(self.sorted, self.values.popleft())]
        self.values.append(value)
        insort(self.sorted, value)

    def percentile(self, q: float) -> float | None:
        """Return the q-th percentile (0-100) of the readings."""
        return _percentile(self.sorted, q)

    def export_state(self) -> list[Any]:
        """Return the readings in arrival order, as plain data."""
        return list(self.values)

    def restore_state(self, data: Any) -> None:
        """Load what `export_state` returned."""
        values = [_float(v) for v in data]
        if len(values) > self.size:
            raise ValueError("more readings than the window holds")
        self.values = deque(values)
        self.sorted = sorted(values)


Samples = TimeSamples | CountSamples


def new_samples(by_count: bool, size: float) -> Samples:
    """Return an empty sample store for a count or time window."""
    return CountSamples(size) if by_count else TimeSamples(size)


# -- windows on their own ----------------------------------------------------------------------------


class _Standalone:
    """A shape with its own state array (and samples), usable on its own."""

    __slots__ = ("data", "samples", "shape")

    def __init__(self, shape: Shape, samples: Samples | None) -> None:
        self.shape = shape
        self.data = array("d", bytes(8 * shape.end))
        shape.init(self.data)
        self.samples = samples

    def update(self, ts: float, value: float | None) -> None:
        """Add a reading at `ts` (None adds nothing but may move a time window forward)."""
        self.shape.update(self.data, ts, value)
        if self.samples is not None:
            self.samples.update(ts, value)

    def count(self) -> int:
        """Return the number of readings in the window."""
        return self.shape.n(self.data)

    def sum(self) -> float:
        """Return the sum of the readings (0 for an empty window)."""
        return self.shape.sum_of(self.data)

    def avg(self) -> float | None:
        """Return the mean of the readings."""
        return self.shape.avg(self.data)

    def stddev(self) -> float | None:
        """Return the sample standard deviation of the readings."""
        return self.shape.stddev(self.data)

    def min(self) -> float | None:
        """Return the smallest reading."""
        return self.shape.min_of(self.data)

    def max(self) -> float | None:
        """Return the largest reading."""
        return self.shape.max_of(self.data)

    def first(self) -> float | None:
        """Return the first reading (by event time in a time window, by arrival in a count window)."""
        return self.shape.first(self.data)

    def last(self) -> float | None:
        """Return the last reading."""
        return self.shape.last(self.data)

    def delta(self) -> float | None:
        """Return last - first."""
        return self.shape.delta(self.data)

    def rate(self) -> float | None:
        """Return (last - first) per second between the first and the last reading."""
        return self.shape.rate(self.data)

    def percentile(self, q: float) -> float | None:
        """Return the q-th percentile (0-100) of the readings (None unless built with `percentile`)."""
        return None if self.samples is None else self.samples.percentile(q)


class TimeWindow(_Standalone):
    """A sliding window of `size` seconds in `TIME_BUCKETS` sub-buckets; see the module docstring."""

    __slots__ = ()

    def __init__(self, size: float, needs: Collection[str] = ()) -> None:
        super().__init__(TimeShape(size, needs), TimeSamples(size) if "samples" in needs else None)


class CountWindow(_Standalone):
    """The last `size` readings in arrival order, in a ring buffer with running aggregates."""

    __slots__ = ()

    def __init__(self, size: int, needs: Collection[str] = ()) -> None:
        super().__init__(CountShape(size, needs), CountSamples(size) if "samples" in needs else None)


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


Window = TimeWindow | CountWindow | EmptyWindow


# -- tumbling aggregates -----------------------------------------------------------------------------

# Positions in a tumbling accumulator: one small array per aggregated value and interval.
_T_COUNT, _T_SUM, _T_SQ, _T_MIN, _T_MAX, _T_FIRST_TS, _T_FIRST_V, _T_LAST_TS, _T_LAST_V = range(9)
_T_EMPTY: Final = array("d", [0.0, 0.0, 0.0, _INF, -_INF, 0.0, 0.0, 0.0, 0.0])


class Tumbling:
    """The readings of one value in one interval of a tumbling window, reduced to what functions need.

    Unlike a sliding window nothing ever leaves, so every function is exact from a handful of
    running totals; only `percentile` keeps readings (sorted, at most `MAX_SAMPLES`; past that
    later readings are not ranked).
    """

    __slots__ = ("data", "sorted")

    def __init__(self, samples: bool = False) -> None:
        self.data = _T_EMPTY[:]
        self.sorted: list[float] | None = [] if samples else None

    def add(self, ts: float, value: float) -> None:
        """Add a reading at event time `ts`."""
        d = self.data
        was = d[_T_COUNT]
        d[_T_COUNT] = was + 1.0
        d[_T_SUM] += value
        d[_T_SQ] += value * value
        if value < d[_T_MIN]:
            d[_T_MIN] = value
        if value > d[_T_MAX]:
            d[_T_MAX] = value
        if not was or ts < d[_T_FIRST_TS]:
            d[_T_FIRST_TS], d[_T_FIRST_V] = ts, value
        if not was or ts >= d[_T_LAST_TS]:
            d[_T_LAST_TS], d[_T_LAST_V] = ts, value
        ordered = self.sorted
        if ordered is not None and len(ordered) < MAX_SAMPLES:
            insort(ordered, value)

    def value(self, function: str, q: float | None = None) -> float | None:
        """Return `function` over the readings (count and sum 0 when empty, the others None)."""
        d = self.data
        count = d[_T_COUNT]
        if function == "count":
            return count
        if function == "sum":
            return d[_T_SUM]
        if not count:
            return None
        if function == "avg":
            return d[_T_SUM] / count
        if function == "min":
            return d[_T_MIN]
        if function == "max":
            return d[_T_MAX]
        if function == "stddev":
            return _stddev(count, d[_T_SUM], d[_T_SQ])
        if function == "first":
            return d[_T_FIRST_V]
        if function == "last":
            return d[_T_LAST_V]
        if function == "delta":
            return d[_T_LAST_V] - d[_T_FIRST_V]
        if function == "rate":
            elapsed = d[_T_LAST_TS] - d[_T_FIRST_TS]
            return (d[_T_LAST_V] - d[_T_FIRST_V]) / elapsed if elapsed > 0 else None
        if function == "percentile":
            return None if self.sorted is None or q is None else _percentile(self.sorted, q)
        raise ValueError(f"unknown function {function!r}")

    def export_state(self) -> dict[str, Any]:
        """Return the accumulator as plain data."""
        return {"data": self.data.tolist(), "sorted": self.sorted}

    def restore_state(self, data: Mapping[str, Any]) -> None:
        """Load what `export_state` returned."""
        values = [_float(v) for v in data["data"]]
        if len(values) != len(_T_EMPTY):
            raise ValueError("tumbling accumulator of another shape")
        self.data = array("d", values)
        ordered = data["sorted"]
        if (ordered is None) != (self.sorted is None):
            raise ValueError("tumbling accumulator with other functions")
        if ordered is not None:
            self.sorted = sorted(_float(v) for v in ordered)[:MAX_SAMPLES]
