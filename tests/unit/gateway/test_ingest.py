"""Ingest hot path with in-memory fakes: points, alerts, commands, rejections and ack order."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

import gateway.ingest as ingest_module
from devices.command import Command
from devices.errors import SourceFileError
from devices.payload import PayloadDecoder
from devices.registry import UnknownDevicePolicy, parse_registry
from devices.topic import TopicScheme
from gateway.commands import CommandDispatcher
from gateway.ingest import TelemetryIngest
from gateway.store.base import Point
from rules import RuleEngine, build_rule_set

T = TypeVar("T")

RULES = """
rules:
  - id: hot
    when: temperature > 30
    clear: temperature < 26
    on_raise: [alert, {command: {name: fan, params: {on: true}}}]
"""


@dataclass
class Msg:
    topic: str
    payload: bytes
    mid: int
    qos: int = 1
    content_type: str | None = None  # MQTT 5 Content Type (gateway.mqttcodec.Publish.content_type)


class FakeMqtt:
    def __init__(self) -> None:
        self.generation = 1
        self.acks: list[int] = []
        self.published: list[tuple[str, bytes]] = []
        self.paused = False

    def ack(self, mid: int, qos: int, generation: int) -> None:
        if generation == self.generation:
            self.acks.append(mid)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))


class FakeSink:
    """Holds points until `flush()`, then calls back in order, like the batch writer."""

    def __init__(self, capacity: int = 100) -> None:
        self.pending: list[tuple[list[Point], Callable[[], None] | None]] = []
        self.points: list[Point] = []
        self.capacity = capacity

    @property
    def is_full(self) -> bool:
        return sum(len(p) for p, _ in self.pending) >= self.capacity

    def add(self, points: list[Point], on_written: Callable[[], None] | None = None) -> None:
        self.pending.append((points, on_written))

    def add_grouped(self, points: list[Point], on_written: Callable[[list[T]], None], item: T) -> None:
        self.pending.append((points, lambda: on_written([item])))

    async def wait_until_not_full(self) -> None:
        return None

    def flush(self) -> None:
        for points, on_written in self.pending:
            self.points.extend(points)
            if on_written is not None:
                on_written()
        self.pending.clear()


def make(capacity: int = 100) -> tuple[TelemetryIngest, FakeMqtt, FakeSink]:
    mqtt, sink = FakeMqtt(), FakeSink(capacity)
    commands = CommandDispatcher(
        channel=mqtt,
        topics=TopicScheme("devices/{device_id}/commands"),
        record=lambda p: sink.add([p]),
        clock=lambda: 5.0,
    )
    ingest = TelemetryIngest(
        topics=TopicScheme("devices/{device_id}/telemetry"),
        decoder=PayloadDecoder(),
        engine=RuleEngine(build_rule_set({"r.yaml": RULES})),
        sink=sink,
        commands=commands,
        mqtt=mqtt,
        dead_letter_topic="tidegate/dead-letter",
        dead_letter_max_bytes=16,
        clock=lambda: 1_764_000_000.0,
    )
    return ingest, mqtt, sink


def telemetry(mid: int, device: str = "gh-1", **fields: object) -> Msg:
    return Msg(f"devices/{device}/telemetry", json.dumps(fields).encode(), mid)


def test_acks_only_after_write_and_in_order() -> None:
    ingest, mqtt, sink = make()
    ingest.on_message(telemetry(1, seq=1, temperature=20.0))
    ingest.on_message(Msg("devices/gh-1/telemetry", b"garbage", 2))
    ingest.on_message(telemetry(3, seq=2, temperature=21.0))
    assert mqtt.acks == []
    sink.flush()
    assert mqtt.acks == [1, 2, 3]
    assert [p.fields["seq"] for p in sink.points if p.measurement == "telemetry"] == [1, 2]
    assert ingest.stats.received == 3 and ingest.stats.written == 2 and ingest.stats.rejected == 1


def test_threshold_records_an_alert_and_sends_a_command() -> None:
    ingest, mqtt, sink = make()
    ingest.on_message(telemetry(1, temperature=31.5))
    ingest.on_message(telemetry(2, temperature=32.0))  # still raised: no second alert
    sink.flush()
    alerts = [p for p in sink.points if p.measurement == "alerts"]
    assert len(alerts) == 1
    assert dict(alerts[0].tags) == {"device": "gh-1", "rule": "hot", "severity": "warning", "state": "raised"}
    assert alerts[0].fields["temperature"] == 31.5
    [(topic, payload)] = mqtt.published
    command = Command.decode("gh-1", payload)
    assert topic == "devices/gh-1/commands" and command.name == "fan" and command.params == {"on": True}
    assert [dict(p.tags)["status"] for p in sink.points if p.measurement == "commands"] == ["sent"]
    assert ingest.stats.alerts_raised == 1


def test_rejected_payload_goes_to_the_dead_letter_topic_truncated() -> None:
    ingest, mqtt, sink = make()
    ingest.on_message(Msg("devices/gh-1/telemetry", b'{"t": NaN, "padding": "xxxxxxxxxxxxxxxx"}', 7))
    [(topic, payload)] = mqtt.published
    record = json.loads(payload)
    assert topic == "tidegate/dead-letter"
    assert record["device_id"] == "gh-1" and "NaN" in record["reason"]
    assert record["payload"] == '{"t": NaN, "padd' and record["payload_bytes"] == 41
    sink.flush()
    assert mqtt.acks == [7]


def test_topic_outside_the_scheme_is_rejected() -> None:
    ingest, mqtt, _ = make()
    ingest.on_message(Msg("devices/gh-1/extra/telemetry", b'{"t": 1}', 1))
    assert ingest.stats.rejected == 1
    assert "does not match" in json.loads(mqtt.published[0][1])["reason"]


def test_a_bad_device_id_is_rejected_before_it_counts_as_a_device() -> None:
    ingest, mqtt, _ = make()
    ingest.on_message(Msg("devices/-lead/telemetry", b'{"t": 1}', 1))
    record = json.loads(mqtt.published[0][1])
    assert (record["device_id"], record["reason"]) == ("-lead", "device id '-lead' is not allowed")
    assert ingest.tracker.view("-lead", 0.0).last_seen is None
    assert ingest._device_ids == {}  # bad topics are not remembered: each is checked again


def test_device_ids_are_remembered_per_topic_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_module, "TOPIC_CACHE_SIZE", 2)
    ingest, _, sink = make()
    for mid, device in enumerate(["gh-1", "gh-2", "gh-3", "gh-3"], 1):
        ingest.on_message(telemetry(mid, device, t=1))
    assert ingest._device_ids == {"devices/gh-3/telemetry": "gh-3"}  # emptied when full
    sink.flush()
    assert [dict(p.tags)["device"] for p in sink.points] == ["gh-1", "gh-2", "gh-3", "gh-3"]
    assert ingest.stats.written == 4


def test_full_sink_pauses_reading() -> None:
    ingest, mqtt, _ = make(capacity=2)
    ingest.on_message(telemetry(1, t=1))
    assert not mqtt.paused
    ingest.on_message(telemetry(2, t=2))
    assert mqtt.paused and ingest.stats.backpressure_pauses == 1


def test_ack_from_an_old_connection_is_not_sent() -> None:
    ingest, mqtt, sink = make()
    ingest.on_message(telemetry(1, t=1))
    mqtt.generation = 2  # reconnected before the write finished: the broker will redeliver
    sink.flush()
    assert mqtt.acks == []


def test_redelivered_message_is_stored_again_but_fires_once() -> None:
    ingest, mqtt, sink = make()
    ingest.on_message(telemetry(1, seq=5, temperature=31.0))  # raises
    ingest.on_message(telemetry(2, seq=6, temperature=20.0))  # clears
    ingest.on_message(telemetry(3, seq=5, temperature=31.0))  # redelivered: would raise again
    sink.flush()
    measurements = [p.measurement for p in sink.points]
    assert measurements.count("telemetry") == 3
    assert measurements.count("alerts") == 2  # one raise, one clear
    assert len(mqtt.published) == 1  # one fan command
    assert ingest.stats.duplicates == 1 and mqtt.acks == [1, 2, 3]


def test_rejected_payload_is_on_disk_before_its_ack(tmp_path: Path) -> None:
    from gateway.deadletter import DeadLetterFile

    ingest, mqtt, sink = make()
    dead = DeadLetterFile(tmp_path / "dead.jsonl")
    ingest._dead_letter_file = dead
    synced: list[bool] = []
    original_sync = dead.sync

    def sync() -> None:
        synced.append(True)
        original_sync()

    dead.sync = sync  # type: ignore[method-assign]
    ingest.on_message(Msg("devices/gh-1/telemetry", b"garbage", 9))
    assert mqtt.acks == [] and json.loads((tmp_path / "dead.jsonl").read_text())["reason"].startswith(
        "invalid JSON"
    )
    sink.flush()
    dead.close()
    assert synced[0] and mqtt.acks == [9]


# -- device registry, unknown-device policy, status ---------------------------------------------------

REGISTRY = """
types:
  greenhouse:
    fields:
      temperature: {type: number, unit: "°C", min: -40, max: 85}
      fan: {type: bool}
