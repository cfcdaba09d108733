"""The simulator against a real mosquitto, and the embedded brokers it runs on in the demo."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.command import Command, CommandAck
from devices.errors import PayloadError
from devices.payload import PayloadDecoder
from devices.registry import parse_registry
from devices.status import decode_status
from devices.topic import TopicScheme
from gateway.broker import AmqttBroker, Backend, MosquittoBroker, embedded_broker, find_mosquitto, probe_mqtt
from simulator import (
    BrokerUnavailableError,
    SimulationSummary,
    device_ids,
    parse_fleet,
    read_fleet_file,
    run_simulation,
)
from tests.integration.mqtt_servers import StartMosquitto, TlsFiles, free_port, tls_listener

pytestmark = pytest.mark.integration

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
TELEMETRY = TopicScheme("devices/{device_id}/telemetry")
COMMANDS = TopicScheme("devices/{device_id}/commands")
ACKS = TopicScheme("devices/{device_id}/commands/ack")
STATUS = TopicScheme("devices/{device_id}/status")
SEQ_RE = re.compile(rb'"seq":(\d+)')
WAIT = 10.0  # seconds for anything that should take milliseconds; only reached when a test fails


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run `coro` in a fresh event loop; fail instead of hanging, and check it left no task behind."""

    async def guarded() -> T:
        result = await asyncio.wait_for(coro, timeout)
        for _ in range(3):  # aiomqtt cancels its per-connection task via call_soon: let that land
            await asyncio.sleep(0)
        stray = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not stray, f"tasks left running: {stray}"
        return result

    return asyncio.run(guarded())


def unique_prefix(name: str) -> str:
    # The session broker outlives each test; distinct ids keep tests out of each other's sessions.
    return f"{name}-{uuid.uuid4().hex[:6]}"


