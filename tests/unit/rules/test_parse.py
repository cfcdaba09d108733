"""Rule files: the documented format, defaults, and located errors for every problem at once."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from devices.errors import SourceFileError
from rules.model import CommandSpec
from rules.parse import build_rule_set, parse_rule_file

REPO = Path(__file__).resolve().parents[3]

OVERHEAT = dedent(
    """\
    rules:
      - id: greenhouse-overheat
        description: Too hot; run the fan
        devices: ["greenhouse-*", "sim-*"]
        when: temperature > 30
        clear: temperature < 26
        severity: critical
        message: "temperature {temperature} above 30"
        on_raise:
          - alert
          - command: {name: fan, params: {on: true, speed: high}}
        on_clear:
          - command: {name: fan, params: {on: false}}
    """
)


def test_full_rule() -> None:
    [rule] = parse_rule_file(OVERHEAT, "gh.yaml")
    assert rule.id == "greenhouse-overheat"
    assert rule.description == "Too hot; run the fan"
    assert rule.devices is not None and rule.devices.ids == ["greenhouse-*", "sim-*"]
    assert rule.when is not None
    assert (rule.when.source, rule.clear_condition.source) == ("temperature > 30", "temperature < 26")
    assert rule.severity == "critical"
    assert rule.render_message({"temperature": 31.5}) == "temperature 31.5 above 30"
    # YAML 1.2 booleans: `on` is the text key the command needs, not True.
    assert rule.on_raise == ["alert", CommandSpec(name="fan", params={"on": True, "speed": "high"})]
    assert rule.on_clear == [CommandSpec(name="fan", params={"on": False})]


def test_defaults() -> None:
    [rule] = parse_rule_file("rules:\n  - id: hot\n    when: t > 1\n", "a.yaml")
    assert (rule.devices, rule.clear, rule.severity, rule.message) == (None, None, "warning", None)
    assert (rule.on_raise, rule.on_clear) == (["alert"], ["alert"])
    assert rule.clear_condition.source == "not (t > 1)"
    assert rule.render_message({}) == "t > 1"


def test_yaml_1_1_booleans_stay_text() -> None:
    text = rule_file(
        "    when: t > 1", "    on_raise: [{command: {name: mode, params: {mode: off, ok: yes}}}]"
    )
    [rule] = parse_rule_file(text, "a.yaml")
    assert rule.on_raise == [CommandSpec(name="mode", params={"mode": "off", "ok": "yes"})]


def test_rule_set_in_file_name_order() -> None:
    rule_set = build_rule_set(
        {
            "b.yaml": "rules:\n  - id: b1\n    when: t > 1\n",
            "a.yaml": "rules:\n  - id: a1\n    when: t > 1\n  - id: a2\n    when: t > 2\n",
            "empty.yaml": "rules: []\n",
        }
    )
    assert [rule.id for rule in rule_set] == ["a1", "a2", "b1"]
    assert rule_set.files == {"a1": "a.yaml", "a2": "a.yaml", "b1": "b.yaml"}
    assert rule_set.get("a2") is rule_set.rules[1] and rule_set.get("zz") is None


def test_deployed_example_is_valid() -> None:
    directory = REPO / "deploy" / "rules"
    files = {path.name: path.read_text() for path in sorted(directory.glob("*.yaml"))}
    assert files, "deploy/rules has no rule files"
    assert len(build_rule_set(files)) >= 2


def rule_file(*lines: str) -> str:
    return "\n".join(["rules:", "  - id: hot", *lines, ""])


@pytest.mark.parametrize(
    ("text", "line", "column", "where", "message"),
    [
        (
            rule_file("    when: t > 1", "    sevrity: critical"),
            4,
            14,
            "rules[0].sevrity",
            "rule 'hot': unknown key 'sevrity' (did you mean 'severity'?); expected one of: id, description, "
            "devices, group_by, when, absent, clear, for, min_interval, lateness, time, severity, message, on_raise, on_clear",
        ),
        (
            rule_file("    when: t > 1", "    severity: urgent"),
            4,
            15,
            "rules[0].severity",
            "rule 'hot': Input should be 'info', 'warning' or 'critical' (got 'urgent')",
        ),
        (
            rule_file("    when: temperature >"),
            3,
            11,
            "rules[0].when",
            "rule 'hot': invalid expression at column 14: invalid syntax (got 'temperature >')",
        ),
        (
            rule_file("    when: t > 1", "    clear: t.__class__ == 1"),
            4,
            12,
            "rules[0].clear",
            "rule 'hot': invalid expression at column 2: attribute access is not allowed; expected a "
            "field, number, string, True/False, arithmetic (+ - * / %) or abs/min/max/round "
            "(got 't.__class__ == 1')",
        ),
        (
            rule_file("    when: 30"),
            3,
            11,
            "rules[0].when",
            "rule 'hot': expected an expression as text, like `temperature > 30` (got 30)",
        ),
        (
            rule_file("    when: t > 1", "    on_raise:", "      - command: {name: fan, parms: {}}"),
            5,
            37,
            "rules[0].on_raise[0].command.parms",
            "rule 'hot': unknown key 'parms' (did you mean 'params'?); expected one of: name, params, device, cooldown",
        ),
        (
            rule_file("    when: t > 1", "    on_raise: [alert, {command: {params: {}}}]"),
            4,
            33,
            "rules[0].on_raise[1].command.name",
            "rule 'hot': missing required key 'name'",
        ),
        (
            rule_file("    when: t > 1", "    on_clear: [alrt]"),
            4,
            16,
            "rules[0].on_clear[0]",
            "rule 'hot': expected `alert`, `command: {name: <command>, params: {...}}`, `republish: {topic: <topic>}` or `webhook: {url: <url>}` (got 'alrt')",
        ),
        (
            rule_file("    when: t > 1", "    devices: [gh/1]"),
            4,
            15,
            "rules[0].devices[0]",
            "rule 'hot': expected a device id or glob: letters, digits, '_', '.', ':', '-' and * ? [ ] ! "
            "(got 'gh/1')",
        ),
        (
            rule_file("    when: t > 1", "    message: 'at {t[0]}'"),
            4,
            14,
            "rules[0].message",
            "rule 'hot': invalid message template: {t[0]} is not a field name; expected {field} or "
            "{field:.1f} (got 'at {t[0]}')",
        ),
        (
            "rules:\n  - id: Hot\n    when: t > 1\n",
            2,
            9,
            "rules[0].id",
            "rule 'Hot': expected a rule id of lowercase letters, digits, '_', '.' and '-', starting with a "
            "letter or digit, at most 128 characters (got 'Hot')",
        ),
        (
            "rules:\n  - when: t > 1\n",
            2,
            5,
            "rules[0].id",
            "missing required key 'id'",
        ),
        (
            "rules:\n  - just text\n",
            2,
            5,
            "rules[0]",
            "expected a rule (a mapping with id, when, ...), got 'just text'",
        ),
        (
            "rules: {id: x}\n",
            1,
            8,
            "rules",
            "expected a mapping with a `rules` list (or a `derived` list), got dict",
        ),
        (
            "rule:\n  - id: x\n",
            2,
            3,
            "rule",
            "unknown top-level key 'rule'; expected only `rules`, `derived`, `lateness`, `time` and `tests`",
        ),
        (
            "",
            None,
            None,
            "",
            "expected a mapping with a `rules` list (or a `derived` list), got an empty file",
        ),
        (
            "rules:\n  - id: x\n    when: [t > 1\n",
            4,
            1,
            "",
            "invalid YAML: expected ',' or ']', but got '<stream end>'",
        ),
        (
            "rules:\n  - id: x\n    when: t > 1\n  - id: x\n    when: t > 2\n",
            4,
            9,
            "rules[1].id",
            "rule 'x': duplicate id, first defined at a.yaml:2:9 (rules[0].id); rule ids must be unique "
            "across all rule files",
        ),
    ],
)
def test_problem_location_and_message(
    text: str, line: int | None, column: int | None, where: str, message: str
) -> None:
    with pytest.raises(SourceFileError) as caught:
        parse_rule_file(text, "a.yaml")
    problems = [problem for problem in caught.value.problems if problem.where == where]
    assert [(p.file, p.line, p.column, p.message) for p in problems] == [("a.yaml", line, column, message)]


def test_duplicate_id_across_files_names_both_locations() -> None:
    with pytest.raises(SourceFileError) as caught:
        build_rule_set(
            {
                "b.yaml": "rules:\n  - id: ok\n    when: t > 1\n  - id: hot\n    when: t > 2\n",
                "a.yaml": "rules:\n  - id: hot\n    when: t > 3\n",
            }
        )
    [problem] = caught.value.problems
    assert (problem.file, problem.line, problem.column, problem.where) == ("b.yaml", 4, 9, "rules[1].id")
    assert "rule 'hot': duplicate id, first defined at a.yaml:2:9 (rules[0].id)" in problem.message
    assert str(problem).startswith("b.yaml:4:9: rules[1].id: rule 'hot': duplicate id")


def test_all_problems_of_all_files_together() -> None:
    with pytest.raises(SourceFileError) as caught:
        build_rule_set(
            {
                "b.yaml": rule_file("    when: t >", "    severity: loud"),
                "a.yaml": "rules:\n  - id: hot\n    when: t > 1\n    colour: red\n",
                "c.yaml": "rules: [\n",
                "d.yaml": "rules:\n  - id: fine\n    when: t > 1\n",
            }
        )
    found = [(p.file, p.line, p.where) for p in caught.value.problems]
    assert found == [
        ("a.yaml", 4, "rules[0].colour"),
        ("b.yaml", 3, "rules[0].when"),
        ("b.yaml", 4, "rules[0].severity"),
        ("c.yaml", 2, ""),
    ]
    # Rules that failed validation take no part in the duplicate check: `hot` is reported only once.
    assert sum("duplicate" in p.message for p in caught.value.problems) == 0


# -- durations, for, absent, min_interval, lateness, cooldown --------------------------------------


def test_time_keys() -> None:
    text = dedent(
        """\
        lateness: 1m30s
        rules:
          - id: held
            when: avg(t, 5m) > 30
            for: 2m
            min_interval: 30s
            on_raise: [{command: {name: fan, cooldown: 5m}}]
          - id: n-of-m
            when: t > 30
            for: {count: 3, of: 5}
            lateness: 5s
          - id: silent
            absent: 10m
        """
    )
    held, n_of_m, silent = parse_rule_file(text, "a.yaml")
    assert (held.hold, held.min_interval, held.lateness) == (120.0, 30.0, 90.0)
    assert held.on_raise == [CommandSpec(name="fan", cooldown=300.0)]
    assert n_of_m.hold is not None and not isinstance(n_of_m.hold, float)
    assert (n_of_m.hold.count, n_of_m.hold.of, n_of_m.lateness) == (3, 5, 5.0)
    assert (silent.when, silent.absent, silent.lateness) == (None, 600.0, 90.0)
    assert silent.render_message({}) == "no data for 10m"
    [default] = parse_rule_file("rules:\n  - id: x\n    when: t > 1\n", "b.yaml")
    assert (default.hold, default.min_interval, default.lateness) == (None, 0.0, 30.0)


@pytest.mark.parametrize(
    ("lines", "where", "message"),
    [
        (["    when: t > 1", "    for: soon"], "rules[0].for", "expected a duration like 30s, 5m"),
        (
            ["    when: t > 1", "    for: {count: 4, of: 3}"],
            "rules[0].for",
            "count (4) must be at most of (3)",
        ),
        (
            ["    when: t > 1", "    for: {count: 1, off: 3}"],
            "rules[0].for.off",
            "unknown key 'off' (did you mean 'of'?)",
        ),
        (["    when: t > 1", "    for: {count: 1, of: 65}"], "rules[0].for.of", "less than or equal to 64"),
        (["    when: t > 1", "    min_interval: -5s"], "rules[0].min_interval", "expected a duration"),
        (
            ["    absent: 5m", "    when: t > 1"],
            "rules[0]",
            "expected exactly one of `when: <condition>` or `absent",
        ),
        (["    severity: info"], "rules[0]", "expected exactly one of"),
        (["    absent: 5m", "    for: 1m"], "rules[0]", "`for` does not apply to an absent rule"),
        (["    absent: 0s"], "rules[0]", "longer than 0"),
        (["    when: avg(t) > 1"], "rules[0].when", "avg() needs a window as its last argument"),
        (
            ["    when: t > 1", "    on_raise: [{command: {name: fan, cooldown: often}}]"],
            "rules[0].on_raise[0].command.cooldown",
            "expected a duration",
        ),
    ],
)
def test_time_key_problems(lines: list[str], where: str, message: str) -> None:
    with pytest.raises(SourceFileError) as caught:
        parse_rule_file(rule_file(*lines), "a.yaml")
    assert (where, True) in [(p.where, message in p.message) for p in caught.value.problems], caught.value


def test_file_lateness_problem() -> None:
    with pytest.raises(SourceFileError) as caught:
        parse_rule_file("lateness: later\nrules: []\n", "a.yaml")
    [problem] = caught.value.problems
    assert (problem.line, problem.where) == (1, "lateness")
    assert "lateness: expected a duration" in problem.message
