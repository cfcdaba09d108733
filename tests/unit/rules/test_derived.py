"""Derived metrics: tumbling aggregates per device or group, written when each interval closes."""

from __future__ import annotations

import math
import statistics
from textwrap import dedent

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.errors import SourceFileError
from devices.event import TelemetryEvent
from rules import engine as engine_module
from rules.action import Action, WriteDerived
from rules.engine import RuleEngine
from rules.parse import build_rule_set
from rules.selector import KnownDevice
from rules.window import Tumbling

T0 = 1_764_000_000.0  # a multiple of a minute
KNOWN = {
    "gh-1": KnownDevice("greenhouse", {"site": "north"}),
    "gh-2": KnownDevice("greenhouse", {"site": "north"}),
    "gh-3": KnownDevice("greenhouse", {"site": "south"}),
}
PER_DEVICE = dedent(
    """\
    lateness: 10s
    derived:
      - id: gh-1m
        devices: {type: greenhouse}
        every: 1m
        measurement: greenhouse_1m
        fields:
          t_avg: avg(temperature)
          t_max: max(temperature)
          n: count(temperature)
          hot: count_if(temperature > 25)
    """
)


def make_engine(text: str = PER_DEVICE) -> RuleEngine:
    return RuleEngine(build_rule_set({"r.yaml": text}), known_devices=KNOWN)


def send(
    engine: RuleEngine, device: str, t: float, now: float | None = None, **fields: float
) -> list[Action]:
    return engine.process(TelemetryEvent(device, T0 + t, fields), T0 + (t if now is None else now))


def ticks(engine: RuleEngine, start: float, end: float) -> list[tuple[float, Action]]:
    """Advance the clock a second at a time; return (clock, action) for everything that came out."""
    out = []
    t = start
    while t <= end:
        out += [(t, action) for action in engine.advance(T0 + t)]
        t += 1
    return out


def test_one_point_per_device_and_interval_when_it_closes() -> None:
    engine = make_engine()
    send(engine, "gh-1", 5, temperature=20)
    send(engine, "gh-1", 30, temperature=30)
    send(engine, "gh-2", 59, temperature=22)
    send(engine, "gh-1", 61, temperature=40)  # the next interval
    send(engine, "gh-1", 62, humidity=40)  # no temperature: nothing to add
    out = ticks(engine, 0, 140)
    assert [(t, a.tags) for t, a in out if isinstance(a, WriteDerived)] == [
        (70, (("device", "gh-1"), ("rule", "gh-1m"))),  # [0, 60) closes 60s + 10s lateness later
        (70, (("device", "gh-2"), ("rule", "gh-1m"))),
        (130, (("device", "gh-1"), ("rule", "gh-1m"))),
    ]
    first = out[0][1]
    assert first == WriteDerived(
        "greenhouse_1m",
        (("device", "gh-1"), ("rule", "gh-1m")),
        {"t_avg": 25.0, "t_max": 30.0, "n": 2.0, "hot": 1.0},
        T0,  # stamped with the interval's start
        "gh-1m",
    )
    assert out[2][1].fields == {"t_avg": 40.0, "t_max": 40.0, "n": 1.0, "hot": 1.0}  # type: ignore[union-attr]


def test_group_intervals_take_every_member() -> None:
    text = PER_DEVICE.replace("devices: {type: greenhouse}", "group_by: site").replace("gh-1m", "site-1m")
    engine = make_engine(text)
    send(engine, "gh-1", 1, temperature=20)
    send(engine, "gh-2", 2, temperature=30)
    send(engine, "gh-3", 3, temperature=10)
    send(engine, "stray", 4, temperature=99)  # no site: in no group
    points = [a for _, a in ticks(engine, 0, 80) if isinstance(a, WriteDerived)]
    assert [(p.tags, p.fields["t_avg"], p.fields["n"]) for p in points] == [
        ((("rule", "site-1m"), ("site", "north")), 25.0, 2.0),
        ((("rule", "site-1m"), ("site", "south")), 10.0, 1.0),
    ]


