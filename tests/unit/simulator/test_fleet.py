"""The fleet file: ids, types and groups, value syntaxes, and located errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from devices.errors import SourceFileError
from simulator.fleet import Fleet, Spread, expand_ids, parse_fleet, quick_fleet

ROOT = Path(__file__).resolve().parents[3]
FLEETS = sorted((ROOT / "deploy" / "fleets").glob("*.yaml"))

BASIC = """\
types:
  gh:
    interval: 5s
    fields:
      temperature: {constant: 20}
groups:
  - {type: gh, ids: "gh-{01..03}", tags: {site: north}}
"""


def fleet(text: str) -> Fleet:
    return parse_fleet(textwrap.dedent(text), "fleet.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(SourceFileError) as raised:
        fleet(text)
    return [str(problem) for problem in raised.value.problems]


def test_the_example_fleets_parse() -> None:
    assert [path.name for path in FLEETS] == ["cold-storage.yaml", "greenhouse.yaml"]
    for path in FLEETS:
        parsed = parse_fleet(path.read_text(encoding="utf-8"), str(path))
        assert len(parsed) > 10 and parsed.seed is not None


def test_a_group_expands_its_id_pattern_and_keeps_its_tags() -> None:
    parsed = fleet(BASIC)
    [group] = parsed.groups
    assert group.ids == ("gh-01", "gh-02", "gh-03")
    assert group.tags == {"site": "north"} and group.type == "gh"
    assert group.spec.interval == 5.0
    assert parsed.devices() == [("gh-01", group), ("gh-02", group), ("gh-03", group)]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("gh-{001..003}", ["gh-001", "gh-002", "gh-003"]),
        ("gh-{8..10}", ["gh-8", "gh-9", "gh-10"]),
        ("gh-{08..10}", ["gh-08", "gh-09", "gh-10"]),
        (
            "gh-{1..010}",
            [
                "gh-001",
                "gh-002",
                "gh-003",
                "gh-004",
                "gh-005",
                "gh-006",
                "gh-007",
                "gh-008",
                "gh-009",
                "gh-010",
            ],
        ),
        ("s{1..2}-r{01..02}", ["s1-r01", "s1-r02", "s2-r01", "s2-r02"]),
        ("plain", ["plain"]),
    ],
)
def test_id_patterns(pattern: str, expected: list[str]) -> None:
    assert expand_ids(pattern) == expected


def test_count_with_a_prefix_numbers_from_0001() -> None:
    parsed = fleet(BASIC.replace('ids: "gh-{01..03}"', "count: 2, prefix: probe"))
    assert parsed.groups[0].ids == ("probe-0001", "probe-0002")


def test_a_backwards_range_is_a_located_error() -> None:
    [problem] = problems(BASIC.replace("{01..03}", "{03..01}"))
    assert problem == "fleet.yaml:7:21: groups[0].ids: range {03..01} runs backwards"


def test_an_id_the_gateway_would_refuse_is_an_error() -> None:
    [problem] = problems(BASIC.replace('"gh-{01..03}"', '"gh/{01..03}"'))
    assert "device id 'gh/01' is not allowed" in problem and problem.startswith("fleet.yaml:7:")


def test_a_device_in_two_groups_is_an_error() -> None:
    text = BASIC + "  - {type: gh, ids: [gh-02]}\n"
    [problem] = problems(text)
    assert problem.startswith("fleet.yaml:8:") and "'gh-02' is also in groups[0]" in problem


def test_an_unknown_key_is_an_error_with_line_and_column() -> None:
    [problem] = problems(BASIC.replace("interval: 5s", "intervall: 5s"))
    assert problem.startswith("fleet.yaml:3:") and "intervall" in problem and "Extra inputs" in problem


def test_an_unknown_type_lists_the_known_ones() -> None:
    [problem] = problems(BASIC.replace("{type: gh,", "{type: greenhouse,"))
    assert problem == "fleet.yaml:7:12: groups[0].type: unknown type 'greenhouse' (types: gh)"


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (
            "{constant: 20, sine: {amplitude: 1, period: 1m}}",
            "exactly one of `constant`, `sine`, `daily`, `random_walk`",
        ),
        ("{noise: 1}", "exactly one of"),
        ("{constant: true, noise: 0.5}", "`noise` applies to number fields; this is a bool field"),
        ("{constant: on}", None),  # YAML 1.2: `on` is text, so this is a text field
        ("{constant: 20, steps: [{at: 1m, set: hot}]}", "set hot is a string; this is a number field"),
        ("{constant: ok, spikes: [{at: 1m, add: 2}]}", "`add` applies to number fields"),
        ("{constant: 20, spikes: [{add: 2}]}", "exactly one of `at`, `probability`"),
        (
            "{constant: 20, spikes: [{every: 1m, probability: 5%, add: 2}]}",
            "`every` repeats a spike scheduled with `at`",
        ),
        ("{constant: 20..10}", "lower end first"),
        ("{constant: 20, noise: -1}", "noise must not be negative"),
        ("{sine: {amplitude: 1, period: 0s}}", "period must be longer than 0s"),
        ("{daily: {amplitude: 1, peak: 25:00}}", "UTC time of day"),
        ("{random_walk: {start: 1, step: 1, min: 5, max: 5}}", "min 5 must be below max 5"),
        ("{constant: 20, drift: fast}", "per unit like 2/h"),
    ],
)
def test_field_problems(field: str, message: str | None) -> None:
    text = BASIC.replace("temperature: {constant: 20}", f"temperature: {field}")
    if message is None:
        fleet(text)
        return
    [problem] = problems(text)
    assert message in problem and problem.startswith("fleet.yaml:5:")


def test_value_syntaxes() -> None:
    parsed = fleet(
        """\
        types:
          t:
            interval: 1m30s
            jitter: 5%
            clock_skew: -2s..3s
            fields:
              a: {constant: 18..22, drift: 2/h, noise: 0.5}
              b: {daily: {amplitude: 3, peak: "06:30"}}
              c: {sine: {amplitude: 1, period: 1h, phase: 10m..20m}}
            faults:
              late: {rate: 0.02, by: 30s..2m}
              out_of_order: {rate: 1%, by: 1..3}
        groups: [{type: t, ids: [x]}]
        """
    )
    spec = parsed.groups[0].spec
    assert (spec.interval, spec.jitter, spec.clock_skew) == (90.0, 0.05, Spread(-2.0, 3.0))
    a, b, c = spec.fields["a"], spec.fields["b"], spec.fields["c"]
    assert a.constant == Spread(18.0, 22.0) and a.drift == pytest.approx(2 / 3600) and a.kind == "number"
    assert b.daily is not None and b.daily.peak == 6.5 * 3600
    assert c.sine is not None and c.sine.phase == Spread(600.0, 1200.0)
    assert spec.faults.late is not None and spec.faults.late.by == Spread(30.0, 120.0)
    assert spec.faults.out_of_order is not None and spec.faults.out_of_order.by == Spread(1.0, 3.0)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("malformed: {rate: 150%}", "fraction like 2% or 0.02"),
        ("malformed: {rate: 1%, kinds: [bad_json, haiku]}", "'bad_json', 'nan', 'wrong_type'"),
        ("late: {rate: 1%, by: 2m..30s}", "lower end first"),
        ("out_of_order: {rate: 1%, by: 0..2}", "whole number of readings"),
        ("disconnect: {replay: resend}", "'burst', 'batch' or 'drop'"),
        ("disconnect: {schedule: [{at: 1m}]}", "Field required"),
        ("commands: {error: 2%, retry: 1}", "Extra inputs"),
    ],
)
def test_fault_problems(fault: str, message: str) -> None:
    text = BASIC.replace("    fields:\n", f"    faults:\n      {fault}\n    fields:\n")
    found = problems(text)
    assert any(message in problem for problem in found), found
    assert all(problem.startswith("fleet.yaml:5:") for problem in found), found


COMMANDS = """\
types:
  gh:
    fields:
      temperature: {constant: 20}
      fan: {constant: false}
    commands:
      fan:
        - params: {on: true}
          effects: {fan: {set: true}, temperature: {rate: -0.5/s, for: 60s}}
        - params: {on: false}
          effects: {fan: {set: false}, temperature: release}
      reboot: {effects: {}}
