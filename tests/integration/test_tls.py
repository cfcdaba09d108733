"""S1: TLS and mutual TLS to a real mosquitto, with certificates made inside the test (mqtt_servers.py).

Each refused case checks three things: the connection never comes up, the reason is told in words
an operator can act on (in the log and in the status snapshot), and the gateway retries with backoff
rather than in a tight loop (connection attempts are counted by a TCP proxy in front of the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.app import Gateway
from gateway.config import BatchSettings, MqttSettings, NullSettings, Settings
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from tests.integration.faultproxy import FaultProxy
from tests.integration.mqtt_servers import (
    KeyPair,
    StartMosquitto,
    TlsFiles,
    free_port,
    tls_listener,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

OBSERVE = 2.5  # seconds a refused gateway is watched retrying


def tls_settings(port: int, *, ca_file: Path | None, client: KeyPair | None = None, **tls: Any) -> Settings:
    if ca_file is not None:
        tls["ca_file"] = ca_file
    if client is not None:
        tls |= {"cert_file": client.cert, "key_file": client.key}
    mqtt = MqttSettings.model_validate(
        {"url": f"mqtts://127.0.0.1:{port}", "client_id": f"tg-tls-{uuid.uuid4().hex[:6]}", "tls": tls}
    )
    return Settings(mqtt=mqtt, store=NullSettings(kind="null"), batch=BatchSettings(flush_interval=0.05))


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(gateway: Gateway) -> AsyncIterator[Gateway]:
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(gateway.run(stop), name="gateway")
        try:
            yield gateway
        finally:
            stop.set()


def refused_attempts(settings: Settings, broker_port: int) -> tuple[Gateway, int]:
    """Run a gateway through a counting proxy for OBSERVE seconds; return it and its connection attempts."""
    scheme = "mqtts" if settings.mqtt.tls_enabled else "mqtt"

    async def scenario() -> tuple[Gateway, int]:
        async with FaultProxy("127.0.0.1", broker_port) as proxy:
            url = f"{scheme}://{proxy.host}:{proxy.port}"
            mqtt = settings.mqtt.model_copy(update={"url": url})
            gateway = Gateway(
                settings.model_copy(update={"mqtt": mqtt}), rule_set=build_rule_set({}), store=MemoryStore()
            )
            started = time.monotonic()
            async with running(gateway):
                await until(lambda: "cannot connect" in gateway.mqtt.stats.last_error, "failure reported")
                await asyncio.sleep(OBSERVE - (time.monotonic() - started))
                assert not gateway.mqtt.connected.is_set()
                assert gateway.mqtt.stats.connects == 0
                return gateway, proxy.accepted

    return asyncio.run(scenario())


def check_refused(
    gateway: Gateway,
    attempts: int,
    caplog: pytest.LogCaptureFixture,
    expected: str,
    case: str,
    level: int = logging.ERROR,
) -> None:
    error = gateway.mqtt.stats.last_error
    print(f"S1 {case}: {attempts} attempts in {OBSERVE}s; error: {error!r}")
    assert expected in error
    assert gateway.snapshot()["mqtt_error"] == error  # `tidegate status` shows it
    logged = [r.getMessage() for r in caplog.records if r.levelno >= level]
    assert any(expected in message for message in logged), logged
    # backoff from 0.5 s, doubling, with jitter: 3 or 4 attempts in 2.5 s; a tight loop makes hundreds
    assert 2 <= attempts <= 5


def test_s1_wrong_ca_is_refused(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    mosquitto_with(tls_listener(port, tls_files.server, tls_files.ca.cert))
    settings = tls_settings(port, ca_file=tls_files.other_ca.cert)
    gateway, attempts = refused_attempts(settings, port)
    # mosquitto sends its CA along with its certificate, so OpenSSL names the untrusted root
    expected = (
        "TLS: certificate verify failed: self-signed certificate in certificate chain "
        f"(the broker's certificate is not issued by ca_file={tls_files.other_ca.cert})"
    )
    check_refused(gateway, attempts, caplog, expected, "wrong CA")


def test_s1_expired_server_certificate_is_refused(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    mosquitto_with(tls_listener(port, tls_files.expired_server, tls_files.ca.cert))
    gateway, attempts = refused_attempts(tls_settings(port, ca_file=tls_files.ca.cert), port)
    expected = "TLS: certificate verify failed: certificate has expired (the broker's certificate)"
    check_refused(gateway, attempts, caplog, expected, "expired server certificate")


def test_s1_wrong_host_name_is_refused(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    mosquitto_with(tls_listener(port, tls_files.server, tls_files.ca.cert))
    settings = tls_settings(port, ca_file=tls_files.ca.cert, server_name="broker.example.net")
    gateway, attempts = refused_attempts(settings, port)
    expected = "TLS: hostname mismatch, certificate is not valid for 'broker.example.net'"
    check_refused(gateway, attempts, caplog, expected, "wrong host name")


def test_s1_missing_client_certificate_is_refused(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    mosquitto_with(tls_listener(port, tls_files.server, tls_files.ca.cert, require_certificate=True))
    gateway, attempts = refused_attempts(tls_settings(port, ca_file=tls_files.ca.cert), port)
    # TLS 1.3: our side of the handshake completes; the broker's alert arrives on the first read
    expected = (
        "TLS: broker requires a client certificate (tlsv13 alert certificate required): "
        "set mqtt.tls.cert_file and key_file"
    )
    check_refused(gateway, attempts, caplog, expected, "no client certificate")


def test_s1_client_certificate_from_another_ca_is_refused(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    mosquitto_with(tls_listener(port, tls_files.server, tls_files.ca.cert, require_certificate=True))
    stranger = tls_files.other_ca.issue("tidegate", file_name="stranger")
    settings = tls_settings(port, ca_file=tls_files.ca.cert, client=stranger)
    gateway, attempts = refused_attempts(settings, port)
    expected = (
        f"TLS: the broker rejected our client certificate (cert_file={stranger.cert}): tlsv1 alert unknown ca"
    )
    check_refused(gateway, attempts, caplog, expected, "client certificate of another CA")


def test_plain_tcp_port_named_with_mqtts_is_explained(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    broker = mosquitto_with([])  # only the plain listener
    gateway, attempts = refused_attempts(tls_settings(broker.port, ca_file=tls_files.ca.cert), broker.port)
    check_refused(gateway, attempts, caplog, "is port", "mqtts:// to a plain port")
    assert "TLS listener?" in gateway.mqtt.stats.last_error


def test_plain_mqtt_to_a_tls_port_is_explained(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    mosquitto_with(tls_listener(port, tls_files.server, tls_files.ca.cert))
    settings = Settings(mqtt=MqttSettings(url=f"mqtt://127.0.0.1:{port}"), store=NullSettings(kind="null"))
    gateway, attempts = refused_attempts(settings, port)
    expected = "the connection closed before the broker answered CONNECT"
    # a warning, not an error: a broker going down closes connections before CONNACK too
    check_refused(gateway, attempts, caplog, expected, "mqtt:// to a TLS port", logging.WARNING)
    assert "is a TLS listener, use mqtts://" in gateway.mqtt.stats.last_error


def tls_publish(port: int, device: KeyPair, ca: Path, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 over mutual TLS and wait for every PUBACK."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}")
    client.tls_set(ca_certs=str(ca), certfile=str(device.cert), keyfile=str(device.key))
    client.max_inflight_messages_set(len(messages))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, body, qos=1) for topic, body in messages]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_s1_mutual_tls_carries_telemetry_end_to_end(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # also paho's protocol trace
    port = free_port()
    mosquitto_with(tls_listener(port, tls_files.server, tls_files.ca.cert, require_certificate=True))
    device = tls_files.ca.issue("dev-1", file_name="device-dev-1")
    store = MemoryStore()
    # a burst, so several MQTT packets share TLS reads (what OpenSSL buffers must still be read)
    messages = [
        ("devices/dev-1/telemetry", json.dumps({"seq": seq, "t": seq % 40}).encode()) for seq in range(1, 301)
    ]
    gateway = Gateway(
        tls_settings(port, ca_file=tls_files.ca.cert, client=tls_files.client),
        rule_set=build_rule_set({}),
        store=store,
    )

    async def scenario() -> None:
        async with running(gateway):
            await until(gateway.mqtt.connected.is_set, "connected over mutual TLS")
            await asyncio.to_thread(tls_publish, port, device, tls_files.ca.cert, messages)
            await until(lambda: gateway.ingest.stats.written == len(messages), "all messages stored")

    asyncio.run(scenario())
    seqs = sorted(int(p.fields["seq"]) for p in store.points if p.measurement == "telemetry")
    assert seqs == list(range(1, 301))
    assert gateway.mqtt.stats.last_error == ""
    key_body = tls_files.client.key.read_text().splitlines()[1]  # a line of the private key
    assert key_body not in caplog.text and key_body not in repr(gateway.snapshot())


def test_server_name_names_the_certificate_when_dialling_an_address(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles
) -> None:
    port = free_port()
    mosquitto_with(tls_listener(port, tls_files.server, tls_files.ca.cert))
    # dial 127.0.0.1, check the certificate for "localhost" (in it, as a DNS name)
    gateway = Gateway(
        tls_settings(port, ca_file=tls_files.ca.cert, server_name="localhost"),
        rule_set=build_rule_set({}),
        store=MemoryStore(),
    )

    async def scenario() -> None:
        async with running(gateway):
            await until(gateway.mqtt.connected.is_set, "connected with server_name=localhost")

    asyncio.run(scenario())
    assert gateway.mqtt.stats.connects == 1