def test_readings_for_a_closed_interval_are_late() -> None:
    engine = make_engine()
    send(engine, "gh-1", 10, temperature=20)
    ticks(engine, 0, 70)  # [0, 60) is written
    assert send(engine, "gh-1", 50, now=71, temperature=99) == []  # 21 s behind: beyond the 10 s lateness
    assert engine.late_events == 1
    send(engine, "gh-1", 75, now=75, temperature=21)
    send(engine, "gh-1", 59, now=76, temperature=99)  # within lateness for the device, but [0, 60) is closed
    assert engine.late_events == 2
    send(engine, "gh-1", 68, now=77, temperature=23)  # a little behind, its interval still open: added
    [point] = [a for _, a in ticks(engine, 71, 140) if isinstance(a, WriteDerived)]
    assert point.fields["n"] == 2.0 and point.fields["t_avg"] == 22.0


def test_a_device_with_a_skewed_clock_gets_whole_intervals() -> None:
    engine = make_engine()
    # the device's clock is 1h behind the gateway's: intervals close 70 s after they open on its time
    send(engine, "gh-1", -3600 + 5, now=5, temperature=20)
    send(engine, "gh-1", -3600 + 50, now=50, temperature=30)
    out = ticks(engine, 0, 80)
    [(t, point)] = [(t, a) for t, a in out if isinstance(a, WriteDerived)]
    assert t == 70 and point.ts == T0 - 3600 and point.fields["n"] == 2.0


def test_processing_time_intervals_follow_the_gateway_clock() -> None:
    engine = make_engine(PER_DEVICE.replace("every: 1m", "every: 1m\n    time: processing"))
    send(engine, "gh-1", -500, now=10, temperature=20)  # old payload ts: ignored
    send(engine, "gh-1", -499, now=20, temperature=30)
    [(t, point)] = [(t, a) for t, a in ticks(engine, 0, 80) if isinstance(a, WriteDerived)]
    assert (t, point.ts, point.fields["n"]) == (60, T0, 2.0)  # no lateness on the gateway clock


def test_a_device_far_ahead_closes_its_oldest_interval_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "MAX_OPEN_INTERVALS", 2)
    engine = make_engine(PER_DEVICE.replace("lateness: 10s", "lateness: 1h"))
    assert send(engine, "gh-1", 0, temperature=1) == []
    assert send(engine, "gh-1", 60, temperature=2) == []
    [point] = send(engine, "gh-1", 120, temperature=3)  # a third open interval: the oldest goes now
    assert isinstance(point, WriteDerived) and point.ts == T0 and point.fields["n"] == 1.0


def test_unfinished_intervals_are_written_when_the_metric_changes_or_goes() -> None:
    engine = make_engine()
    send(engine, "gh-1", 10, temperature=20)
    changed = build_rule_set({"r.yaml": PER_DEVICE.replace("every: 1m", "every: 2m")})
    reload = engine.replace_rules(changed, T0 + 20)
    assert reload.changed == ("gh-1m",)
    [point] = reload.actions
    assert isinstance(point, WriteDerived) and point.fields["n"] == 1.0
    assert engine.replace_rules(changed, T0 + 21).actions == []  # unchanged: kept, nothing written
    send(engine, "gh-1", 30, temperature=20)
    gone = engine.replace_rules(build_rule_set({"r.yaml": "rules: []\n"}), T0 + 40)
    assert gone.removed == ("gh-1m",) and [type(a) for a in gone.actions] == [WriteDerived]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("every: 1m\n    fields: {a: 'avg(t, 5m)'}", "leave out the window (5m) here"),
        ("every: 1m\n    fields: {a: 't + 1'}", "expected an aggregate"),
        ("every: 1m\n    fields: {a: median(t)}", "median() is not an aggregate"),
        ("every: 1m\n    fields: {a: 'percentile(t, 101)'}", "a number from 0 to 100"),
        ("every: 1m\n    fields: {a: 'avg(t[0])'}", "indexing is not allowed"),
        ("every: 500ms\n    fields: {a: avg(t)}", "every: expected a duration from 1s to 1d"),
        ("every: 1m\n    fields: {}", "at least 1 item"),
        ("every: 1m\n    measurement: alerts\n    fields: {a: avg(t)}", "one of tidegate's own measurements"),
        ("every: 1m\n    fields: {rule: avg(t)}", "'rule' is a tag or reserved name"),
        ("every: 1m\n    group_by: site\n    fields: {site: avg(t)}", "'site' is a tag or reserved name"),
        ("fields: {a: avg(t)}", "missing required key 'every'"),
        ("every: 1m\n    fields: {a: avg(t)}\n    when: t > 1", "unknown key 'when'"),
    ],
)
def test_derived_errors_are_located(entry: str, message: str) -> None:
    with pytest.raises(SourceFileError) as caught:
        build_rule_set({"a.yaml": f"derived:\n  - id: m\n    {entry}\n"})
    problems = caught.value.problems
    assert any(message in p.message for p in problems), [p.message for p in problems]
    assert all(
        p.message.startswith("derived metric 'm': ") and p.where.startswith("derived[0]") for p in problems
    )