class Recorder:
    """A paho MQTT 3.1.1 client on its own thread that subscribes at QoS 1 and records what arrives."""

    def __init__(self, host: str, port: int, topics: list[str], *, persistent: bool = False) -> None:
        self.host, self.port, self.topics = host, port, topics
        self.messages: list[tuple[str, bytes, int]] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        # persistent: the broker keeps what arrives while this client reconnects (after a broker restart)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=unique_prefix("recorder"), clean_session=not persistent
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._changed:
            self.messages.append((message.topic, bytes(message.payload), message.qos))
            self._changed.notify_all()

    def __enter__(self) -> Self:
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        if not self._subscribed.wait(WAIT):
            self.__exit__(None, None, None)
            raise AssertionError(f"no SUBACK from {self.host}:{self.port}")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(
        self, predicate: Callable[[list[tuple[str, bytes, int]]], bool], timeout: float = WAIT
    ) -> bool:
        """Block until `predicate(messages)` holds (True) or `timeout` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.messages), timeout)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT)


Messages = list[tuple[str, bytes, int]]


def acks_in(messages: Messages) -> list[bytes]:
    return [payload for topic, payload, _ in messages if topic.endswith("/commands/ack")]


def readings_in(messages: Messages) -> list[dict[str, Any]]:
    return [json.loads(payload) for topic, payload, _ in messages if topic.endswith("/telemetry")]


def progress_event(device_id: str) -> tuple[asyncio.Event, Callable[[SimulationSummary], None]]:
    """Return an event set once `device_id` has sent telemetry (so it has subscribed to commands)."""
    event = asyncio.Event()

    def on_progress(summary: SimulationSummary) -> None:
        if summary.last_seq.get(device_id, 0) >= 1:
            event.set()

    return event, on_progress


def per_device(messages: Messages, suffix: str) -> dict[str, list[bytes]]:
    """Payloads by device id, in arrival order, of the messages on topics ending with `suffix`."""
    found: dict[str, list[bytes]] = defaultdict(list)
    for topic, payload, _ in messages:
        if topic.endswith(suffix):
            found[topic.split("/")[1]].append(payload)
    return found


def seqs_of(payload: bytes) -> list[int]:
    """The seqs a telemetry payload carries: one reading, a batch, or a malformed one (by regex)."""
    return [int(seq) for seq in SEQ_RE.findall(payload)]


# -- the quick form ----------------------------------------------------------------------------------


def test_every_seq_arrives_once_in_order_per_device(mosquitto: MosquittoBroker) -> None:
    prefix = unique_prefix("seq")
    ids = device_ids(3, prefix)
    with Recorder(mosquitto.host, mosquitto.port, [TELEMETRY.format(d) for d in ids]) as recorder:
        summary = run(
            run_simulation(mosquitto.url, devices=3, rate=10.0, duration=2.0, seed=7, id_prefix=prefix)
        )
        assert recorder.wait_for(lambda messages: len(messages) >= summary.sent)

    assert summary.devices == 3 and summary.connections == 1 and summary.errors == 0
    assert sum(summary.last_seq.values()) == summary.sent == summary.readings
    decoder = PayloadDecoder()
    by_device: dict[str, list[int | None]] = {d: [] for d in ids}
    for topic, payload, qos in recorder.messages:
        device_id = TELEMETRY.device_id(topic)
        assert device_id in by_device and qos == 1
        [event] = decoder.decode(device_id, payload, time.time())
        assert {"temperature", "humidity", "fan"} <= set(event.fields)
        by_device[device_id].append(event.seq)
    for device_id, seqs in by_device.items():
        assert summary.last_seq[device_id] >= 10  # ~20 at 10 msg/s for 2 s
        assert seqs == list(range(1, summary.last_seq[device_id] + 1)), device_id


def test_fan_command_is_acked_ok_with_its_id_and_unknown_ones_with_an_error(
    mosquitto: MosquittoBroker,
) -> None:
    prefix = unique_prefix("cmd")
    [device_id] = device_ids(1, prefix)
    fan_on = Command(uuid.uuid4().hex, device_id, "fan", {"on": True}, time.time())
    unknown = Command(uuid.uuid4().hex, device_id, "self_destruct", {}, time.time())

    async def scenario(recorder: Recorder) -> SimulationSummary:
        ready, on_progress = progress_event(device_id)
        stop = asyncio.Event()
        simulation = asyncio.create_task(
            run_simulation(
                mosquitto.url, devices=1, rate=20.0, duration=None, seed=1, id_prefix=prefix,
                on_progress=on_progress, stop=stop,
            )
        )  # fmt: skip
        await asyncio.wait_for(ready.wait(), WAIT)
        for command in (fan_on, unknown):
            await asyncio.to_thread(recorder.publish, COMMANDS.format(device_id), command.encode())
        two_acks = await asyncio.to_thread(recorder.wait_for, lambda m: len(acks_in(m)) >= 2)
        assert two_acks, f"acks missing: {recorder.messages}"
        fan_shown = await asyncio.to_thread(
            recorder.wait_for, lambda m: any(r.get("fan") for r in readings_in(m))
        )
        assert fan_shown, "telemetry never showed the fan on"
        stop.set()
        return await simulation

    topics = [ACKS.format(device_id), TELEMETRY.format(device_id)]
    with Recorder(mosquitto.host, mosquitto.port, topics) as recorder:
        summary = run(scenario(recorder))

    acks = {ack.id: ack for ack in (CommandAck.decode(device_id, p) for p in acks_in(recorder.messages))}
    assert acks[fan_on.id].status == "ok"
    assert acks[unknown.id].status == "error" and "self_destruct" in acks[unknown.id].detail
    assert (summary.commands_received, summary.commands_acked, summary.commands_rejected) == (2, 2, 1)


def test_cancelling_disconnects_every_connection_cleanly(mosquitto: MosquittoBroker) -> None:
    prefix = unique_prefix("cancel")
    ids = device_ids(3, prefix)

    async def scenario(connection_per_device: bool) -> None:
        ready, on_progress = progress_event(ids[-1])
        simulation = asyncio.create_task(
            run_simulation(
                mosquitto.url,
                devices=3,
                rate=20.0,
                duration=None,
                seed=2,
                id_prefix=prefix,
                connection_per_device=connection_per_device,
                on_progress=on_progress,
            )
        )
        await asyncio.wait_for(ready.wait(), WAIT)
        simulation.cancel()
        with pytest.raises(asyncio.CancelledError):
            await simulation

    run(scenario(connection_per_device=False))  # `run` also fails if a task was left behind
    run(scenario(connection_per_device=True))

    # mosquitto logs "Client X disconnected." for a DISCONNECT packet, "closed its connection" otherwise;
    # the log has no change event to wait on, so poll it briefly.
    client_ids = [f"{ids[0]}..{ids[-1]}", *ids]

    def all_said_goodbye() -> bool:
        return all(f"Client {c} disconnected." in mosquitto.log_text() for c in client_ids)

    deadline = time.monotonic() + WAIT
    while not all_said_goodbye() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all_said_goodbye(), mosquitto.log_text()[-2000:]


def test_devices_reconnect_after_a_broker_restart_and_lose_nothing(mosquitto_fresh: MosquittoBroker) -> None:
    broker = mosquitto_fresh
    ids = device_ids(4, "restart")
    seen_before = asyncio.Event()
    reconnected = asyncio.Event()

    def on_progress(summary: SimulationSummary) -> None:
        if min(summary.last_seq.values()) >= 3:
            seen_before.set()
        if summary.reconnects >= summary.connections and min(summary.last_seq.values()) >= 8:
            reconnected.set()

    async def scenario() -> SimulationSummary:
        stop = asyncio.Event()
        simulation = asyncio.create_task(
            run_simulation(broker.url, devices=4, rate=10.0, duration=None, seed=4, id_prefix="restart",
                           connections=2, on_progress=on_progress, stop=stop)
        )  # fmt: skip
        await asyncio.wait_for(seen_before.wait(), WAIT)
        await broker.restart_async()
        await asyncio.wait_for(reconnected.wait(), WAIT)
        stop.set()
        return await simulation

    topics = [TELEMETRY.format(d) for d in ids]
    with Recorder(broker.host, broker.port, topics, persistent=True) as recorder:
        summary = run(scenario())

        def seqs(device_id: str) -> list[int]:
            return [json.loads(p)["seq"] for t, p, _ in recorder.messages if t == TELEMETRY.format(device_id)]

        def complete(messages: Messages) -> bool:
            return all(set(seqs(d)) >= set(range(1, summary.last_seq[d] + 1)) for d in ids)

        assert recorder.wait_for(complete), {d: seqs(d) for d in ids}

    assert summary.connections == 2
    assert summary.reconnects == 2 and summary.errors == 2  # one lost connection each
    for device_id in ids:
        # at least once: a reading in flight at the restart may arrive twice, but none is missing
        assert sorted(set(seqs(device_id))) == list(range(1, summary.last_seq[device_id] + 1)), device_id


def test_unreachable_broker_is_a_clear_error() -> None:
    broker = AmqttBroker()  # only to pick a free port; nothing listens on it
    with pytest.raises(BrokerUnavailableError) as raised:
        run(run_simulation(broker.url, devices=2, rate=1.0, duration=1.0, seed=None))
    assert raised.value.url == broker.url
    assert broker.url in str(raised.value) and "refused" in str(raised.value).lower()


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("http://127.0.0.1:1883", {}, "mqtt://"),
        ("mqtt://127.0.0.1:1883", {"ca_file": __file__}, "use mqtts://"),
        ("mqtts://127.0.0.1", {"key_file": __file__}, "needs its certificate"),
        ("mqtts://127.0.0.1", {"ca_file": "/nonexistent/ca.pem"}, "not a readable file"),
    ],
)
def test_rejects_an_unusable_url_or_tls_options(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run(run_simulation(url, devices=1, rate=1.0, duration=1.0, **options))


# -- fleets ------------------------------------------------------------------------------------------

BIG_FLEET = """\
seed: 5
types:
  sensor:
    interval: 1s
    jitter: 10%
    fields:
      temperature: {{sine: {{mean: 20, amplitude: 2, period: 1m}}, noise: 0.1}}
      fan: {{constant: false}}
    commands:
      fan:
        - params: {{on: true}}
          effects: {{fan: {{set: true}}, temperature: {{rate: -0.5, for: 10s}}}}
