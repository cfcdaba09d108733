"""Sliding windows against a naive reference that keeps every raw (ts, value) reading."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules import window as window_module
from rules.window import FUNCTIONS, TIME_BUCKETS, CountWindow, TimeWindow, needs_of

ALL_NEEDS = needs_of(FUNCTIONS)
T0 = 1_764_000_000.0


def reference(readings: list[tuple[float, float]], function: str, q: float = 50.0) -> float | None:
    """Compute `function` over readings in arrival order, the obvious way."""
    values = [v for _, v in readings]
    if function == "count":
        return len(values)
    if function == "sum":
        return math.fsum(values)
    if not values:
        return None
    if function == "avg":
        return math.fsum(values) / len(values)
    if function == "min":
        return min(values)
    if function == "max":
        return max(values)
    if function == "stddev":
        return statistics.stdev(values) if len(values) >= 2 else None
    if function == "percentile":
        ordered = sorted(values)
        rank = (len(ordered) - 1) * q / 100
        low = math.floor(rank)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    # first/last: earliest and latest event time; ties go to the earlier / later arrival
    order = sorted(range(len(readings)), key=lambda i: (readings[i][0], i))
    first, last = readings[order[0]], readings[order[-1]]
    if function == "first":
        return first[1]
    if function == "last":
        return last[1]
    if function == "delta":
        return last[1] - first[1]
    assert function == "rate"
    return (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else None


def in_time_window(updates: list[tuple[float, float | None]], size: float) -> list[tuple[float, float]]:
    """Return the readings a time window of `size` holds after `updates`, by the documented bucket rule."""
    width = size / TIME_BUCKETS
    head = None
    held: list[tuple[float, float]] = []
    for ts, value in updates:
        k = int(ts // width)
        if head is not None and k <= head - TIME_BUCKETS:
            continue  # older than the window when it arrived
        head = k if head is None else max(head, k)
        if value is not None:
            held.append((ts, value))
    assert head is not None
    return [(ts, v) for ts, v in held if int(ts // width) > head - TIME_BUCKETS]


def close(actual: float | None, expected: float | None, scale: float) -> bool:
    if actual is None or expected is None:
        return actual is expected
    return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9 * scale)


values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False).map(lambda v: round(v, 3))
# Mostly forward in time, sometimes a little back (an allowed-late reading), sometimes a long gap.
steps = st.one_of(
    st.floats(min_value=0, max_value=20),
    st.floats(min_value=-30, max_value=0),
    st.floats(min_value=200, max_value=800),
)
updates = st.lists(st.tuples(steps, st.one_of(st.none(), values)), min_size=1, max_size=120)


@settings(max_examples=100, deadline=None)
@given(updates=updates, size=st.sampled_from([60.0, 300.0, 7.5]))
def test_time_window_matches_reference(updates: list[tuple[float, float | None]], size: float) -> None:
    window = TimeWindow(size, ALL_NEEDS)
    ts = T0
    timeline = []
    for step, value in updates:
        ts += step
        timeline.append((ts, value))
        window.update(ts, value)
        held = in_time_window(timeline, size)
        scale = 1e4 * max(len(held), 1)
        for function in FUNCTIONS:
            if function == "percentile":
                for q in (0.0, 50.0, 95.0, 100.0):
                    assert close(window.percentile(q), reference(held, function, q), scale), (function, q)
                continue
            got = getattr(window, function)()
            expected = reference(held, function)
            if function == "stddev" and expected is not None:
                # sum-of-squares variance loses digits when the spread is small against the values
                assert got is not None and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-3)
            elif function == "rate" and expected is not None:
                assert got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
            else:
                assert close(got, expected, scale), (function, got, expected)


@settings(max_examples=100, deadline=None)
@given(
    readings=st.lists(
        st.tuples(st.floats(min_value=0, max_value=10), st.one_of(st.none(), values)), max_size=80
    ),
    size=st.integers(min_value=1, max_value=12),
)
def test_count_window_matches_reference(readings: list[tuple[float, float | None]], size: int) -> None:
    window = CountWindow(size, ALL_NEEDS)
    ts = T0
    arrived: list[tuple[float, float]] = []
    for step, value in readings:
        ts += step
        window.update(ts, value)
        if value is not None:
            arrived.append((ts, value))
        held = arrived[-size:]
        scale = 1e4 * max(len(held), 1)
        for function in ("count", "sum", "avg", "min", "max", "percentile"):
            assert close(
                getattr(window, function)(*(() if function != "percentile" else (90.0,))),
                reference(held, function, 90.0),
                scale,
            ), function
        stddev = reference(held, "stddev")
        got = window.stddev()
        assert (got is None) == (stddev is None)
        if stddev is not None:
            assert got is not None and math.isclose(got, stddev, rel_tol=1e-6, abs_tol=1e-3)
        # arrival order, not event time, decides first and last in a count window
        if held:
            assert window.first() == held[0][1] and window.last() == held[-1][1]
            assert close(window.delta(), held[-1][1] - held[0][1], scale)
            elapsed = held[-1][0] - held[0][0]
            expected_rate = (held[-1][1] - held[0][1]) / elapsed if elapsed > 0 else None
            assert close(window.rate(), expected_rate, scale)


@pytest.mark.parametrize(
    ("updates", "function", "expected"),
    [
        # 60s window: 20 buckets of 3s; the window holds buckets head-19 .. head
        ([(0, 1.0), (30, 3.0)], "avg", 2.0),
        ([(0, 1.0), (59.9, 3.0)], "avg", 2.0),  # bucket 0 is still the oldest of head=19
        ([(0, 1.0), (60, 3.0)], "avg", 3.0),  # head=20: bucket 0 has left
        ([(0, 1.0), (61, 3.0), (2, 9.0)], "avg", 3.0),  # too old when it arrives: not added
        ([(10, 1.0), (20, 5.0), (15, 2.0)], "first", 1.0),  # by event time, not arrival
        ([(10, 1.0), (20, 5.0), (15, 9.0)], "last", 5.0),
        ([(0, 10.0), (30, 40.0)], "rate", 1.0),
        ([(0, 10.0), (30, 40.0)], "delta", 30.0),
        ([(0, 10.0)], "rate", None),  # one reading: no time between first and last
        ([(0, 10.0)], "stddev", None),
        ([(0, None)], "count", 0),
        ([(0, None)], "sum", 0.0),
        ([(0, None)], "avg", None),
        ([(0, 4.0), (1000, None)], "count", 0),  # a long gap empties the window
    ],
)
def test_time_window_cases(
    updates: list[tuple[float, float | None]], function: str, expected: float | None
) -> None:
    window = TimeWindow(60.0, ALL_NEEDS)
    for ts, value in updates:
        window.update(ts, value)
    assert getattr(window, function)() == expected


def test_percentile_samples_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(window_module, "MAX_SAMPLES", 4)
    window = TimeWindow(600.0, needs_of(["percentile"]))
    for i in range(10):
        window.update(float(i), float(i))
    # only the newest four readings are kept: the window is shortened, never unbounded
    assert (window.percentile(0), window.percentile(100)) == (6.0, 9.0)


def test_only_needed_aggregates_are_kept() -> None:
    window = TimeWindow(300.0, needs_of(["avg"]))
    window.update(T0, 1.0)
    assert window.avg() == 1.0
    assert window.percentile(50) is None  # no samples kept for a window nobody ranks
    assert needs_of(["avg"]) == {"sum"} and needs_of(["delta", "max"]) == {"edges", "minmax"}
