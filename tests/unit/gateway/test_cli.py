"""The `tidegate` command line, driven through `main(argv)` as the console script drives it."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import build_parser, main, parse_duration

DEPLOY = Path(__file__).parents[3] / "deploy"
EXAMPLE_CONFIG = DEPLOY / "config.example.yaml"
EXAMPLE_RULES = DEPLOY / "rules"
SECRET = "hunter2-do-not-print"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own TIDEGATE_* overrides must not change what these tests see.
    for name in list(os.environ):
        if name.startswith("TIDEGATE_"):
            monkeypatch.delenv(name)


def flat(text: str) -> str:
    """Join argparse's wrapped lines, so phrases match whatever the terminal width."""
    return " ".join(text.split())


# -- --help -------------------------------------------------------------------------------------------

HELP_CASES = [
    pytest.param(
        [],
        ["usage: tidegate", "run", "config", "rules", "demo", "simulate", "query", "own --help"],
        id="tidegate",
    ),
    pytest.param(["run"], ["usage: tidegate run", "--config", "SIGINT or SIGTERM"], id="run"),
    pytest.param(
        ["status"], ["usage: tidegate status", "--url", "--config", "http.listen", "--json"], id="status"
    ),
    pytest.param(
        ["alerts"],
        ["usage: tidegate alerts", "--url", "--config", "--json", "http.listen", "acknowledged", "ack"],
        id="alerts",
    ),
    pytest.param(
        ["alerts", "ack"],
        ["usage: tidegate alerts ack", "RULE", "DEVICE", "--url", "--config", "Exit 1"],
        id="alerts-ack",
    ),
    pytest.param(
        ["devices"],
        ["usage: tidegate devices", "--url", "--config", "--json", "http.listen", "last seen", "alarms"],
        id="devices",
    ),
    pytest.param(["config"], ["usage: tidegate config", "check", "validate a config file"], id="config"),
    pytest.param(
        ["config", "check"],
        ["usage: tidegate config check", "FILE", "--show", "secrets masked", "TIDEGATE_*", "every problem"],
        id="config-check",
    ),
    pytest.param(["rules"], ["usage: tidegate rules", "check", "validate rule files"], id="rules"),
    pytest.param(
        ["rules", "check"],
        ["usage: tidegate rules check", "DIR", "every rule file", "exit 1"],
        id="rules-check",
    ),
    pytest.param(
        ["rules", "test"],
        ["usage: tidegate rules test", "DIR", "tests:", "diff", "exit 1"],
        id="rules-test",
    ),
    pytest.param(
        ["demo"],
        [
            "usage: tidegate demo",
            "--duration",
            "--json",
            "--devices",
            "--rate",
            "--seed",
            "--dir",
            "--broker",
            "mosquitto",
            "amqtt",
            "SQLite",
            "summary",
        ],
        id="demo",
    ),
    pytest.param(
        ["simulate"],
        ["usage: tidegate simulate", "--broker", "mqtt://HOST:PORT", "--devices", "--rate", "--duration"],
        id="simulate",
    ),
    pytest.param(
        ["query"],
        [
            "usage: tidegate query",
            "--config",
            "--sqlite",
            "--measurement",
            "telemetry,alerts,commands",
            "--device",
            "--field",
            "--since",
            "--until",
            "--every",
            "--agg",
            "--limit",
            "--json",
        ],
        id="query",
    ),
    pytest.param(["command"], ["usage: tidegate command", "send", "list", "allow-list"], id="command"),
    pytest.param(
        ["command", "send"],
        [
            "usage: tidegate command send",
            "DEVICE NAME [KEY=VALUE ...]",
            "--wait",
            "--timeout",
            "--ttl",
            "--direct",
            "--url",
            "exit status: 0 the device acked ok",
        ],
        id="command-send",
    ),
    pytest.param(
        ["command", "list"],
        ["usage: tidegate command list", "--config", "--url", "--json"],
        id="command-list",
    ),
]


@pytest.mark.parametrize(("command", "expected"), HELP_CASES)
def test_help_exits_0_and_explains_the_command(
    command: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    shown = flat(out)
    missing = [phrase for phrase in expected if phrase not in shown]
    assert not missing, f"`tidegate {' '.join(command)} --help` does not mention {missing}:\n{out}"


def test_every_subcommand_has_a_help_case() -> None:
    # A new subcommand must come with a --help case above.
    covered: set[tuple[str, ...]] = {tuple(case.values[0]) for case in HELP_CASES}  # type: ignore[arg-type]
    leaves: set[tuple[str, ...]] = set()

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        leaves.add(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*path, name))

    walk(build_parser(), ())
    assert leaves == covered


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