groups:
  - {{type: sensor, ids: "{p}-plain-{{0001..1900}}"}}
  - {{type: sensor, ids: "{p}-broken-{{01..40}}", faults: {{malformed: {{rate: 20%}}}}}}
  - type: sensor
    ids: "{p}-flaky-{{01..30}}"
    faults: {{disconnect: {{schedule: [{{at: 1s, for: 1500ms}}], replay: burst}}}}
  - type: sensor
    ids: "{p}-batchy-{{01..30}}"
    faults: {{disconnect: {{schedule: [{{at: 1s, for: 1500ms}}], replay: batch}}}}
"""


def test_two_thousand_devices_over_four_connections(mosquitto: MosquittoBroker) -> None:
    prefix = unique_prefix("big")
    fleet = parse_fleet(BIG_FLEET.format(p=prefix), "big.yaml")
    assert len(fleet) == 2000
    plain = [f"{prefix}-plain-{n:04d}" for n in (1, 2, 3, 4)]
    fan_on = Command(uuid.uuid4().hex, plain[0], "fan", {"on": True}, time.time())
    unknown = Command(uuid.uuid4().hex, plain[1], "reboot", {}, time.time())
    twice = Command(uuid.uuid4().hex, plain[2], "fan", {"on": True}, time.time())
    expired = Command(uuid.uuid4().hex, plain[3], "fan", {"on": True}, time.time(), expires=time.time() - 1)

    async def scenario(recorder: Recorder) -> SimulationSummary:
        ready = asyncio.Event()

        def on_progress(summary: SimulationSummary) -> None:
            if all(summary.last_seq[d] >= 1 for d in plain):
                ready.set()

        simulation = asyncio.create_task(
            run_simulation(mosquitto.url, fleet=fleet, duration=5.0, connections=4, on_progress=on_progress)
        )
        await asyncio.wait_for(ready.wait(), WAIT)
        for command in (fan_on, unknown, twice, twice, expired):
            await asyncio.to_thread(recorder.publish, COMMANDS.format(command.device_id), command.encode())
        return await simulation

    def count(messages: Messages, suffix: str) -> int:  # this test's only: others' statuses are retained
        return sum(t.endswith(suffix) and t.split("/")[1].startswith(prefix) for t, _, _ in messages)

    topics = [TELEMETRY.subscription, STATUS.subscription, ACKS.subscription]
    with Recorder(mosquitto.host, mosquitto.port, topics) as recorder:
        summary = run(scenario(recorder))
        statuses_sent = summary.sent_by_kind["online"] + summary.sent_by_kind["offline"]
        assert recorder.wait_for(lambda m: count(m, "/telemetry") >= summary.sent, 30)
        assert recorder.wait_for(lambda m: count(m, "/ack") >= summary.commands_acked)
        assert recorder.wait_for(lambda m: count(m, "/status") >= statuses_sent)

    mine = [(t, p, q) for t, p, q in recorder.messages if t.split("/")[1].startswith(prefix)]
    telemetry = per_device(mine, "/telemetry")
    statuses = per_device(mine, "/status")
    assert (summary.devices, summary.connections, summary.errors, summary.unsent) == (2000, 4, 0, 0)
    assert sum(len(p) for p in telemetry.values()) == summary.sent
    assert summary.sent_by_kind["online"] >= 2000 and summary.sent_by_kind["offline"] >= 2000

    # Every device: births and goodbyes, and every seq from 1 to its last exactly once.
    decoder = PayloadDecoder()
    for device_id, last in summary.last_seq.items():
        group = device_id.split("-")[-2]
        payloads = telemetry[device_id]
        seqs = [seq for payload in payloads for seq in seqs_of(payload)]
        assert last >= 4 and sorted(seqs) == list(range(1, last + 1)), (device_id, seqs)
        said = [decode_status(device_id, p)[0] for p in statuses[device_id]]
        if group in ("flaky", "batchy"):
            assert said == ["online", "offline", "online", "offline"], (device_id, said)
        else:
            assert said == ["online", "offline"], (device_id, said)
            assert seqs == list(range(1, last + 1)), device_id  # and in order
        if group == "batchy":
            arrays = [p for p in payloads if p.startswith(b"[")]
            assert len(arrays) == 1 and len(decoder.decode(device_id, arrays[0], time.time())) >= 1
        elif group != "broken":
            for payload in payloads:
                decoder.decode(device_id, payload, time.time())  # raises if malformed

    # Malformed messages at about their rate, from the broken group only, each rejected.
    malformed = 0
    for device_id, payloads in telemetry.items():
        for payload in payloads:
            try:
                decoder.decode(device_id, payload, time.time())
            except PayloadError:
                malformed += 1
                assert "-broken-" in device_id
    broken_readings = sum(summary.last_seq[d] for d in summary.last_seq if "-broken-" in d)
    assert malformed == summary.malformed and 0.12 < malformed / broken_readings < 0.28
    assert summary.sent_by_kind["burst"] >= 30 and summary.sent_by_kind["batch"] == 30
    assert summary.disconnects == 60 and summary.dropped == 0

    # Commands, answered as the fleet file says.
    acks = [CommandAck.decode(t.split("/")[1], p) for t, p, _ in mine if t.endswith("/ack")]
    by_id = defaultdict(list)
    for ack in acks:
        by_id[ack.id].append(ack)
    assert [a.status for a in by_id[fan_on.id]] == ["ok"]
    [refused] = by_id[unknown.id]
    assert refused.status == "error" and "unknown command 'reboot'" in refused.detail
    assert [(a.status, a.detail) for a in by_id[twice.id]] == [("ok", ""), ("ok", "")]
    assert [(a.status, a.detail) for a in by_id[expired.id]] == [("error", "expired")]
    assert (summary.commands_received, summary.commands_acked, summary.commands_repeated) == (5, 5, 1)
    assert (summary.commands_rejected, summary.commands_expired) == (2, 1)
    fan_after = [json.loads(p)["fan"] for p in telemetry[fan_on.device_id]]
    assert fan_after[0] is False and fan_after[-1] is True


DROPPING = """\
types:
  t:
    interval: 200ms
    fields: {{level: {{constant: 1}}}}
