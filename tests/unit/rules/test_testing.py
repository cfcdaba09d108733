"""Test cases inside rule files: the runner, its diff, `tidegate rules test`, and the shipped examples."""

from __future__ import annotations

import re
from pathlib import Path
from textwrap import dedent

import pytest

from devices.errors import SourceFileError
from gateway.cli import main
from rules.parse import build_rule_set
from rules.testing import run_rule_tests

REPO = Path(__file__).resolve().parents[3]

RULES = dedent(
    """\
    rules:
      - id: hot
        when: avg(t, 1m) > 30
        for: 30s
        on_raise:
          - alert
          - command: {name: fan, params: {on: true}}
      - id: silent
        absent: 2m
    tests:
      - name: hot for 30 seconds
        events:
          - {at: 0s, device: gh-1, t: 31}
          - {at: 10s, device: gh-1, t: 35}
          - {advance: 1m}
        expect:
          - {at: 30s, rule: hot, device: gh-1, state: raised}
          - {at: 30s, rule: hot, device: gh-1, command: fan, params: {on: true}}
      - name: silent device
        known_devices: [gh-2]
        events:
          - {advance: 2m}
        expect:
          - {at: 2m, rule: silent, device: gh-2, state: raised}
    """
)


def test_a_passing_file() -> None:
    results = run_rule_tests(build_rule_set({"a.yaml": RULES}))
    assert [(r.file, r.name, r.passed, r.diff) for r in results] == [
        ("a.yaml", "hot for 30 seconds", True, ""),
        ("a.yaml", "silent device", True, ""),
    ]
    assert results[0].actual == (
        "{at: 30s, rule: hot, device: gh-1, state: raised}",
        '{at: 30s, rule: hot, device: gh-1, command: fan, params: {"on": true}}',
    )


def test_a_failing_case_shows_a_diff_and_unexpected_actions_fail() -> None:
    text = RULES.replace(
        "{at: 30s, rule: hot, device: gh-1, state: raised}",
        "{at: 20s, rule: hot, device: gh-1, state: raised}",
    )
    text = text.rsplit("expect:", 1)[0] + "expect: []\n"  # the silent case now expects nothing
    results = run_rule_tests(build_rule_set({"a.yaml": text}))
    assert [r.passed for r in results] == [False, False]
    assert results[0].diff == "\n".join(
        [
            "--- expected",
            "+++ actual",
            "@@ -1,2 +1,2 @@",
            "-{at: 20s, rule: hot, device: gh-1, state: raised}",
            "+{at: 30s, rule: hot, device: gh-1, state: raised}",
            ' {at: 30s, rule: hot, device: gh-1, command: fan, params: {"on": true}}',
        ]
    )
    # nothing expected, something happened: "and nothing else" fails the case
    assert results[1].expected == () and results[1].actual == (
        "{at: 2m, rule: silent, device: gh-2, state: raised}",
    )


def test_cases_run_only_their_own_files_rules() -> None:
    other = "rules:\n  - id: anything\n    when: t > 0\n"
    results = run_rule_tests(build_rule_set({"a.yaml": RULES, "b.yaml": other}))
    assert all(r.passed for r in results)


def test_late_arrival_is_processed_at_the_current_clock() -> None:
    text = dedent(
        """\
        lateness: 10s
        rules:
          - id: hot
            when: t > 30
        tests:
          - name: late
            events:
              - {at: 1m, device: d, t: 20}
              - {at: 10s, device: d, t: 40}
            expect: []
        """
    )
    [result] = run_rule_tests(build_rule_set({"a.yaml": text}))
    assert result.passed, result.diff


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("{at: 0s, t: 1}", "missing 'device'"),
        ("{at: soon, device: d, t: 1}", "expected a duration"),
        ("{at: 0s, device: d}", "an event needs at least one field"),
        ("{advance: 1m, device: d}", "an `advance` step takes no other keys"),
        ("{at: 0s, device: d, ts: 5}", "'ts' is not a metric field name"),
        ("{at: 0s, device: d, t: [1]}", "t: expected a number, true/false or text"),
    ],
)
def test_invalid_steps_are_located(step: str, message: str) -> None:
    text = f"rules: []\ntests:\n  - name: x\n    events:\n      - {step}\n    expect: []\n"
    with pytest.raises(Exception) as caught:
        build_rule_set({"a.yaml": text})
    [problem] = caught.value.problems  # type: ignore[attr-defined]
    assert (problem.file, problem.line, problem.where) == ("a.yaml", 5, "tests[0].events[0]")
    assert message in problem.message