devices:
  - {id: gh-1, type: greenhouse, tags: {site: north}}
"""


def make_registered(unknown: UnknownDevicePolicy) -> tuple[TelemetryIngest, FakeMqtt, FakeSink]:
    ingest, mqtt, sink = make()
    registered = TelemetryIngest(
        topics=TopicScheme("devices/{device_id}/telemetry"),
        decoder=PayloadDecoder(),
        engine=RuleEngine(build_rule_set({"r.yaml": RULES})),
        sink=sink,
        commands=ingest._commands,
        mqtt=mqtt,
        dead_letter_topic="tidegate/dead-letter",
        dead_letter_max_bytes=512,
        clock=lambda: 1_764_000_000.0,
        registry=parse_registry(REGISTRY, "devices.yaml"),
        unknown_devices=unknown,
        status_topics=TopicScheme("devices/{device_id}/status"),
    )
    return registered, mqtt, sink


def dead_reasons(mqtt: FakeMqtt) -> list[str]:
    return [json.loads(payload)["reason"] for _, payload in mqtt.published if _ == "tidegate/dead-letter"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        pytest.param({"temperature": 20.0, "fan": False}, None, id="valid"),
        pytest.param(
            {"temperature": 120.0}, "field 'temperature': 120.0 is outside the allowed range", id="range"
        ),
        pytest.param({"fan": "on"}, "field 'fan': expected a bool, got string 'on'", id="type"),
        pytest.param(
            {"pressure": 1.0}, "field 'pressure': not a field of type 'greenhouse'", id="unknown-field"
        ),
    ],
)
def test_registered_devices_are_validated_against_their_type(
    fields: dict[str, object], reason: str | None
) -> None:
    ingest, mqtt, sink = make_registered("accept")
    ingest.on_message(telemetry(1, "gh-1", **fields))
    sink.flush()
    assert mqtt.acks == [1]  # rejected or not, the message is acked in order
    if reason is None:
        assert [p.measurement for p in sink.points] == ["telemetry"] and dead_reasons(mqtt) == []
    else:
        assert sink.points == [] and ingest.stats.rejected == 1
        assert len(dead_reasons(mqtt)) == 1 and reason in dead_reasons(mqtt)[0]


@pytest.mark.parametrize(
    ("policy", "measurements", "rejected", "quarantined"),
    [
        pytest.param("accept", ["alerts", "commands", "telemetry"], 0, set(), id="accept"),
        pytest.param("reject", [], 1, set(), id="reject"),
        pytest.param("quarantine", ["quarantine"], 0, {"stray"}, id="quarantine"),
    ],
)
def test_unknown_device_policy(
    policy: UnknownDevicePolicy, measurements: list[str], rejected: int, quarantined: set[str]
) -> None:
    ingest, mqtt, sink = make_registered(policy)
    ingest.on_message(telemetry(1, "stray", seq=1, temperature=35.0))  # hot: the rule would raise
    sink.flush()
    assert sorted(p.measurement for p in sink.points) == measurements
    assert ingest.stats.rejected == rejected and mqtt.acks == [1]
    assert ingest.quarantined == quarantined
    if policy == "reject":
        assert dead_reasons(mqtt) == ["device 'stray' is not in the registry"]
    if policy == "quarantine":
        assert sink.points[0].fields == {"temperature": 35.0, "seq": 1}
        assert ingest.stats.alerts_raised == 0  # kept from the rules


def test_status_changes_are_stored_once_and_bad_status_is_dead_lettered() -> None:
    ingest, mqtt, sink = make_registered("accept")
    status = "devices/gh-1/status"
    ingest.on_status(Msg(status, b'{"status": "online", "ts": 1764000000}', 1))
    ingest.on_status(Msg(status, b'{"status": "online", "ts": 1764000000}', 2))
    ingest.on_status(Msg(status, b'{"status": "offline", "ts": 1763999000}', 3))
    ingest.on_status(Msg(status, b'{"status": "gone"}', 4))
    ingest.on_status(Msg(status, b"", 5))  # a retained status being cleared: ignored
    sink.flush()
    assert mqtt.acks == [1, 2, 3, 4, 5]
    assert [(p.measurement, dict(p.tags)["status"], p.fields["device_ts"]) for p in sink.points] == [
        ("device_status", "online", 1_764_000_000.0),
        ("device_status", "offline", 1_763_999_000.0),
    ]
    assert all(p.ts == 1_764_000_000.0 for p in sink.points)  # received time, not the will's stale ts
    assert ingest.stats.status_changes == 2 and "gone" in dead_reasons(mqtt)[0]
    view = ingest.tracker.view("gh-1", 1_764_000_000.0)
    assert view.status == "offline" and view.last_seen == 1_764_000_000.0


def test_telemetry_counts_as_seen_even_when_rejected() -> None:
    ingest, _, _ = make_registered("reject")
    ingest.on_message(telemetry(1, "stray", temperature=1.0))
    ingest.on_message(telemetry(2, "gh-1", temperature=1.0))
    assert sorted(ingest.tracker.device_ids()) == ["gh-1", "stray"]
    assert ingest.tracker.view("gh-1", 1_764_000_000.0).rate == pytest.approx(1 / 60)


# -- payload formats, MQTT 5 content type, identity ------------------------------------------------------

FORMATS_REGISTRY = """
types:
  greenhouse:
    fields:
      temperature: {type: number, min: -40, max: 85}
      fan: {type: bool}
  meter:
    format: senml
    fields:
      temperature: {type: number, min: -40, max: 85}
      energy_sum: {type: number}