# -- durations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("0", 0.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "abc", "-5s", "5x", "5 m", "1h30m", ".5s", "5sec", "1e3", "inf", "nan", "30s!"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        parse_duration(text)


def test_a_bad_duration_is_a_usage_error_that_names_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--duration", "soon"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--duration" in err and "'soon'" in err and "30s, 5m, 2h" in err


# -- config check -------------------------------------------------------------------------------------


def test_config_check_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(EXAMPLE_CONFIG)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE_CONFIG}: ok\n"
    assert err == ""


@pytest.mark.parametrize(
    ("variable", "section"), [("TIDEGATE_STORE__PASSWORD", "store"), ("TIDEGATE_MQTT__PASSWORD", "mqtt")]
)
def test_config_check_show_masks_secrets_from_the_environment(
    variable: str, section: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, SECRET)
    monkeypatch.setenv("TIDEGATE_MQTT__URL", "mqtt://broker.example:1884")
    assert main(["config", "check", str(EXAMPLE_CONFIG), "--show"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    first, _, rest = out.partition("\n")
    assert first == f"{EXAMPLE_CONFIG}: ok"
    shown = json.loads(rest)
    # the overrides were applied (so the secret was really there to hide), and the secret is masked
    assert shown["mqtt"]["url"] == "mqtt://broker.example:1884"
    assert shown[section]["password"] not in (None, "", SECRET)
    assert set(shown[section]["password"]) == {"*"}


def test_config_check_never_prints_a_secret_in_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tidegate.yaml"
    path.write_text("store:\n  kind: sqlite\n")  # the sqlite store has no password: an error
    monkeypatch.setenv("TIDEGATE_STORE__PASSWORD", SECRET)
    assert main(["config", "check", str(path), "--show"]) == 1
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert "error: environment TIDEGATE_STORE__PASSWORD: store.password: " in err


BROKEN_CONFIG = """\
mqtt:
  url: mqtt://127.0.0.1:1883
  keepalive: -5
  clientid: tidegate
store:
  kind: influxdb_v1
  timeout: fast
batch:
  size: 0
"""


def test_config_check_lists_every_problem_with_its_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN_CONFIG)
    assert main(["config", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    expected = [
        (3, 14, "mqtt.keepalive", "greater than or equal to 5", "-5"),
        (4, 13, "mqtt.clientid", "Extra inputs are not permitted", "'tidegate'"),
        (7, 12, "store.timeout", "valid number", "'fast'"),
        (9, 9, "batch.size", "greater than or equal to 1", "0"),
    ]
    lines = err.splitlines()
    assert len(lines) == len(expected) + 1, err
    for (line, column, where, message, value), shown in zip(expected, lines[:-1], strict=True):
        assert shown.startswith(f"error: {path}:{line}:{column}: {where}: "), err
        assert message in shown and f"(got {value})" in shown, shown
    assert lines[-1] == f"{len(expected)} problem(s) found"


def test_config_check_locates_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("mqtt:\n  url: mqtt://127.0.0.1:1883\n  topics: [unclosed\n")
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert re.match(rf"error: {re.escape(str(path))}:\d+:\d+: invalid YAML: ", err), err


def test_config_check_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.yaml"
    assert main(["config", "check", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {path}: cannot read")


# -- rules check --------------------------------------------------------------------------------------


def test_rules_check_accepts_the_examples_and_counts_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(EXAMPLE_RULES.glob("*.yaml"))
    assert files, f"no example rule files in {EXAMPLE_RULES}"
    docs = [yaml.safe_load(f.read_text(encoding="utf-8")) for f in files]
    rules = sum(len(doc.get("rules") or []) for doc in docs)
    derived = sum(len(doc.get("derived") or []) for doc in docs)
    assert main(["rules", "check", str(EXAMPLE_RULES)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE_RULES}: {rules} rule(s), {derived} derived metric(s) ok\n"
    assert err == ""


BROKEN_RULES = """\
rules:
  - id: hot
    when: temperature >
  - id: loud
    when: noise > 80
    severity: huge
    colour: red
"""


def test_rules_check_lists_every_problem_with_its_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "good.yaml").write_text("rules:\n  - id: fine\n    when: temperature > 30\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN_RULES)
    (tmp_path / "notes.txt").write_text("not a rule file: ignored\n")
    assert main(["rules", "check", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    expected = [
        (3, 11, "rules[0].when", "rule 'hot'", "invalid expression"),
        (6, 15, "rules[1].severity", "rule 'loud'", "'huge'"),
        (7, 13, "rules[1].colour", "rule 'loud'", "unknown key 'colour'"),
    ]
    lines = err.splitlines()
    assert len(lines) == len(expected) + 1, err
    for (line, column, where, rule, message), shown in zip(expected, lines[:-1], strict=True):
        assert shown.startswith(f"error: {broken}:{line}:{column}: {where}: {rule}: "), err
        assert message in shown, shown
    assert lines[-1] == f"{len(expected)} problem(s) found"


def test_rules_check_reports_duplicate_ids_across_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text("rules:\n  - id: hot\n    when: temperature > 30\n")
    (tmp_path / "b.yaml").write_text("rules:\n  - id: hot\n    when: temperature > 35\n")
    assert main(["rules", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'b.yaml'}:2:9: rules[0].id: rule 'hot': duplicate id"), err
    assert f"{tmp_path / 'a.yaml'}:2:9" in err


def test_rules_check_of_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    assert main(["rules", "check", str(missing)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {missing}: no such file or directory\n")


# -- query --------------------------------------------------------------------------------------------


def test_query_of_a_missing_sqlite_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.db"
    assert main(["query", "--sqlite", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {missing}: no such file\n"
    assert not missing.exists()  # reading must not create an empty store as a side effect


def test_query_takes_either_a_config_or_a_sqlite_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["query", "--sqlite", "a.db", "-c", "tidegate.yaml"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_status_without_an_endpoint_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", "http://127.0.0.1:1"]) == 1
    assert "error: cannot read http://127.0.0.1:1/status" in capsys.readouterr().err


def test_status_reads_a_running_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from gateway.httpapi import StatusServer

    async def scenario() -> int:
        server = StatusServer("127.0.0.1", 0, lambda: {"received": 7, "mqtt_connected": True})
        ready = asyncio.Event()
        task = asyncio.create_task(server.run(ready))
        await ready.wait()
        try:
            return await asyncio.to_thread(
                main, ["status", "--url", f"http://127.0.0.1:{server.port}", "--json"]
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(scenario()) == 0
    assert json.loads(capsys.readouterr().out) == {"received": 7, "mqtt_connected": True}


def test_devices_prints_a_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio
    import time

    from gateway.httpapi import StatusServer

    rows: list[dict[str, Any]] = [
        {
            "device": "gh-1",
            "type": "greenhouse",
            "registered": True,
            "quarantined": False,
            "tags": {"site": "north"},
            "status": "online",
            "status_since": time.time() - 30,
            "last_seen": time.time() - 5,
            "rate": 2.0,
            "alarms": 1,
        },
        {
            "device": "stray",
            "type": None,
            "registered": False,
            "quarantined": True,
            "tags": {},
            "status": "unknown",
            "status_since": None,
            "last_seen": None,
            "rate": 0.0,
            "alarms": 0,
        },
    ]

    async def scenario() -> tuple[int, int]:
        server = StatusServer("127.0.0.1", 0, dict, devices=lambda: rows)
        ready = asyncio.Event()
        task = asyncio.create_task(server.run(ready))
        await ready.wait()
        url = f"http://127.0.0.1:{server.port}"
        try:
            table = await asyncio.to_thread(main, ["devices", "--url", url])
            as_json = await asyncio.to_thread(main, ["devices", "--url", url, "--json"])
            return table, as_json
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(scenario()) == (0, 0)
    table, as_json = capsys.readouterr().out.split("\n2 device(s), 1 online\n")
    lines = table.splitlines()
    assert lines[0].split() == ["DEVICE", "TYPE", "STATUS", "LAST", "SEEN", "MSG/S", "ALARMS"]
    assert lines[1].split() == ["gh-1", "greenhouse", "online", "5s", "ago", "2.00", "1"]
    assert lines[2].split() == ["stray", "(quarantined)", "unknown", "never", "0.00", "0"]
    assert json.loads(as_json) == rows


def test_devices_without_an_endpoint_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--url", "http://127.0.0.1:1"]) == 1
    assert "error: cannot read http://127.0.0.1:1/devices" in capsys.readouterr().err
