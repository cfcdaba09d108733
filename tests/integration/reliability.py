"""Helpers shared by the test_reliability_* modules: counters that must add up, gaps read back, broker saves.

The publisher, `until` and `running` come from test_mqtt_faults, where the fault matrix started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from gateway.broker import MosquittoBroker
from gateway.store.base import Point

# The accounting identity (gateway/ingest.py IngestStats): every telemetry message received is in
# exactly one of these at any moment.
OUTCOMES = ("messages_stored", "messages_spooled", "messages_dead_lettered", "rejected", "in_flight")


def check_accounts(snapshot: Mapping[str, Any]) -> None:
    """Assert that the gateway's message counters add up, saying which did not."""
    parts = {name: snapshot[name] for name in OUTCOMES}
    assert snapshot["received"] == sum(parts.values()), f"received {snapshot['received']} != {parts}"
    handed_off = parts["messages_stored"] + parts["messages_spooled"] + parts["messages_dead_lettered"]
    assert snapshot["written"] == handed_off, f"written {snapshot['written']} != {handed_off}"
    assert snapshot["in_flight"] >= 0


def gap_events(points: Iterable[Point], kind: str = "seq_gap") -> dict[str, list[tuple[int, int]]]:
    """Return the reported gaps per device, as (first, last) in the order stored."""
    gaps: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for point in points:
        tags = dict(point.tags)
        if point.measurement == "gateway_events" and tags.get("kind") == kind:
            gaps[tags["device"]].append((int(point.fields["first"]), int(point.fields["last"])))
    return dict(gaps)


def seqs_in(ranges: Mapping[str, list[tuple[int, int]]]) -> dict[str, set[int]]:
    """Expand (first, last) ranges per device into sets of seqs, checking that none overlap."""
    expanded: dict[str, set[int]] = {}
    for device, pairs in ranges.items():
        seqs: set[int] = set()
        for first, last in pairs:
            span = set(range(first, last + 1))
            assert not seqs & span, f"{device}: gap {first}..{last} reported twice"
            seqs |= span
        expanded[device] = seqs
    return expanded


def missing(sent: Mapping[str, set[int]], stored: Mapping[str, set[int]]) -> dict[str, set[int]]:
    """Return, per device, what was sent and is not stored (devices with nothing missing left out)."""
    return {d: s - stored.get(d, set()) for d, s in sent.items() if s - stored.get(d, set())}


async def save_broker(broker: MosquittoBroker, within: float = 10.0) -> None:
    """Have mosquitto write its persistence database (SIGUSR1) and wait until the new file is in place.

    mosquitto writes `mosquitto.db.new` and renames it over `mosquitto.db`, so a new inode or
    modification time means the save is complete.
    """
    db = broker.persistence_dir / "mosquitto.db"

    def identity() -> tuple[int, int] | None:
        try:
            stat = os.stat(db)
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    before = identity()
    broker.save()
    deadline = time.monotonic() + within
    while identity() == before:
        if time.monotonic() > deadline:
            raise AssertionError(f"mosquitto did not save {db} within {within}s")
        await asyncio.sleep(0.02)


class PacedPublisher:
    """A paho QoS 1 publisher that sends `rate` messages a second over `devices`, payloads from `make`.

    Like test_mqtt_faults.Publisher (it reconnects by itself and resends what was not acknowledged),
    but with the payload chosen by the test and a steady rate. `sent` holds each device's seqs;
    with `keep_seqs=False` it stays empty (a soak publishes millions) and `last_seqs()` tells what was
    sent: every device's seqs run from 1 to its last, with none skipped.
    """

    def __init__(
        self, host: str, port: int, make: Callable[[str, int], bytes], *, keep_seqs: bool = True
    ) -> None:
        self._make = make
        self._keep_seqs = keep_seqs
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"pace-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv311
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.sent: dict[str, set[int]] = defaultdict(set)
        self._next: dict[str, int] = defaultdict(int)
        self._published = 0
        self._acked = 0
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=5)
        self.client.loop_start()

    def _on_publish(
        self, client: paho.Client, userdata: object, mid: int, reason: object, props: object
    ) -> None:
        self._acked += 1  # on paho's thread, the only writer

    def run(
        self, devices: list[str], rate: float, seconds: float, stop: threading.Event | None = None
    ) -> None:
        """Publish for `seconds` (or until `stop` is set), one device after another (blocking)."""
        tick = 0.01
        per_tick = max(1, round(rate * tick))
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds and not (stop is not None and stop.is_set()):
            for _ in range(per_tick):
                device = devices[n % len(devices)]
                n += 1
                self._next[device] += 1
                seq = self._next[device]
                info = self.client.publish(f"devices/{device}/telemetry", self._make(device, seq), qos=1)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
                self._published += 1
                if self._keep_seqs:
                    self.sent[device].add(seq)
            # keep to the schedule rather than sleep a fixed tick: publishing itself takes time
            ahead = start + n / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def unacked(self) -> int:
        return self._published - self._acked

    def last_seqs(self) -> dict[str, int]:
        """Return each device's last seq published (its first was 1)."""
        return dict(self._next)

    @property
    def published(self) -> int:
        return self._published

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.asynccontextmanager
async def paced_publisher(
    host: str, port: int, make: Callable[[str, int], bytes], *, keep_seqs: bool = True
) -> AsyncIterator[PacedPublisher]:
    pub = await asyncio.to_thread(functools.partial(PacedPublisher, host, port, make, keep_seqs=keep_seqs))
    try:
        yield pub
    finally:
        await asyncio.to_thread(pub.close)


def send(host: str, port: int, messages: Iterable[tuple[str, bytes]]) -> None:
    """Publish (topic, payload) pairs at QoS 1 in order and return once the broker acknowledged each."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"send-{uuid.uuid4().hex[:6]}")
    client.connect(host, port)
    client.loop_start()
    try:
        for info in [client.publish(topic, payload, qos=1) for topic, payload in messages]:
            info.wait_for_publish(10)
            assert info.is_published(), "the broker did not acknowledge a publish within 10 s"
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass(frozen=True)
class ProcessUsage:
    """What a process holds, from /proc: resident memory, open file descriptors, threads."""

    rss_kib: int
    fds: int
    threads: int


def process_usage(pid: int) -> ProcessUsage | None:
    """Read a process's RSS, fd count and thread count from /proc; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie, not yet reaped
        return None
    return ProcessUsage(
        rss_kib=int(fields["VmRSS"].split()[0]), fds=fds, threads=int(fields["Threads"].split()[0])
    )
