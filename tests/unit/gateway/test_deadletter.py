"""The dead-letter file: records with reasons, durable before the ack, bounded by rotation."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.config import load_settings
from gateway.deadletter import DeadLetterFile
from gateway.store.base import Point


def read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_payload_and_point_records(tmp_path: Path) -> None:
    dead = DeadLetterFile(tmp_path / "dl" / "dead.jsonl")
    dead.payload(
        topic="devices/d/telemetry", device_id="d", reason="bad JSON", received_at=5.0, payload=b"\xffoops"
    )
    point = Point("telemetry", (("device", "d"),), {"t": 1.0, "s": "x"}, 7.0)
    dead.points([point], "field type conflict", 8.0)
    dead.close()
    payload, refused = read(tmp_path / "dl" / "dead.jsonl")
    assert (
        payload["reason"] == "bad JSON"
        and payload["payload"] == "\ufffdoops"
        and payload["payload_bytes"] == 5
    )
    assert refused == {
        "kind": "point",
        "at": 8.0,
        "reason": "field type conflict",
        "measurement": "telemetry",
        "tags": {"device": "d"},
        "fields": {"t": 1.0, "s": "x"},
        "ts": 7.0,
    }
    assert dead.records == 2


def test_rotation_bounds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    dead = DeadLetterFile(path, max_bytes=2048)
    for i in range(100):
        dead.payload(topic="t", device_id=None, reason=f"r{i}", received_at=0.0, payload=b"x" * 100)
    dead.close()
    assert path.stat().st_size <= 2048 + 400
    assert (tmp_path / "dead.jsonl.1").exists()
    assert read(path)[-1]["reason"] == "r99"


def test_unwritable_location_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    dead = DeadLetterFile(blocker / "dead.jsonl")  # a file where a directory should be
    dead.payload(topic="t", device_id=None, reason="r", received_at=0.0, payload=b"x")
    assert dead.failures == 1 and dead.records == 0


def test_default_location_is_next_to_the_config(tmp_path: Path) -> None:
    config = tmp_path / "tidegate.yaml"
    config.write_text("{}")
    settings = load_settings(config, environ={})
    assert settings.dead_letter.file == tmp_path / "dead-letter.jsonl"
    assert settings.spool.dir == tmp_path / "spool"
