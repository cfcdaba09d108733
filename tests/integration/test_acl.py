"""The shipped broker configuration (deploy/mosquitto/) keeps each device to its own topics (C1, I6).

mosquitto 2.0.11 runs `deploy/mosquitto/mosquitto.conf` and `deploy/mosquitto/acl` as shipped, with only
the file paths and the port replaced, in both identity modes the file documents: password accounts,
and mutual TLS with the certificate's common name as the user name. What mosquitto really does,
checked here: a denied publish is dropped (MQTT 5 PUBACK reason 0x87 "Not authorized"; MQTT 3.1.1 an
ordinary PUBACK), and a SUBSCRIBE is always granted, but nothing the client may not read is delivered.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.app import Gateway
from gateway.config import BatchSettings, MqttSettings, NullSettings, Settings
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from tests.integration.mqtt_servers import StartMosquitto, TlsFiles, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEPLOY = Path(__file__).parents[2] / "deploy" / "mosquitto"
Identity = Literal["password", "certificate"]
NOT_AUTHORIZED, NO_SUBSCRIBERS = 0x87, 0x10


def password_of(user: str) -> str:
    return f"{user}-secret-7a1c"


@dataclass
class SecuredBroker:
    """The deploy configuration running on a loopback port, and how to connect as anyone."""

    port: int
    identity: Identity
    tls: TlsFiles

    def credentials(self, user: str) -> dict[str, Any]:
        """Return the `tls`/`username` settings a client named `user` connects with."""
        if self.identity == "password":
            return {"username": user, "password": password_of(user)}
        pair = self.tls.ca.issue(user, file_name=f"acl-{user}-{uuid.uuid4().hex[:6]}")  # CN = user name
        return {"cert_file": str(pair.cert), "key_file": str(pair.key)}


def deploy_config(replacements: dict[str, str | None]) -> list[str]:
    """Return the shipped mosquitto.conf's lines with the named options replaced (None: left out)."""
    lines, replaced = [], set()
    for raw in (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        option = line.split()[0]
        if option in replacements:
            replaced.add(option)
            if replacements[option] is not None:
                lines.append(f"{option} {replacements[option]}")
        else:
            lines.append(line)
    # a new path option in the file must be handled here too, or the test would run the wrong file
    assert replaced >= {
        k for k, v in replacements.items() if v is not None and k != "use_identity_as_username"
    }
    return lines


@pytest.fixture(params=["password", "certificate"])
def secured(
    request: pytest.FixtureRequest, mosquitto_with: StartMosquitto, tls_files: TlsFiles, tmp_path: Path
) -> SecuredBroker:
    identity: Identity = request.param
    port = free_port()
    replacements: dict[str, str | None] = {
        "listener": f"{port} 127.0.0.1",
        "cafile": str(tls_files.ca.cert),
        "certfile": str(tls_files.server.cert),
        "keyfile": str(tls_files.server.key),
        "acl_file": str(DEPLOY / "acl"),
        # the test broker's own persistence and log settings stay in force
        "persistence_location": None,
        "log_dest": None,
    }
    if identity == "password":
        passwords = tmp_path / "passwd"
        for n, user in enumerate(["tidegate", "dev-a", "dev-b"]):
            create = ["-c"] if n == 0 else []
            subprocess.run(
                ["mosquitto_passwd", *create, "-b", str(passwords), user, password_of(user)],
                check=True,
                capture_output=True,
            )
        passwords.chmod(0o644)
        replacements["password_file"] = str(passwords)
    else:  # mutual TLS, as the file's comment says: certificates required, CN = user name
        replacements |= {
            "password_file": None,
            "require_certificate": "true",
            "use_identity_as_username": "true",
        }
    lines = deploy_config(replacements)
    if identity == "certificate":
        lines.insert(lines.index("require_certificate true") + 1, "use_identity_as_username true")
    # per-listener settings keep the broker's own probe listener anonymous; the TLS listener gets
    # the deploy file's allow_anonymous, password_file and acl_file, which follow its `listener` line
    mosquitto_with(lines, per_listener_settings=True)
    return SecuredBroker(port=port, identity=identity, tls=tls_files)


@dataclass
class Client:
    """A paho client on its own thread that records SUBACK and PUBACK reason codes and messages."""

    paho: paho.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: dict[int, int] = field(default_factory=dict)  # mid -> reason code (0 for MQTT 3.1.1)
    subacks: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes = b"{}") -> int:
        """Publish at QoS 1, wait for the PUBACK and return its reason code."""
        info = self.paho.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        deadline = time.monotonic() + 5
        while info.mid not in self.pubacks:
            assert time.monotonic() < deadline, f"no PUBACK for {topic}"
            time.sleep(0.01)
        return self.pubacks[info.mid]

    def subscribe(self, *filters: str) -> list[int]:
        """Subscribe at QoS 1 and return the SUBACK's reason codes."""
        before = len(self.subacks)
        self.paho.subscribe([(f, 1) for f in filters])
        wait_for(lambda: len(self.subacks) >= before + len(filters), "SUBACK")
        return self.subacks[before:]

    def topics(self) -> list[str]:
        with self.lock:
            return [topic for topic, _ in self.messages]