def test_rule_and_derived_ids_share_one_namespace() -> None:
    text = "rules:\n  - id: x\n    when: t > 1\nderived:\n  - id: x\n    every: 1m\n    fields: {a: avg(t)}\n"
    with pytest.raises(SourceFileError) as caught:
        build_rule_set({"a.yaml": text})
    [problem] = caught.value.problems
    assert "duplicate id" in problem.message and problem.where == "derived[0].id"


# -- tumbling aggregates against a naive reference -----------------------------------------------------

ALL = dedent(
    """\
    lateness: 30s
    derived:
      - id: all
        every: 10s
        fields:
          avg: avg(x)
          min: min(x)
          max: max(x)
          sum: sum(x)
          count: count(x)
          stddev: stddev(x)
          first: first(x)
          last: last(x)
          delta: delta(x)
          rate: rate(x)
          p50: percentile(x, 50)
          p90: percentile(x, 90)
          positive: count_if(x > 0)
    """
)


def naive(readings: list[tuple[float, float]]) -> dict[str, float]:
    """Compute every field over (ts, value) readings in arrival order, the obvious way."""
    values = [v for _, v in readings]
    order = sorted(range(len(readings)), key=lambda i: (readings[i][0], i))
    (t_first, first), (t_last, last) = readings[order[0]], readings[order[-1]]
    ordered = sorted(values)

    def percentile(q: float) -> float:
        rank = (len(ordered) - 1) * q / 100
        low = math.floor(rank)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

    out = {
        "avg": math.fsum(values) / len(values),
        "min": min(values),
        "max": max(values),
        "sum": math.fsum(values),
        "count": float(len(values)),
        "first": first,
        "last": last,
        "delta": last - first,
        "p50": percentile(50),
        "p90": percentile(90),
        "positive": float(sum(v > 0 for v in values)),
    }
    if len(values) >= 2:
        out["stddev"] = statistics.stdev(values)
    if t_last > t_first:
        out["rate"] = (last - first) / (t_last - t_first)
    return out


steps = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.floats(min_value=0, max_value=4),  # how far the clock moves first
        st.floats(min_value=0, max_value=29),  # how far the reading is behind the clock (< lateness)
        st.floats(min_value=-1e3, max_value=1e3, allow_nan=False).map(lambda v: round(v, 3)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(steps=steps)
def test_tumbling_aggregates_match_a_reference(steps: list[tuple[str, float, float, float]]) -> None:
    engine = RuleEngine(build_rule_set({"r.yaml": ALL}))
    clock = T0
    written: list[tuple[float, WriteDerived]] = []
    readings: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for device, forward, behind, value in steps:
        for tick in range(math.floor(clock) + 1, math.floor(clock + forward) + 1):
            written += [(tick, a) for a in engine.advance(float(tick)) if isinstance(a, WriteDerived)]
        clock += forward
        ts = clock - behind
        actions = engine.process(TelemetryEvent(device, ts, {"x": value}), clock)
        written += [(clock, a) for a in actions if isinstance(a, WriteDerived)]
        readings.setdefault((device, ts // 10), []).append((ts, value))
    for tick in range(math.floor(clock) + 1, math.floor(clock) + 80):
        written += [(tick, a) for a in engine.advance(float(tick)) if isinstance(a, WriteDerived)]
    # Every reading was within the lateness, so each interval with readings is written once, whole,
    # and not before its end plus the lateness.
    assert sorted((dict(p.tags)["device"], p.ts) for _, p in written) == sorted(
        (device, k * 10) for device, k in readings
    )
    for at, point in written:
        key = (dict(point.tags)["device"], point.ts / 10)
        assert at >= point.ts + 10 + 30
        expected = naive(readings[key])
        assert set(point.fields) == set(expected)
        for name, value in expected.items():
            tolerance = 1e-6 if name == "stddev" else 1e-9
            assert math.isclose(point.fields[name], value, rel_tol=tolerance, abs_tol=tolerance * 1e3), name


def test_an_empty_accumulator() -> None:
    empty = Tumbling(samples=True)
    assert [empty.value(f) for f in ("count", "sum", "avg", "percentile")] == [0.0, 0.0, None, None]