devices:
  - {id: gh-1, type: greenhouse}
  - {id: m-1, type: meter}
"""
NOW = 1_764_000_000.0
SENML = json.dumps(
    [{"bn": "m-1:", "n": "temperature", "u": "Cel", "v": 21.5, "t": -10}, {"n": "energy", "u": "J", "s": 7}]
).encode()


def with_content_type(topic: str, payload: bytes, mid: int, content_type: str | None) -> Msg:
    """A message from an MQTT 5 connection, with or without a Content Type."""
    return Msg(topic, payload, mid, content_type=content_type)


def make_formats() -> tuple[TelemetryIngest, FakeMqtt, FakeSink]:
    mqtt, sink = FakeMqtt(), FakeSink()
    ingest = TelemetryIngest(
        topics=TopicScheme("devices/{device_id}/telemetry"),
        decoder=PayloadDecoder(),
        engine=RuleEngine(build_rule_set({})),
        sink=sink,
        commands=CommandDispatcher(
            channel=mqtt,
            topics=TopicScheme("devices/{device_id}/commands"),
            record=lambda p: None,
            clock=lambda: 5.0,
        ),
        mqtt=mqtt,
        dead_letter_topic="tidegate/dead-letter",
        dead_letter_max_bytes=512,
        clock=lambda: NOW,
        registry=parse_registry(FORMATS_REGISTRY, "devices.yaml"),
    )
    return ingest, mqtt, sink


@pytest.mark.parametrize(
    ("message", "stored"),
    [
        pytest.param(
            Msg("devices/m-1/telemetry", SENML, 1),
            [(NOW - 10, {"temperature": 21.5}), (NOW, {"energy_sum": 7.0})],
            id="senml type, no properties (MQTT 3.1.1)",
        ),
        pytest.param(
            with_content_type("devices/m-1/telemetry", SENML, 1, None),
            [(NOW - 10, {"temperature": 21.5}), (NOW, {"energy_sum": 7.0})],
            id="senml type, MQTT 5 without content type",
        ),
        pytest.param(
            with_content_type("devices/m-1/telemetry", b'{"temperature": 20}', 1, "application/json"),
            [(NOW, {"temperature": 20.0})],
            id="content type json overrides the type's senml",
        ),
        pytest.param(
            with_content_type(
                "devices/gh-1/telemetry",
                b'[{"n": "fan", "vb": true}]',
                1,
                "application/senml+json; charset=utf-8",
            ),
            [(NOW, {"fan": True})],
            id="content type senml overrides the type's json",
        ),
        pytest.param(
            with_content_type(
                "devices/stray/telemetry", b'[{"n": "stray:x", "v": 1}]', 1, "application/senml+json"
            ),
            [(NOW, {"x": 1.0})],
            id="unregistered device with a senml content type",
        ),
        pytest.param(
            Msg("devices/gh-1/telemetry", b'{"device": "gh-1", "temperature": 20}', 1),
            [(NOW, {"temperature": 20.0})],
            id="json naming its own device",
        ),
    ],
)
def test_payload_format_is_chosen_by_content_type_then_device_type(
    message: Msg, stored: list[tuple[float, dict[str, object]]]
) -> None:
    ingest, mqtt, sink = make_formats()
    ingest.on_message(message)
    sink.flush()
    assert dead_reasons(mqtt) == []
    assert [(p.ts, dict(p.fields)) for p in sink.points] == stored
    assert mqtt.acks == [1] and ingest.stats.written == 1


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        pytest.param(
            Msg("devices/m-1/telemetry", b'{"temperature": 20}', 1),
            "a SenML pack must be a JSON array of records, got dict",
            id="json from a senml type",
        ),
        pytest.param(
            with_content_type("devices/gh-1/telemetry", b'{"temperature": 20}', 1, "text/plain"),
            "unsupported content type 'text/plain' (expected application/json or application/senml+json)",
            id="other content type",
        ),
        pytest.param(
            with_content_type("devices/gh-1/telemetry", SENML, 1, "application/json"),
            "field 'bn': not a field of type 'greenhouse'",  # valid JSON, but not this type's fields
            id="senml labelled json",
        ),
        pytest.param(
            Msg("devices/gh-1/telemetry", b'{"device": "gh-2", "temperature": 20}', 1),
            "'device' names device 'gh-2', but the topic is for device 'gh-1'",
            id="spoofed json object",
        ),
        pytest.param(
            Msg(
                "devices/gh-1/telemetry", b'[{"temperature": 20}, {"device_id": "m-1", "temperature": 21}]', 1
            ),
            "[1] 'device_id' names device 'm-1', but the topic is for device 'gh-1'",
            id="spoofed json batch item",
        ),
        pytest.param(
            Msg("devices/m-1/telemetry", b'[{"bn": "gh-1:", "n": "temperature", "v": 20}]', 1),
            "[0] SenML name 'gh-1:temperature' names device 'gh-1', but the topic is for device 'm-1'",
            id="spoofed senml bn",
        ),
        pytest.param(
            Msg("devices/m-1/telemetry", b'[{"n": "pressure", "v": 1}]', 1),
            "field 'pressure': not a field of type 'meter'",
            id="senml checked against the type",
        ),
    ],
)
def test_wrong_format_content_type_or_identity_is_dead_lettered(message: Msg, reason: str) -> None:
    ingest, mqtt, sink = make_formats()
    ingest.on_message(message)
    sink.flush()
    assert sink.points == [] and mqtt.acks == [1]
    assert ingest.stats.rejected == 1 and ingest.stats.written == 0
    [dead] = dead_reasons(mqtt)
    assert dead.startswith(reason)


def test_registry_format_defaults_to_json_and_rejects_unknown_formats() -> None:
    registry = parse_registry(FORMATS_REGISTRY, "devices.yaml")
    assert {name: spec.format for name, spec in registry.types.items()} == {
        "greenhouse": "json",
        "meter": "senml",
    }
    with pytest.raises(SourceFileError) as info:
        parse_registry(FORMATS_REGISTRY.replace("format: senml", "format: cbor"), "devices.yaml")
    assert "devices.yaml:8:13" in str(info.value) and "'json' or 'senml'" in str(info.value)
    with pytest.raises(SourceFileError, match="field name 'device' is not allowed"):
        parse_registry(
            FORMATS_REGISTRY.replace("fan: {type: bool}", "device: {type: string}"), "devices.yaml"
        )
