"""The load generator: publisher processes that send the workload at QoS 1, as a burst or paced.

Each publisher process owns the devices `d` with `d % publishers == index` and publishes their
messages in message order, so each device's messages leave in seq order from one connection. A
payload's `ts` is the time it was handed to paho, which is what "publish time" means in the latency
figures. Runs in a child process (multiprocessing, spawn): imports nothing from the gateway.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.workload import TELEMETRY_TOPIC, device_id, is_trigger, payload

# QoS 1 publishes awaiting PUBACK per publisher: deep enough never to wait on acks. The window is
# kept here, with paho's own limit off (0): with a limit, paho scans every in-flight message on each
# PUBACK (Client._update_inflight), which at 10,000 in flight costs more than the publishing.
MAX_INFLIGHT = 10_000
PACE_TICK = 0.002  # paced publishers send what is due every 2 ms: smooth enough, cheap on the CPU
ACK_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class PublishJob:
    """What one publisher process sends.

    Attributes:
        rate: total messages/s over all publishers; 0 publishes as fast as possible (a burst).
    """

    host: str
    port: int
    client_id: str
    index: int
    publishers: int
    devices: int
    messages: int
    trigger_fraction: float
    qos: int = 1
    rate: float = 0.0


@dataclass(slots=True)
class PublishResult:
    """What one publisher sent; `triggers` lists (device number, seq, publish time)."""

    published: int = 0
    acked: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    cpu_s: float = 0.0
    triggers: list[tuple[int, int, float]] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain data for the parent process."""
        return {
            "published": self.published,
            "acked": self.acked,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "cpu_s": self.cpu_s,
            "triggers": self.triggers,
            "error": self.error,
        }


def my_messages(job: PublishJob) -> list[int]:
    """Return the message numbers this publisher sends, in order."""
    devices, publishers, index = job.devices, job.publishers, job.index
    return [i for i in range(job.messages) if (i % devices) % publishers == index]


def publisher_main(job: PublishJob, ready: Event, go: Event, conn: Connection) -> None:
    """Connect, signal `ready`, wait for `go`, publish the job's messages, wait for every PUBACK."""
    result = PublishResult()
    try:
        _publish(job, ready, go, result)
    except Exception as exc:  # reported to the parent, which fails the run with it
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        ready.set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_s = usage.ru_utime + usage.ru_stime
    conn.send(result.as_dict())
    conn.close()


def _publish(job: PublishJob, ready: Event, go: Event, result: PublishResult) -> None:
    acked = 0

    def on_publish(client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        nonlocal acked
        acked += 1

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=job.client_id,
        protocol=paho.MQTTv311,
    )
    client.max_inflight_messages_set(0)
    client.on_publish = on_publish
    client.connect(job.host, job.port, keepalive=60)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError(f"publisher {job.index} could not connect to {job.host}:{job.port}")
            time.sleep(0.01)
        numbers = my_messages(job)
        topics = [TELEMETRY_TOPIC.format(device_id=device_id(d)) for d in range(job.devices)]
        triggers = [is_trigger(i, job.devices, job.trigger_fraction) for i in numbers]
        ready.set()
        go.wait()  # all publishers start together
        share = job.rate * len(numbers) / job.messages if job.rate else 0.0
        devices, qos, publish = job.devices, job.qos, client.publish
        started = time.time()
        sent = 0
        total = len(numbers)
        while sent < total:
            # a burst sends everything now; a paced run sends what is due by the clock, then sleeps
            due = total if not share else min(total, int((time.time() - started) * share) + 1)
            while sent < due:
                if sent - acked >= MAX_INFLIGHT:
                    time.sleep(0.0005)
                    continue
                i = numbers[sent]
                trigger = triggers[sent]
                ts = time.time()
                publish(topics[i % devices], payload(i, devices, ts, trigger), qos)
                if trigger:
                    result.triggers.append((i % devices, i // devices + 1, ts))
                if not sent:
                    result.first_ts = ts
                sent += 1
            result.last_ts = time.time()
            if share and sent < total:
                time.sleep(PACE_TICK)
        result.published = sent
        deadline = time.monotonic() + ACK_TIMEOUT
        while qos and acked < sent and time.monotonic() < deadline:
            time.sleep(0.01)
        result.acked = acked if qos else sent
        if result.acked < sent:
            result.error = f"only {result.acked} of {sent} publishes were acked in {ACK_TIMEOUT}s"
    finally:
        client.disconnect()
        client.loop_stop()
