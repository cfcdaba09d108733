"""Memory per device: tidegate's resident memory as the number of devices it has heard from grows.

    python3 -m bench.scaling                      # 100,000 devices in 4 steps, 3 messages each
    python3 -m bench.scaling --devices 20000 --steps 2 --messages-per-device 2   # a quick look

The workload's rule set (10 rules, 3 of them windowed) runs in a real `Gateway` in a child process,
behind a real Mosquitto, into the null store. The parent publishes in steps: each step brings new
devices, each sending a few messages. After each step the child waits until every message is
stored, collects garbage, and reports its RSS. The slope between the first and the last step is the
memory each extra device costs (rule state, dedupe, status, latest values, allocator overhead); the
fixed cost (interpreter, modules, batch buffers) cancels out. The issue's target: 100,000 devices
with 10 rules each in under 1 GB resident.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.servers import bench_broker, rss_kb
from bench.workload import TELEMETRY_TOPIC, device_id, payload, rule_files

TARGET_KB = 1024 * 1024  # 1 GB for 100,000 devices
TARGET_DEVICES = 100_000
MAX_INFLIGHT = 5_000


@dataclass(frozen=True, slots=True)
class ScalingJob:
    """Where the child's gateway connects."""

    host: str
    port: int
    client_id: str
    protocol: str = "5"


def gateway_main(job: ScalingJob, conn: Connection) -> None:
    """Child: run a gateway; answer each ("measure", stored) request with its RSS once that many are in."""
    try:
        asyncio.run(_serve(job, conn))
    except Exception as exc:  # reported to the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    conn.close()


async def _serve(job: ScalingJob, conn: Connection) -> None:
    from gateway.app import Gateway
    from gateway.config import MqttSettings, Settings
    from gateway.store.memory import NullStore
    from rules import build_rule_set

    settings = Settings(
        mqtt=MqttSettings(
            url=f"mqtt://{job.host}:{job.port}", client_id=job.client_id, protocol=job.protocol
        ),
        log_level="WARNING",
    )
    gateway = Gateway(settings, rule_set=build_rule_set(rule_files(windowed=True)), store=NullStore())
    stop = asyncio.Event()
    runner = asyncio.create_task(gateway.run(stop), name="gateway")
    try:
        async with asyncio.timeout(30):
            await gateway.mqtt.connected.wait()
        gc.freeze()  # as `tidegate run` does once started
        conn.send({"ready": True, "rss_kb": rss_kb()})
        while True:
            request = await asyncio.to_thread(conn.recv)
            if request[0] == "stop":
                break
            expected = request[1]
            deadline = time.monotonic() + 300
            # the snapshot's counters have no event to wait on; a slow poll is enough here
            while gateway.snapshot()["written"] < expected and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            gc.collect()
            snapshot = gateway.snapshot()
            conn.send({"rss_kb": rss_kb(), "written": snapshot["written"], "received": snapshot["received"]})
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await runner


