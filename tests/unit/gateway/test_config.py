"""Configuration: every problem reported with its location; environment overrides; secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devices.errors import SourceFileError
from gateway.config import InfluxV1Settings, SqliteSettings, load_settings, redacted
from tests.integration.mqtt_servers import TestCA

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
        f"{path}:2:8: mqtt.url: Value error, expected mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS (got 'http://x')",
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


# -- mqtt: TLS and credentials ------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki", "unit-test-ca")


def test_mqtts_url_means_tls_on_port_8883_and_mqtt_means_plain_1883(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "mqtt:\n  url: mqtts://broker.example\n"), environ={})
    assert (settings.mqtt.tls_enabled, settings.mqtt.host, settings.mqtt.port) == (
        True,
        "broker.example",
        8883,
    )
    settings = load_settings(write(tmp_path, "mqtt:\n  url: mqtts://broker.example:9883\n"), environ={})
    assert settings.mqtt.port == 9883
    assert (load_settings(None, environ={}).mqtt.tls_enabled, load_settings(None, environ={}).mqtt.port) == (
        False,
        1883,
    )
    with pytest.raises(
        SourceFileError, match=r"tidegate.yaml:2:8: mqtt.url: .*mqtts://HOST\[:PORT\] for TLS"
    ):
        load_settings(write(tmp_path, "mqtt:\n  url: tls://broker\n"), environ={})


def test_a_tls_section_with_a_plain_url_is_refused_not_ignored(tmp_path: Path, ca: TestCA) -> None:
    path = write(tmp_path, f"mqtt:\n  url: mqtt://broker:1883\n  tls:\n    ca_file: {ca.cert}\n")
    with pytest.raises(SourceFileError, match=r"tidegate.yaml:4:5: mqtt.tls: .*url is mqtt:// \(plain TCP\)"):
        load_settings(path, environ={})
    # the environment can switch the URL to TLS
    settings = load_settings(path, environ={"TIDEGATE_MQTT__URL": "mqtts://broker"})
    assert settings.mqtt.tls.ca_file == ca.cert


def test_there_is_no_switch_to_skip_certificate_verification(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  url: mqtts://b\n  tls:\n    insecure_skip_verify: true\n")
    with pytest.raises(SourceFileError, match=r"4:27: mqtt.tls.insecure_skip_verify: Extra inputs"):
        load_settings(path, environ={})


def test_tls_and_password_file_paths_resolve_against_the_config_file(tmp_path: Path, ca: TestCA) -> None:
    client = ca.issue("tidegate", file_name="client")
    (tmp_path / "mqtt-password").write_text("  s3cret-from-file \n")
    path = write(
        tmp_path,
        "mqtt:\n  url: mqtts://127.0.0.1\n  username: tidegate\n  password_file: mqtt-password\n"
        "  tls:\n    ca_file: pki/unit-test-ca.pem\n    cert_file: pki/client.crt\n    key_file: pki/client.key\n"
        "    server_name: broker.example\n",
    )
    mqtt = load_settings(path, environ={}).mqtt
    assert mqtt.password_file == tmp_path / "mqtt-password"
    assert (mqtt.tls.ca_file, mqtt.tls.cert_file, mqtt.tls.key_file) == (ca.cert, client.cert, client.key)
    assert mqtt.tls.server_name == "broker.example"
    password = mqtt.read_password()
    assert password is not None and password.get_secret_value() == "s3cret-from-file"  # stripped
    assert "s3cret" not in repr(mqtt)


def test_password_and_password_file_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    path = write(tmp_path, "mqtt:\n  password_file: pw\n")
    with pytest.raises(
        SourceFileError, match=r"tidegate.yaml:2:18: mqtt.password_file: .*set either password or"
    ):
        load_settings(path, environ={"TIDEGATE_MQTT__PASSWORD": "from-env"})
    # either alone is fine; the environment's password is the usual way
    assert load_settings(path, environ={}).mqtt.read_password() is not None
    env_only = load_settings(None, environ={"TIDEGATE_MQTT__PASSWORD": "from-env"}).mqtt.read_password()
    assert env_only is not None and env_only.get_secret_value() == "from-env"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read the password file: No such file or directory"),
        (b" \n", "the password file is empty"),
        (b"caf\xe9-secret", "the password file is not UTF-8 text"),
    ],
)
def test_a_bad_password_file_is_a_located_error_that_never_shows_its_contents(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    if content is not None:
        (tmp_path / "pw").write_bytes(content)
    path = write(tmp_path, "mqtt:\n  username: tidegate\n  password_file: pw\n")
    with pytest.raises(SourceFileError) as info:
        load_settings(path, environ={})
    [problem] = info.value.problems
    assert str(problem).startswith(f"{path}:3:18: mqtt.password_file: {tmp_path / 'pw'}: {expected}")
    assert "secret" not in str(info.value)
    # from the environment, the problem names the variable
    with pytest.raises(
        SourceFileError, match=r"environment TIDEGATE_MQTT__PASSWORD_FILE: mqtt\.password_file"
    ):
        load_settings(None, environ={"TIDEGATE_MQTT__PASSWORD_FILE": str(tmp_path / "pw")})


def test_tls_files_are_loaded_at_check_time_and_problems_located(tmp_path: Path, ca: TestCA) -> None:
    client = ca.issue("tidegate", file_name="client")
    other = ca.issue("other", file_name="other")
    encrypted = tmp_path / "encrypted.key"
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    cases = {
        f"ca_file: {tmp_path / 'missing.pem'}": "mqtt.tls.ca_file: {}: cannot read: No such file or directory",
        f"ca_file: {client.key}": "mqtt.tls.ca_file: {}: no PEM CA certificate in it",
        f"cert_file: {client.key}": "mqtt.tls.cert_file: {}: no PEM certificate in it",
        f"cert_file: {client.cert}\n    key_file: {other.key}": (
            f"mqtt.tls.key_file: {{}}: this private key does not belong to the certificate in {client.cert}"
        ),
        f"cert_file: {client.cert}\n    key_file: {encrypted}": "mqtt.tls.key_file: {}: the private key is encrypted",
        f"key_file: {client.key}": "mqtt.tls.key_file: Value error, key_file is set without cert_file",
    }
    for setting, expected in cases.items():
        path = write(tmp_path, f"mqtt:\n  url: mqtts://b\n  tls:\n    {setting}\n")
        with pytest.raises(SourceFileError) as info:
            load_settings(path, environ={})
        [problem] = info.value.problems
        named = setting.splitlines()[-1].split(": ", 1)[1]
        assert expected.format(named) in str(problem), (setting, str(problem))
        assert problem.line is not None
        assert "PRIVATE KEY" not in str(problem)
    settings = load_settings(
        write(
            tmp_path,
            f"mqtt:\n  url: mqtts://b\n  tls:\n    cert_file: {client.cert}\n    key_file: {client.key}\n",
        ),
        environ={},
    )
    assert settings.mqtt.tls.ca_file is None  # the system's CAs


def test_commands_that_need_no_secrets_can_skip_reading_them(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  url: mqtts://b\n  password_file: pw\n  tls:\n    ca_file: ca.pem\n")
    with pytest.raises(SourceFileError):
        load_settings(path, environ={})
    settings = load_settings(path, environ={}, check_files=False)  # `tidegate status -c` as another user
    assert settings.mqtt.tls.ca_file == tmp_path / "ca.pem"