groups:
  - {{type: t, ids: ["{p}-steady"]}}
  - type: t
    ids: ["{p}-dropping"]
    faults: {{disconnect: {{schedule: [{{at: 1s, for: 1s}}], replay: burst}}}}
"""


def test_a_device_with_its_own_connection_really_drops_it_and_the_broker_sends_its_will(
    mosquitto: MosquittoBroker,
) -> None:
    prefix = unique_prefix("will")
    steady, dropping = f"{prefix}-steady", f"{prefix}-dropping"
    fleet = parse_fleet(DROPPING.format(p=prefix))
    topics = [STATUS.subscription, TELEMETRY.subscription]
    with Recorder(mosquitto.host, mosquitto.port, topics) as recorder:
        summary = run(run_simulation(mosquitto.url, fleet=fleet, duration=3.0, connection_per_device=True))
        assert recorder.wait_for(lambda m: len(per_device(m, "/status")[dropping]) >= 4)
        assert recorder.wait_for(
            lambda m: len(per_device(m, "/telemetry")[dropping]) >= summary.last_seq[dropping]
        )

    said = [decode_status(dropping, p) for p in per_device(recorder.messages, "/status")[dropping]]
    assert [status for status, _ in said] == ["online", "offline", "online", "offline"]
    will_ts = said[1][1]
    assert (
        will_ts is not None and said[0][1] is not None and will_ts <= said[0][1] + 0.5
    )  # stamped at connect
    log = mosquitto.log_text()
    assert f"Client {dropping} closed its connection." in log  # no DISCONNECT: the will went out
    assert f"Client {steady} disconnected." in log and f"Client {steady} closed its connection." not in log
    seqs = [seq for p in per_device(recorder.messages, "/telemetry")[dropping] for seq in seqs_of(p)]
    assert seqs == list(range(1, summary.last_seq[dropping] + 1))  # the burst, in order, nothing lost
    assert (summary.connections, summary.disconnects, summary.reconnects, summary.errors) == (2, 1, 0, 0)


def test_the_example_fleets_run_and_what_they_send_fits_the_example_registry(
    mosquitto: MosquittoBroker,
) -> None:
    registry = parse_registry((ROOT / "deploy/devices.example.yaml").read_text(encoding="utf-8"), "registry")
    decoder = PayloadDecoder()
    for name in ("greenhouse.yaml", "cold-storage.yaml"):
        fleet = read_fleet_file(ROOT / "deploy" / "fleets" / name)
        with Recorder(
            mosquitto.host, mosquitto.port, [STATUS.subscription, TELEMETRY.subscription]
        ) as recorder:
            summary = run(run_simulation(mosquitto.url, fleet=fleet, duration=2.0))
            assert recorder.wait_for(lambda m: len(per_device(m, "/telemetry")) > 0)
        ids = {device_id for device_id, _ in fleet.devices()}
        statuses = per_device(recorder.messages, "/status")
        assert ids <= set(statuses) and summary.errors == 0, name
        for device_id, payloads in per_device(recorder.messages, "/telemetry").items():
            if device_id not in ids:
                continue
            for payload in payloads:
                events = decoder.decode(device_id, payload, time.time())
                validator = registry.validators.get(device_id)
                for event in events:
                    if validator is not None:
                        validator.check(event)


# -- the command line --------------------------------------------------------------------------------


SMALL_FLEET = """\
seed: 3
types:
  t:
    interval: 200ms
    fields: {{temperature: {{constant: 20, noise: 0.5}}}}