class _Publisher:
    """One QoS 1 paho publisher with a bounded in-flight window."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.acked = 0
        self.sent = 0
        self._acks = threading.Condition()
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        client.max_inflight_messages_set(0)
        client.on_publish = self._on_publish
        client.connect(host, port, keepalive=60)
        client.loop_start()
        self.client = client

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._acks:
            self.acked += 1
            self._acks.notify()

    def send(self, first: int, last: int, rounds: int, seq_base: int) -> None:
        """Publish `rounds` messages to each device in [first, last); seq continues from `seq_base`."""
        for round_ in range(rounds):
            for number in range(first, last):
                with self._acks:
                    while self.sent - self.acked >= MAX_INFLIGHT:
                        self._acks.wait(1)
                body = payload(
                    number + (seq_base + round_) * TARGET_DEVICES, TARGET_DEVICES, time.time(), False
                )
                self.client.publish(TELEMETRY_TOPIC.format(device_id=device_id(number)), body, 1)
                self.sent += 1
        with self._acks:
            while self.acked < self.sent:
                self._acks.wait(1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def steps_of(devices: int, steps: int) -> list[int]:
    """Device counts measured at, e.g. 100,000 in 4 steps -> 25,000, 50,000, 75,000, 100,000."""
    return [devices * (i + 1) // steps for i in range(steps)]


def slope_kb(points: Sequence[tuple[int, int]]) -> float:
    """Least-squares KiB per device through (devices, rss_kb) points."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def run(devices: int, steps: int, per_device: int, protocol: str, log: Any = print) -> dict[str, Any]:
    """Run the scaling measurement and return its figures."""
    if devices > TARGET_DEVICES:
        raise ValueError(f"at most {TARGET_DEVICES:,} devices (the workload's id space)")
    ctx = multiprocessing.get_context("spawn")
    with bench_broker(max_queued_messages=devices * per_device + 10_000) as broker:
        client_id = f"tidegate-scaling-{int(time.time())}"
        parent, child_end = ctx.Pipe()
        child = ctx.Process(
            target=gateway_main, args=(ScalingJob(broker.host, broker.port, client_id, protocol), child_end)
        )
        child.start()
        rows: list[dict[str, Any]] = []
        try:
            ready: dict[str, Any] = (
                parent.recv() if parent.poll(60) else {"error": "gateway did not start in 60s"}
            )
            if "error" in ready:
                raise RuntimeError(ready["error"])
            log(f"gateway ready, RSS {ready['rss_kb'] / 1024:.1f} MiB")
            publisher = _Publisher(broker.host, broker.port, f"{client_id}-pub")
            done = 0
            started = time.monotonic()
            try:
                for count in steps_of(devices, steps):
                    publisher.send(done, count, per_device, 0)
                    parent.send(("measure", count * per_device))
                    figures = parent.recv()
                    if "error" in figures:
                        raise RuntimeError(figures["error"])
                    done = count
                    row = {"devices": count, **figures}
                    rows.append(row)
                    log(
                        f"{count:>8,} devices  RSS {figures['rss_kb'] / 1024:8.1f} MiB  "
                        f"written {figures['written']:,}  ({time.monotonic() - started:.0f}s)"
                    )
            finally:
                publisher.close()
            parent.send(("stop",))
        finally:
            child.join(60)
            if child.is_alive():
                child.kill()
    per_device_kb = slope_kb([(row["devices"], row["rss_kb"]) for row in rows]) if len(rows) > 1 else 0.0
    projected_kb = ready["rss_kb"] + per_device_kb * TARGET_DEVICES
    return {
        "devices": devices,
        "steps": rows,
        "messages_per_device": per_device,
        "rules": "10 rules per device, 3 windowed (bench/workload.py)",
        "rss_idle_kb": ready["rss_kb"],
        "per_device_bytes": per_device_kb * 1024,
        "projected_rss_100k_kb": projected_kb,
        "target_met": projected_kb < TARGET_KB,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.scaling",
        description="Measure tidegate's resident memory per device on a real Mosquitto (null store).",
    )
    parser.add_argument(
        "--devices", type=int, default=TARGET_DEVICES, help="devices at the last step (default 100,000)"
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="measurements between 0 and --devices (default 4)"
    )
    parser.add_argument(
        "--messages-per-device", type=int, default=3, help="messages each device sends (default 3)"
    )
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where scaling.json goes")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.devices < args.steps or args.messages_per_device < 1:
        parser.error("need --steps >= 2, --devices >= --steps and --messages-per-device >= 1")
    result = run(args.devices, args.steps, args.messages_per_device, args.protocol)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = "ok" if result["target_met"] else "MISSED"
    print(
        f"\nper device: {result['per_device_bytes']:,.0f} bytes resident "
        f"(slope over {len(result['steps'])} steps)\n"
        f"projected for {TARGET_DEVICES:,} devices: {result['projected_rss_100k_kb'] / 1024:,.0f} MiB "
        f"[{verdict}: target < 1 GB]\nresults: {args.out / 'scaling.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