def wait_for(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within}s"
        time.sleep(0.01)


@pytest.fixture
def connect(secured: SecuredBroker) -> Iterator[Callable[..., Client]]:
    """Yield `connect(user, protocol=5)`: a connected client; all are disconnected at the end."""
    clients: list[Client] = []

    def open_client(user: str, protocol: MQTTProtocolVersion = paho.MQTTv5) -> Client:
        raw = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}", protocol=protocol
        )
        client = Client(raw)
        creds = secured.credentials(user)
        raw.tls_set(
            ca_certs=str(secured.tls.ca.cert), certfile=creds.get("cert_file"), keyfile=creds.get("key_file")
        )
        if "username" in creds:
            raw.username_pw_set(creds["username"], creds["password"])
        connected = threading.Event()

        def on_connect(c: paho.Client, u: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
            assert not reason.is_failure, f"{user} refused: {reason}"
            connected.set()

        def on_message(c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
            with client.lock:
                client.messages.append((message.topic, bytes(message.payload)))

        def on_publish(c: paho.Client, u: Any, mid: int, reason: ReasonCode, props: Any) -> None:
            client.pubacks[mid] = reason.value

        def on_subscribe(c: paho.Client, u: Any, mid: int, reasons: list[ReasonCode], props: Any) -> None:
            client.subacks.extend(r.value for r in reasons)

        raw.on_connect, raw.on_message, raw.on_publish, raw.on_subscribe = (
            on_connect,
            on_message,
            on_publish,
            on_subscribe,
        )
        raw.connect("127.0.0.1", secured.port)
        raw.loop_start()
        clients.append(client)
        assert connected.wait(5), f"{user} did not connect"
        return client

    try:
        yield open_client
    finally:
        for client in clients:
            client.paho.disconnect()
            client.paho.loop_stop()


def gateway_settings(secured: SecuredBroker) -> Settings:
    creds = secured.credentials("tidegate")
    tls: dict[str, Any] = {"ca_file": secured.tls.ca.cert}
    mqtt: dict[str, Any] = {
        "url": f"mqtts://127.0.0.1:{secured.port}",
        "client_id": f"tg-acl-{uuid.uuid4().hex[:6]}",
    }
    if "username" in creds:
        mqtt |= {"username": creds["username"], "password": creds["password"]}
    else:
        tls |= {"cert_file": creds["cert_file"], "key_file": creds["key_file"]}
    return Settings(
        mqtt=MqttSettings.model_validate({**mqtt, "tls": tls}),
        store=NullSettings(kind="null"),
        batch=BatchSettings(flush_interval=0.05),
    )


def test_a_device_publishes_only_as_itself(secured: SecuredBroker, connect: Callable[..., Client]) -> None:
    store = MemoryStore()
    gateway = Gateway(gateway_settings(secured), rule_set=build_rule_set({}), store=store)

    def telemetry(seq: int) -> bytes:
        return json.dumps({"seq": seq, "t": 20 + seq}).encode()

    async def scenario() -> dict[str, int]:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(gateway.run(stop))
            try:
                async with asyncio.timeout(10):
                    await gateway.mqtt.connected.wait()
                assert gateway.mqtt.stats.last_error == ""  # every subscription of tidegate's account granted
                dev_a = await asyncio.to_thread(connect, "dev-a")
                legacy = await asyncio.to_thread(connect, "dev-a", paho.MQTTv311)
                codes = {}
                # in this order: mosquitto delivers one client's messages in order, so once dev-a's own
                # last message is stored, anything before it that was let through would be too
                for name, client, topic, seq in [
                    ("spoofed telemetry", dev_a, "devices/dev-b/telemetry", 1),
                    ("spoofed telemetry, MQTT 3.1.1", legacy, "devices/dev-b/telemetry", 2),
                    ("spoofed status", dev_a, "devices/dev-b/status", 3),
                    ("spoofed ack", dev_a, "devices/dev-b/commands/ack", 4),
                    ("own status", dev_a, "devices/dev-a/status", 5),
                    ("own ack", dev_a, "devices/dev-a/commands/ack", 6),
                    ("own telemetry", dev_a, "devices/dev-a/telemetry", 7),
                    ("own telemetry, MQTT 3.1.1", legacy, "devices/dev-a/telemetry", 8),
                ]:
                    body = {
                        "telemetry": telemetry(seq),
                        "status": b'{"status": "online"}',
                        "ack": json.dumps({"id": f"cmd-{seq}", "status": "ok"}).encode(),
                    }[topic.rsplit("/", 1)[-1]]
                    codes[name] = await asyncio.to_thread(client.publish, topic, body)
                deadline = time.monotonic() + 10
                while gateway.ingest.stats.written < 2:
                    assert time.monotonic() < deadline, "dev-a's own telemetry was not stored"
                    await asyncio.sleep(0.02)
                return codes
            finally:
                stop.set()

    codes = asyncio.run(scenario())
    print(f"PUBACK reason codes: {codes}")
    assert codes == {
        "spoofed telemetry": NOT_AUTHORIZED,
        "spoofed telemetry, MQTT 3.1.1": 0,  # 3.1.1 has no way to say no: acked, and dropped
        "spoofed status": NOT_AUTHORIZED,
        "spoofed ack": NOT_AUTHORIZED,
        "own status": 0,
        "own ack": 0,
        "own telemetry": 0,
        "own telemetry, MQTT 3.1.1": 0,
    }
    stored = [(dict(p.tags)["device"], p.fields["seq"]) for p in store.points if p.measurement == "telemetry"]
    assert sorted(stored) == [("dev-a", 7), ("dev-a", 8)]
    assert gateway.ingest.stats.received == 2  # the spoofed messages never reached the gateway
    assert "dev-b" not in {row["device"] for row in gateway.devices()}  # nor its status


def test_a_device_reads_only_its_own_commands(secured: SecuredBroker, connect: Callable[..., Client]) -> None:
    dev_a, dev_b, tidegate = connect("dev-a"), connect("dev-b"), connect("tidegate")
    # mosquitto's acl_file never refuses a SUBSCRIBE (all granted at QoS 1); it filters delivery
    assert dev_a.subscribe("devices/dev-b/commands", "devices/+/commands", "devices/dev-a/commands") == [
        1,
        1,
        1,
    ]
    assert dev_b.subscribe("devices/dev-b/commands") == [1]
    assert tidegate.publish("devices/dev-b/commands", b'{"id": "1", "name": "fan"}') == 0
    assert tidegate.publish("devices/dev-a/commands", b'{"id": "2", "name": "fan"}') == 0
    # dev-a's own command comes after dev-b's, once per matching subscription (two of them)
    wait_for(lambda: len(dev_a.topics()) == 2, "dev-a received its own command")
    wait_for(lambda: len(dev_b.topics()) == 1, "dev-b received its own command")
    assert dev_a.topics() == ["devices/dev-a/commands", "devices/dev-a/commands"]
    assert dev_b.topics() == ["devices/dev-b/commands"]


def test_the_tidegate_account_may_do_its_job_and_no_more(
    secured: SecuredBroker, connect: Callable[..., Client]
) -> None:
    tidegate, dev_a = connect("tidegate"), connect("dev-a")
    assert tidegate.subscribe("devices/+/telemetry", "devices/+/status", "devices/+/commands/ack") == [
        1,
        1,
        1,
    ]
    assert tidegate.subscribe("devices/+/commands") == [1]  # granted, but nothing is delivered (below)
    assert dev_a.subscribe("devices/dev-a/commands") == [1]
    assert tidegate.publish("devices/dev-a/commands") == 0
    assert tidegate.publish("tidegate/dead-letter") == NO_SUBSCRIBERS  # allowed; nobody may read it
    for topic in ("devices/dev-a/telemetry", "devices/dev-a/status", "devices/dev-a/commands/ack"):
        assert tidegate.publish(topic) == NOT_AUTHORIZED, topic  # it cannot speak for a device
    assert dev_a.publish("devices/dev-a/telemetry", b'{"seq": 1}') == 0
    wait_for(lambda: "devices/dev-a/telemetry" in tidegate.topics(), "tidegate reads telemetry")
    wait_for(lambda: dev_a.topics() == ["devices/dev-a/commands"], "dev-a got its command")
    assert "devices/dev-a/commands" not in tidegate.topics()  # it may write commands, not read them


def test_anonymous_clients_are_refused(secured: SecuredBroker) -> None:
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"anon-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    client.tls_set(ca_certs=str(secured.tls.ca.cert))
    reasons: list[str] = []
    done = threading.Event()

    def on_connect(c: paho.Client, u: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        reasons.append(str(reason))
        done.set()

    def on_disconnect(c: paho.Client, u: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        reasons.append(f"closed: {reason}")
        done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect("127.0.0.1", secured.port)
    except OSError as exc:  # mutual TLS: refused in the handshake already
        reasons.append(f"TLS: {exc}")
    else:
        client.loop_start()
        assert done.wait(5)
        client.loop_stop()
    print(f"anonymous ({secured.identity}): {reasons}")
    assert reasons and reasons[0] in ("Not authorized", "closed: Unspecified error"), reasons