def test_cli_rules_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(RULES)
    assert main(["rules", "test", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (
        out
        == f"PASS  {tmp_path / 'a.yaml'}: hot for 30 seconds\nPASS  {tmp_path / 'a.yaml'}: silent device\n2 passed, 0 failed\n"
    )
    (tmp_path / "a.yaml").write_text(RULES.replace("at: 2m, rule: silent", "at: 3m, rule: silent"))
    assert main(["rules", "test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {tmp_path / 'a.yaml'}: silent device\n" in out
    assert "    -{at: 3m, rule: silent, device: gh-2, state: raised}\n" in out
    assert "    +{at: 2m, rule: silent, device: gh-2, state: raised}\n" in out
    assert out.endswith("1 passed, 1 failed\n")


def test_cli_rules_test_without_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text("rules:\n  - id: x\n    when: t > 1\n")
    assert main(["rules", "test", str(tmp_path)]) == 1
    assert "no test cases found" in capsys.readouterr().err


def test_shipped_examples_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "test", str(REPO / "deploy" / "rules")]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.endswith(" 0 failed\n") and int(out.split()[-4]) >= 6


EVERYTHING = dedent(
    """\
    lateness: 10s
    rules:
      - id: site-warm
        devices: {type: greenhouse}
        group_by: site
        when: avg(t, 5m) > 28
        on_raise:
          - alert
          - command: {name: vent, device: "{group}-controller"}
          - republish: {topic: "alerts/{group}/{rule}"}
          - webhook: {url: "https://hooks.example/tidegate"}
      - id: pump
        devices: {tags: {site: north}}
        when: moisture < 20
        on_raise:
          - command: {name: run, device: "{tags.zone}-pump"}
    derived:
      - id: gh-1m
        devices: {type: greenhouse}
        every: 1m
        fields: {t: avg(t), n: count(t)}
    tests:
      - name: everything
        known_devices:
          - {id: gh-1, type: greenhouse, tags: {site: north, zone: z1}}
          - {id: gh-2, type: greenhouse, tags: {site: north}}
          - gh-9
        events:
          - {at: 0s, device: gh-1, t: 27}
          - {at: 20s, device: gh-2, t: 31}
          - {at: 30s, device: gh-1, moisture: 10}
          - {advance: 1m}
        expect:
          - {at: 20s, rule: site-warm, group: site=north, state: raised}
          - {at: 20s, rule: site-warm, device: north-controller, command: vent}
          - {at: 20s, rule: site-warm, group: site=north, republish: alerts/north/site-warm, state: raised}
          - {at: 20s, rule: site-warm, group: site=north, webhook: "https://hooks.example/tidegate", state: raised}
          - {at: 30s, rule: pump, device: z1-pump, command: run}
          - {at: 0s, derived: gh-1m, device: gh-1, fields: {t: 27, n: 1}}
          - {at: 0s, derived: gh-1m, device: gh-2, fields: {t: 31, n: 1}}
    """
)


def test_group_alerts_republish_webhooks_and_derived_points_can_be_expected() -> None:
    [result] = run_rule_tests(build_rule_set({"a.yaml": EVERYTHING}))
    assert result.passed, result.diff
    assert result.actual == (
        '{at: 0s, derived: gh-1m, device: gh-1, fields: {"n": 1.0, "t": 27.0}}',
        '{at: 0s, derived: gh-1m, device: gh-2, fields: {"n": 1.0, "t": 31.0}}',
        "{at: 20s, rule: site-warm, group: site=north, state: raised}",
        "{at: 20s, rule: site-warm, device: north-controller, command: vent, params: {}}",
        "{at: 20s, rule: site-warm, group: site=north, republish: alerts/north/site-warm, state: raised}",
        "{at: 20s, rule: site-warm, group: site=north, webhook: https://hooks.example/tidegate, state: raised}",
        "{at: 30s, rule: pump, device: z1-pump, command: run, params: {}}",
    )


def test_a_wrong_derived_value_or_a_failed_action_fails_the_case() -> None:
    text = EVERYTHING.replace("fields: {t: 31, n: 1}", "fields: {t: 31.5, n: 1}")
    text = text.replace("{at: 30s, device: gh-1, moisture: 10}", "{at: 30s, device: gh-2, moisture: 10}")
    [result] = run_rule_tests(build_rule_set({"a.yaml": text}))
    assert not result.passed
    diff = result.diff.splitlines()
    assert '-{at: 0s, derived: gh-1m, device: gh-2, fields: {"n": 1.0, "t": 31.5}}' in diff
    assert '+{at: 0s, derived: gh-1m, device: gh-2, fields: {"n": 1.0, "t": 31.0}}' in diff
    assert (
        "+{at: 30s, rule: pump, device: gh-2, failed: on_raise[0]: {tags.zone} is not known here "
        "(e.g. the device has no such tag)}"
    ) in diff


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{at: 0s, rule: r, state: raised}",
            "expected exactly one of `device: <id>` or `group: <tag>=<value>`",
        ),
        ("{at: 0s, rule: r, device: d, group: site=n, state: raised}", "expected exactly one of"),
        ("{at: 0s, rule: r, group: north, state: raised}", "group: expected <tag>=<value>"),
        ("{at: 0s, derived: m, device: d, fields: {t: hot}}", "valid number"),
        ("{at: 0s, rule: r, device: d, republish: a/b}", "Field required"),
    ],
)
def test_invalid_expectations_are_located(entry: str, message: str) -> None:
    text = f"rules: []\ntests:\n  - name: x\n    events:\n      - {{advance: 1s}}\n    expect:\n      - {entry}\n"
    with pytest.raises(SourceFileError) as caught:
        build_rule_set({"a.yaml": text})
    problems = caught.value.problems
    assert any(message in p.message for p in problems), [p.message for p in problems]
    assert all(p.line == 7 and p.where.startswith("tests[0].expect[0]") for p in problems), problems


def test_the_readme_example_loads_and_its_test_passes() -> None:
    readme = (REPO / "README.md").read_text()
    chapter = readme[readme.index("## For operators: writing rules") :]
    rules_block, tests_block = re.findall(r"```yaml\n(.*?)```", chapter, re.S)[:2]
    results = run_rule_tests(build_rule_set({"readme.yaml": rules_block + tests_block}))
    assert [(r.name, r.passed) for r in results] == [("a warm site turns its heating down", True)]