groups:
  - {type: gh, ids: [gh-1]}
"""


def test_command_behaviours_read_on_as_a_key_and_a_single_case_without_a_list() -> None:
    spec = fleet(COMMANDS).groups[0].spec
    on, off = spec.commands["fan"]
    assert on.params == {"on": True} and off.params == {"on": False}  # YAML 1.1 would make `on` True
    assert on.effects["temperature"].rate == -0.5 and on.effects["temperature"].for_ == Spread(60.0, 60.0)
    assert off.effects["temperature"].release is True
    assert [case.effects for case in spec.commands["reboot"]] == [{}]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "temperature: release",
            "humidity: release",
            "commands.fan[1].effects.humidity: no field 'humidity' to affect (fields: fan, temperature)",
        ),
        ("fan: {set: true}", "fan: {rate: 1}", "rate and target apply to numbers; 'fan' is a bool"),
        ("fan: {set: true}", "fan: {set: 1}", "set 1 is a number; 'fan' is a bool"),
        (
            "temperature: release",
            "temperature: {set: 1, rate: 2}",
            "exactly one of `set`, `rate`, `target`, `release`",
        ),
        ("reboot: {effects: {}}", "re boot: {effects: {}}", "command name 're boot' is not allowed"),
    ],
)
def test_command_problems(old: str, new: str, message: str) -> None:
    found = problems(COMMANDS.replace(old, new))
    assert any(message in problem for problem in found), found


def test_a_group_overrides_its_type_fields_by_name_and_replaces_its_faults() -> None:
    parsed = fleet(
        """\
        types:
          gh:
            interval: 10s
            fields:
              temperature: {constant: 20}
              humidity: {constant: 50}
            faults: {malformed: {rate: 1%}}
        groups:
          - {type: gh, ids: [a]}
          - type: gh
            ids: [b]
            interval: 1s
            fields: {temperature: {constant: 35}}
            faults: {late: {rate: 5%, by: 10s}}
        """
    )
    a, b = (group.spec for group in parsed.groups)
    assert (a.interval, b.interval) == (10.0, 1.0)
    assert a.fields["temperature"].constant == Spread(20.0, 20.0)
    assert b.fields["temperature"].constant == Spread(35.0, 35.0)
    assert b.fields["humidity"] == a.fields["humidity"]
    assert a.faults.malformed is not None and a.faults.late is None
    assert b.faults.malformed is None and b.faults.late is not None


def test_invalid_yaml_and_a_wrong_top_level_are_located() -> None:
    assert problems("types: [\n")[0].startswith("fleet.yaml:2:")
    assert problems("- 1\n") == ["fleet.yaml:1:1: expected a mapping with `types` and `groups`"]


def test_quick_fleet_matches_device_ids_and_checks_its_arguments() -> None:
    parsed = quick_fleet(3, 2.0, "demo")
    assert parsed.groups[0].ids == ("demo-0001", "demo-0002", "demo-0003")
    assert parsed.groups[0].spec.interval == 0.5
    assert set(parsed.groups[0].spec.fields) == {"temperature", "humidity", "fan"}
    with pytest.raises(ValueError, match="at least 1"):
        quick_fleet(0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        quick_fleet(1, 0.0)
    with pytest.raises(ValueError, match="valid device ids"):
        quick_fleet(1, 1.0, "bad prefix")


def test_the_readme_example_parses() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Fleet files") :]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    parsed = parse_fleet(example, "README.md")
    assert [(group.type, len(group.ids)) for group in parsed.groups] == [
        ("greenhouse", 500),
        ("greenhouse", 2),
        ("greenhouse", 20),
    ]
    overridden = parsed.groups[2].spec
    assert overridden.interval == 60.0 and overridden.faults.disconnect is None
    assert parsed.groups[0].spec.faults.disconnect is not None
