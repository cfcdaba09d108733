"""S2: the MQTT password never shows: not in logs (ours and paho's, at DEBUG), errors, `/status`,
`/metrics`, the status snapshot or `tidegate config check` output.

A real mosquitto requires the password; the gateway tries a wrong one (from the environment) and then
the right one (from a password file), and every place an operator or a scraper can look is searched
for both strings.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import paho.mqtt.publish as publish
import pytest

from gateway.app import Gateway
from gateway.cli import main
from gateway.config import load_settings
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from tests.integration.mqtt_servers import ConfiguredMosquitto, StartMosquitto, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RIGHT = "Right-pw-5d1e8a-never-shown"
WRONG = "Wrong-pw-93b7c2-never-shown"


@pytest.fixture
def password_broker(mosquitto_with: StartMosquitto, tmp_path: Path) -> tuple[ConfiguredMosquitto, int]:
    """Return a broker and the port of its listener that takes only user `tidegate` with RIGHT."""
    passwords = tmp_path / "mosquitto-passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "tidegate", RIGHT], check=True)
    passwords.chmod(0o644)
    port = free_port()
    broker = mosquitto_with(
        [f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {passwords}"],
        per_listener_settings=True,
    )
    return broker, port


def write_config(directory: Path, port: int, http_port: int, *, password_file: Path | None = None) -> Path:
    lines = [
        "mqtt:",
        f"  url: mqtt://127.0.0.1:{port}",
        f"  client_id: tg-s2-{uuid.uuid4().hex[:6]}",
        "  username: tidegate",
        "  reconnect_min_delay: 0.2",
    ]
    if password_file is not None:
        lines.append(f"  password_file: {password_file}")
    lines += [
        "store:",
        "  kind: 'null'",
        "batch:",
        "  flush_interval: 0.05",
        "http:",
        f"  listen: 127.0.0.1:{http_port}",
    ]
    path = directory / "tidegate.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.02)


def run_and_look(gateway: Gateway, http_port: int, ready: Callable[[], bool], what: str) -> list[str]:
    """Run the gateway until `ready`, then return what /status and /metrics served and the snapshot."""

    async def scenario() -> list[str]:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(gateway.run(stop))
            try:
                await until(ready, what)
                base = f"http://127.0.0.1:{http_port}"
                async with httpx.AsyncClient(timeout=5) as client:
                    await until(lambda: gateway.status_server is not None, "status endpoint up")
                    status = (await client.get(f"{base}/status")).text
                    metrics = (await client.get(f"{base}/metrics")).text
                return [status, metrics, repr(gateway.snapshot()), gateway.mqtt.stats.last_error]
            finally:
                stop.set()

    return asyncio.run(scenario())


def test_s2_the_password_never_appears_in_logs_status_metrics_or_config_check(
    password_broker: tuple[ConfiguredMosquitto, int],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)  # before the gateway exists: paho's own trace is switched on with it
    broker, port = password_broker
    seen: list[str] = []

    # 1. the wrong password, from the environment: refused, reported, retried
    http_port = free_port()
    wrong_dir = tmp_path / "wrong"
    wrong_dir.mkdir()
    config = write_config(wrong_dir, port, http_port)
    monkeypatch.setenv("TIDEGATE_MQTT__PASSWORD", WRONG)
    settings = load_settings(config)
    assert settings.mqtt.password is not None and settings.mqtt.password.get_secret_value() == WRONG
    gateway = Gateway(settings, rule_set=build_rule_set({}), store=MemoryStore())
    seen += run_and_look(
        gateway, http_port, lambda: "Not authorized" in gateway.mqtt.stats.last_error, "refusal reported"
    )
    assert gateway.mqtt.stats.connects == 0
    assert "broker refused the connection: Not authorized" in seen[0]  # /status tells why
    seen += [repr(settings), str(settings)]
    assert main(["config", "check", str(config), "--show"]) == 0
    # a config with a problem next to a password from the environment
    bad = wrong_dir / "bad.yaml"
    bad.write_text("mqtt:\n  username: tidegate\n  keepalive: 1\n", encoding="utf-8")
    assert main(["config", "check", str(bad)]) == 1
    monkeypatch.delenv("TIDEGATE_MQTT__PASSWORD")

    # 2. the right password, from a file: connected, telemetry stored
    http_port = free_port()
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(RIGHT + "\n", encoding="utf-8")
    config = write_config(tmp_path, port, http_port, password_file=password_file)
    settings = load_settings(config)
    store = MemoryStore()
    gateway = Gateway(settings, rule_set=build_rule_set({}), store=store)

    def stored() -> bool:
        if gateway.mqtt.connected.is_set() and not store.points:
            publish.single(
                "devices/s2-dev/telemetry",
                b'{"seq": 1, "t": 1}',
                qos=1,
                hostname=broker.host,
                port=broker.port,
            )
        return any(p.measurement == "telemetry" for p in store.points)

    seen += run_and_look(gateway, http_port, stored, "telemetry stored with the right password")
    seen += [repr(settings), str(settings)]
    assert main(["config", "check", str(config), "--show"]) == 0
    # the password written into the file itself, shown with --show
    inline = tmp_path / "inline.yaml"
    inline.write_text(f"mqtt:\n  username: tidegate\n  password: {RIGHT}\n", encoding="utf-8")
    assert main(["config", "check", str(inline), "--show"]) == 0
    bad_inline = tmp_path / "bad-inline.yaml"
    bad_inline.write_text(f"mqtt:\n  password: [{RIGHT}]\n  keepalive: x\n", encoding="utf-8")
    assert main(["config", "check", str(bad_inline)]) == 1

    output = capsys.readouterr()
    paho_lines = [r for r in caplog.records if r.name == "gateway.mqtt.trace"]
    assert any("Sending CONNECT" in r.getMessage() for r in paho_lines)  # paho's DEBUG trace was captured
    assert "********" in output.out  # --show masks the password instead of leaving it out
    texts = {
        "logs": caplog.text,
        "status, metrics, snapshots, errors, settings": "\n".join(seen),
        "config check stdout": output.out,
        "config check stderr": output.err,
        "broker log": broker.log_text(),
    }
    for secret in (RIGHT, WRONG):
        for place, text in texts.items():
            assert secret not in text, f"{secret} appears in {place}"
    assert "tidegate_mqtt_connected" in seen[-5]  # the metrics text really was fetched