groups:
  - {{type: t, ids: "{p}-{{01..20}}"}}
"""


@pytest.mark.parametrize("form", ["fleet", "quick"])
def test_the_command_stops_cleanly_on_a_signal_and_prints_the_summary(
    mosquitto: MosquittoBroker, tmp_path: Path, form: str
) -> None:
    if form == "fleet":
        prefix = unique_prefix("cli")
        fleet_file = tmp_path / "fleet.yaml"
        fleet_file.write_text(SMALL_FLEET.format(p=prefix), encoding="utf-8")
        ids = [f"{prefix}-{n:02d}" for n in range(1, 21)]
        devices = ["--fleet", str(fleet_file)]
        sig = signal.SIGINT
    else:
        ids = device_ids(20)  # the quick form's ids: sim-0001 ...
        devices = ["--devices", "20", "--rate", "5", "--seed", "3"]
        sig = signal.SIGTERM
    command = [sys.executable, "-m", "gateway.cli", "simulate", "--broker", mosquitto.url, *devices,
               "--connections", "2", "--json"]  # fmt: skip
    topics = [STATUS.format(d) for d in ids] + [TELEMETRY.format(d) for d in ids]
    with Recorder(mosquitto.host, mosquitto.port, topics) as recorder:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert recorder.wait_for(lambda m: len(per_device(m, "/telemetry")) == 20, 20)
            process.send_signal(sig)
            out, err = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, err
        summary = json.loads(out)

        def all_said_goodbye(messages: Messages) -> bool:  # a clean stop: each device published "offline"
            statuses = per_device(messages, "/status")
            return len(statuses) == 20 and all(
                decode_status(d, p[-1])[0] == "offline" for d, p in statuses.items()
            )

        assert recorder.wait_for(all_said_goodbye)
    assert summary["devices"] == 20 and summary["connections"] == 2 and summary["seed"] == 3
    assert summary["sent"] == sum(summary["last_seq"].values()) >= 20 and summary["errors"] == 0
    assert summary["sent_by_kind"]["offline"] == 20


def password_file(tmp_path: Path, user: str, password: str) -> Path:
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), user, password], check=True)
    passwords.chmod(0o644)
    return passwords


def test_tls_with_a_client_certificate_and_a_password(
    mosquitto_with: StartMosquitto, tls_files: TlsFiles, tmp_path: Path
) -> None:
    port = free_port()
    secret = "sim-pw-4b1d-never-shown"
    passwords = password_file(tmp_path, "sim", secret)
    listener = tls_listener(port, tls_files.server, tls_files.ca.cert, require_certificate=True)
    broker = mosquitto_with(
        [*listener, "allow_anonymous false", f"password_file {passwords}"], per_listener_settings=True
    )
    url = f"mqtts://127.0.0.1:{port}"

    def simulate(ca_file: Path, password: str) -> Coroutine[Any, Any, SimulationSummary]:
        return run_simulation(
            url, devices=2, rate=10.0, duration=1.0, username="sim", password=password, ca_file=ca_file,
            cert_file=tls_files.client.cert, key_file=tls_files.client.key,
        )  # fmt: skip

    summary = run(simulate(tls_files.ca.cert, secret))
    assert summary.errors == 0 and min(summary.last_seq.values()) >= 5
    with pytest.raises(BrokerUnavailableError) as wrong_ca:
        run(simulate(tls_files.other_ca.cert, secret))
    assert "certificate verify failed" in str(wrong_ca.value)
    with pytest.raises(BrokerUnavailableError) as wrong_password:
        run(simulate(tls_files.ca.cert, "nope"))
    assert "Not authorized" in str(wrong_password.value)
    assert secret not in str(wrong_password.value) and "nope" not in str(wrong_password.value)
    assert broker.running


# -- the embedded brokers ----------------------------------------------------------------------------

NO_MOSQUITTO = pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto is not installed (CI installs it)"
)
BACKENDS = [pytest.param("mosquitto", marks=NO_MOSQUITTO), "amqtt"]


async def receive(client: aiomqtt.Client) -> bytes:
    """Return the payload of the next message `client` gets."""
    async with asyncio.timeout(WAIT):
        message = await anext(client.messages)
    assert isinstance(message.payload, bytes)
    return message.payload


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedded_broker_carries_qos1_messages(backend: Backend) -> None:
    async def scenario() -> None:
        async with embedded_broker(backend=backend) as url:
            assert url.startswith("mqtt://127.0.0.1:")
            host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
            async with aiomqtt.Client(host, port, identifier="sub") as sub, aiomqtt.Client(host, port) as pub:
                await sub.subscribe("devices/+/telemetry", qos=1)
                await pub.publish("devices/d1/telemetry", b'{"seq": 1, "t": 1}', qos=1)
                async with asyncio.timeout(WAIT):
                    message = await anext(sub.messages)
                assert message.topic.value == "devices/d1/telemetry"
                assert (message.payload, message.qos) == (b'{"seq": 1, "t": 1}', 1)
        assert not probe_mqtt(host, port, timeout=0.5), "broker still serving after the block"

    run(scenario())


def persistent_client(host: str, port: int, protocol: aiomqtt.ProtocolVersion) -> aiomqtt.Client:
    """Return client "gw" resuming its session (3.1.1: clean_session off; 5: clean_start off, expiry)."""
    if protocol == aiomqtt.ProtocolVersion.V5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
        properties.SessionExpiryInterval = 3600
        return aiomqtt.Client(
            host, port, identifier="gw", protocol=protocol, clean_start=False, properties=properties
        )
    return aiomqtt.Client(host, port, identifier="gw", protocol=protocol, clean_session=False)


@pytest.mark.parametrize(
    ("backend", "protocol"),
    [
        pytest.param("mosquitto", aiomqtt.ProtocolVersion.V311, marks=NO_MOSQUITTO),
        pytest.param("mosquitto", aiomqtt.ProtocolVersion.V5, marks=NO_MOSQUITTO),
        ("amqtt", aiomqtt.ProtocolVersion.V311),  # amqtt speaks no MQTT 5: see the test below
    ],
    ids=["mosquitto-3.1.1", "mosquitto-5", "amqtt-3.1.1"],
)
def test_embedded_broker_queues_for_a_persistent_session_while_it_is_away(
    backend: Backend, protocol: aiomqtt.ProtocolVersion
) -> None:
    async def scenario() -> None:
        async with embedded_broker(backend=backend) as url:
            host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
            async with persistent_client(host, port, protocol) as gateway:
                await gateway.subscribe("devices/+/telemetry", qos=1)
            async with aiomqtt.Client(host, port, protocol=protocol) as device:
                for seq in (1, 2, 3):
                    await device.publish("devices/d1/telemetry", f'{{"seq": {seq}}}'.encode(), qos=1)
            async with persistent_client(host, port, protocol) as gateway:
                got = [json.loads(await receive(gateway))["seq"] for _ in range(3)]
            assert got == [1, 2, 3]

    run(scenario())


def test_amqtt_refuses_mqtt5_clients() -> None:
    """Documents a limitation (see gateway/broker.py): if this starts failing, amqtt learned MQTT 5."""

    async def scenario() -> None:
        async with AmqttBroker() as broker:
            with pytest.raises(aiomqtt.MqttCodeError):
                async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5):
                    pass

    run(scenario())


def test_simulator_runs_on_amqtt() -> None:
    async def scenario() -> SimulationSummary:
        async with embedded_broker(backend="amqtt") as url:
            return await run_simulation(url, devices=2, rate=10.0, duration=1.0, seed=3)

    summary = run(scenario())
    assert summary.errors == 0 and all(seq >= 5 for seq in summary.last_seq.values())


def test_mosquitto_restart_keeps_port_and_queued_messages(mosquitto_fresh: MosquittoBroker) -> None:
    broker = mosquitto_fresh
    port = broker.port

    async def subscribe_then_leave() -> None:
        async with aiomqtt.Client(broker.host, port, identifier="gw", clean_session=False) as gateway:
            await gateway.subscribe("devices/+/telemetry", qos=1)
        async with aiomqtt.Client(broker.host, port) as device:
            await device.publish("devices/d1/telemetry", b'{"seq": 1}', qos=1)

    async def come_back() -> bytes:
        async with aiomqtt.Client(broker.host, port, identifier="gw", clean_session=False) as gateway:
            return await receive(gateway)

    run(subscribe_then_leave())
    broker.restart()  # SIGTERM: mosquitto saves its database on the way out
    assert broker.port == port
    assert run(come_back()) == b'{"seq": 1}'


def test_mosquitto_pause_resume_and_kill(mosquitto_fresh: MosquittoBroker) -> None:
    broker = mosquitto_fresh
    broker.pause()
    assert not probe_mqtt(broker.host, broker.port, timeout=0.3)
    broker.resume()
    assert probe_mqtt(broker.host, broker.port)
    broker.kill()
    assert not broker.running and not probe_mqtt(broker.host, broker.port, timeout=0.3)
    broker.start()
    assert probe_mqtt(broker.host, broker.port)
