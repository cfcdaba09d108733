"""Configuration: every problem reported with its location; environment overrides; secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.errors import SourceFileError
from gateway.config import InfluxV1Settings, SqliteSettings, load_settings, redacted

EXAMPLE = Path(__file__).parents[3] / "deploy" / "config.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tidegate.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings(None, environ={})
    assert settings.mqtt.url == "mqtt://127.0.0.1:1883"
    assert isinstance(settings.store, SqliteSettings)


def test_example_config_is_valid() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert isinstance(settings.store, InfluxV1Settings)
    assert settings.rules.dir == EXAMPLE.parent / "rules"


def test_every_problem_is_listed_with_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mqtt:\n  url: http://x\n  keepalive: 1\n  bogus: 3\nstore:\n  kind: influxdb_v1\n  timeout: -1\n",
    )
    with pytest.raises(SourceFileError) as info:
        load_settings(path, environ={})
    shown = [str(p) for p in info.value.problems]
    assert shown == [
        f"{path}:2:8: mqtt.url: Value error, expected mqtt://HOST[:PORT] (got 'http://x')",
        f"{path}:3:14: mqtt.keepalive: Input should be greater than or equal to 5 (got 1)",
        f"{path}:4:10: mqtt.bogus: Extra inputs are not permitted (got 3)",
        f"{path}:7:12: store.timeout: Input should be greater than 0 (got -1)",
    ]


def test_invalid_yaml_is_located(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  url: [unclosed\n")
    with pytest.raises(SourceFileError) as info:
        load_settings(path, environ={})
    [problem] = info.value.problems
    assert problem.line == 3 and "invalid YAML" in problem.message


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  url: mqtt://a:1883\n")
    settings = load_settings(
        path, environ={"TIDEGATE_MQTT__URL": "mqtt://b:1884", "TIDEGATE_BATCH__SIZE": "10"}
    )
    assert (settings.mqtt.host, settings.mqtt.port, settings.batch.size) == ("b", 1884, 10)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SourceFileError) as info:
        load_settings(write(tmp_path, "{}"), environ={"TIDEGATE_MQTT__PROTOCOL": "4"})
    [problem] = info.value.problems
    assert problem.file == "environment TIDEGATE_MQTT__PROTOCOL"


def test_secrets_never_shown(tmp_path: Path) -> None:
    secret = "hunter2-very-secret"
    path = write(tmp_path, f"store:\n  kind: influxdb_v1\n  password: {secret}\n  timeout: x\n")
    with pytest.raises(SourceFileError) as info:
        load_settings(path, environ={"TIDEGATE_MQTT__PASSWORD": secret})
    assert secret not in str(info.value)
    settings = load_settings(
        write(tmp_path, f"store:\n  kind: influxdb_v1\n  password: {secret}\n"),
        environ={"TIDEGATE_MQTT__PASSWORD": secret},
    )
    assert secret not in repr(settings) and secret not in str(redacted(settings))
    # a secret in a position that fails validation is not echoed either
    with pytest.raises(SourceFileError) as info:
        load_settings(write(tmp_path, "store:\n  kind: influxdb_v2\n  token: [a]\n"), environ={})
    assert "[a]" not in str(info.value)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "store:\n  kind: sqlite\n  path: data/t.db\nrules:\n  dir: r\n"), environ={}
    )
    assert isinstance(settings.store, SqliteSettings)
    assert settings.store.path == tmp_path / "data" / "t.db"
    assert settings.rules.dir == tmp_path / "r"


def test_topic_templates_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SourceFileError, match="exactly one whole segment"):
        load_settings(write(tmp_path, "mqtt:\n  topics:\n    telemetry: devices/telemetry\n"), environ={})


def test_devices_file_resolves_next_to_the_config_and_the_example_registry_parses(tmp_path: Path) -> None:
    from gateway.devicefile import read_device_file

    config = tmp_path / "config.yaml"
    config.write_text("devices:\n  file: devices.yaml\n  unknown: quarantine\n", encoding="utf-8")
    settings = load_settings(config, environ={})
    assert settings.devices.file == tmp_path / "devices.yaml"
    assert settings.devices.unknown == "quarantine"
    example = Path(__file__).parents[3] / "deploy" / "devices.example.yaml"
    assert "sim-0001" in read_device_file(example).devices


def test_unknown_device_policy_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("devices:\n  unknown: ignore\n", encoding="utf-8")
    with pytest.raises(SourceFileError, match=r"config.yaml:2:12: devices.unknown"):
        load_settings(config, environ={})


def test_an_unreadable_devices_file_is_a_located_error(tmp_path: Path) -> None:
    from gateway.devicefile import read_device_file

    with pytest.raises(SourceFileError, match=r"missing\.yaml: cannot read"):
        read_device_file(tmp_path / "missing.yaml")
