"""Fused plans (one generated function per set of rules) behave exactly like rule-by-rule evaluation."""

from __future__ import annotations

from textwrap import dedent

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.event import TelemetryEvent
from rules import engine as engine_module
from rules.action import Action, RecordAlert
from rules.engine import RuleEngine
from rules.parse import build_rule_set
from rules.selector import KnownDevice

T0 = 1_764_000_000.0
RULES = dedent(
    """\
    lateness: 5s
    rules:
      - id: hot
        when: t > 30
        clear: t < 25
        on_raise: [alert, {command: {name: fan, params: {on: true}}}]
      - id: text
        when: mode == 'manual' and t > 0
      - id: ratio
        when: h / t > 2
      - id: avg
        when: avg(t, 1m) > 28
        clear: avg(t, 1m) < 26
      - id: spread
        devices: {type: sensor}
        when: max(t, 10 events) - min(t, 10 events) > 8 and count(t, 10 events) >= 3
      - id: edges
        time: processing
        when: delta(t, 30s) > 5 or first(t, 30s) > last(t, 30s) + 5 or sum(h, 30s) > 500
      - id: hot-for
        when: t > 29
        for: 10s
      - id: often
        when: t > 27
        for: {count: 2, of: 3}
      - id: flap
        when: t > 26
        min_interval: 5s
      - id: p90
        when: percentile(t, 90, 20s) > 31
      - id: site
        group_by: site
        when: avg(t, 30s) > 27
        lateness: 2s
      - id: silent
        devices: [a, b]
        absent: 15s
    derived:
      - id: per-site
        group_by: site
        every: 10s
        fields: {t: avg(t), n: count(t)}
    """
)
RULE_SET = build_rule_set({"r.yaml": RULES})
KNOWN = {
    "a": KnownDevice("sensor", {"site": "north"}),
    "b": KnownDevice("sensor", {"site": "north"}),
    "c": KnownDevice("other", {"site": "south"}),
}

steps = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "x"]),
        st.floats(min_value=0, max_value=6),  # clock step
        st.floats(min_value=0, max_value=8),  # how far behind the clock the reading is
        st.fixed_dictionaries(
            {},
            optional={
                "t": st.one_of(st.floats(min_value=15, max_value=40), st.just("warm")),
                "h": st.floats(min_value=0, max_value=100),
                "mode": st.sampled_from(["manual", "auto"]),
            },
        ),
    ),
    min_size=1,
    max_size=60,
)


def run(fuse: bool, script: list[tuple[str, float, float, dict[str, object]]]) -> tuple[object, ...]:
    engine_module.FUSE_PLANS = fuse
    try:
        engine = RuleEngine(RULE_SET, known_devices=KNOWN)
        happened: list[tuple[float, list[Action]]] = []
        clock = T0
        for device, forward, behind, fields in script:
            clock += forward
            happened.append((clock, engine.advance(clock)))
            if fields:
                event = TelemetryEvent(device, clock - behind, fields)  # type: ignore[arg-type]
                happened.append((clock, engine.process(event, clock)))
        happened.append((clock + 60, engine.advance(clock + 60)))
        return (
            happened,
            engine.active_alarms(),
            engine.late_events,
            engine.evaluation_errors,
            engine.suppressed_commands,
        )
    finally:
        engine_module.FUSE_PLANS = True


@settings(max_examples=150, deadline=None)
@given(script=steps)
def test_fused_and_rule_by_rule_agree(script: list[tuple[str, float, float, dict[str, object]]]) -> None:
    assert run(True, script) == run(False, script)


def test_plans_past_the_limit_run_rule_by_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "FUSED_PLAN_LIMIT", 1)
    text = "rules:\n" + "".join(f"  - id: r{i}\n    devices: [d{i}]\n    when: t > 1\n" for i in range(3))
    engine = RuleEngine(build_rule_set({"r.yaml": text}))
    for i in range(3):
        [alert] = engine.process(TelemetryEvent(f"d{i}", T0, {"t": 2}), T0)
        assert isinstance(alert, RecordAlert)
        assert alert.rule_id == f"r{i}"
    plans = list(engine._shared_plans.values())
    assert [plan.run.__name__ for plan in plans] == ["run_plan", "run_each", "run_each"]
