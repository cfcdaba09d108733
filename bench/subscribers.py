"""The reference subscribers (mosquitto_sub, bare paho) and the device side that receives commands.

Every subscriber drains a backlog from a persistent session that `create_session` made before the
burst was published, so the broker queued the whole burst for it; the time from its first to its last
message is its saturation throughput. `paho_counter_main` and `command_listener_main` run in child
processes (multiprocessing, spawn) so their CPU time and peak memory are their own.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import threading
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.workload import COMMAND_ACK_TOPIC, COMMAND_FILTER, TELEMETRY_FILTER, device_index, message_key

SESSION_EXPIRY = 3600
RCVBUF = 4 * 1024 * 1024  # what gateway/mqtt.py asks for, so socket buffers are no difference here
_SEQ = re.compile(rb'"seq": (\d+)')


def _client(client_id: str, protocol: str, *, persistent: bool) -> paho.Client:
    v5 = protocol == "5"
    return paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else not persistent,
    )


def _connect(client: paho.Client, host: str, port: int, protocol: str, *, clean_start: bool) -> None:
    if protocol == "5":
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY
        client.connect(host, port, keepalive=60, clean_start=clean_start, properties=properties)
    else:
        client.connect(host, port, keepalive=60)


def _wait(event: threading.Event, what: str, timeout: float = 10.0) -> None:
    if not event.wait(timeout):
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def create_session(
    host: str, port: int, client_id: str, protocol: str, subscriptions: list[tuple[str, int]]
) -> None:
    """Make a fresh persistent session with these subscriptions, then disconnect (blocking).

    From then on the broker queues every matching message for `client_id` until it reconnects.
    """
    client = _client(client_id, protocol, persistent=True)
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    _connect(client, host, port, protocol, clean_start=True)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{client_id} could not connect to {host}:{port}")
            time.sleep(0.01)
        client.subscribe(subscriptions)
        _wait(subscribed, f"SUBACK for {client_id}")
    finally:
        client.disconnect()
        client.loop_stop()


def remove_session(host: str, port: int, client_id: str, protocol: str) -> None:
    """Make the broker forget `client_id`'s session, so it stops queueing messages for it (blocking).

    A drained subscriber's session stays subscribed after it disconnects: left alone, the broker would
    go on queueing every later message for it, broker work that would load the runs that follow.
    """
    client = _client(client_id, protocol, persistent=False)
    if protocol == "5":
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        client.connect(host, port, keepalive=60, clean_start=True, properties=properties)
    else:
        client.connect(host, port, keepalive=60)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{client_id} could not connect to {host}:{port}")
            time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()


def steady_rate(times: list[float] | array[float], low: float = 0.1, high: float = 0.9) -> float:
    """Return messages/s between the `low` and `high` fractions of arrivals (0 if too few)."""
    n = len(times)
    a, b = int(n * low), int(n * high) - 1
    if b - a < 10 or times[b] <= times[a]:
        return 0.0
    return (b - a) / (times[b] - times[a])


def count_summary(
    times: list[float] | array[float], keys: list[int] | array[int], sent: int
) -> dict[str, Any]:
    """Summarise what a subscriber received: counts, loss, duplicates, window and rates."""
    received = len(keys)
    distinct = len(set(keys))
    seconds = times[-1] - times[0] if received > 1 else 0.0
    return {
        "received": received,
        "distinct": distinct,
        "lost": sent - distinct,
        "duplicates": received - distinct,
        "first_at": times[0] if received else 0.0,
        "last_at": times[-1] if received else 0.0,
        "seconds": seconds,
        "rate": received / seconds if seconds > 0 else 0.0,
        "steady_rate": steady_rate(times),
    }


# -- mosquitto_sub ---------------------------------------------------------------------------------


def find_mosquitto_sub() -> str | None:
    """Return the mosquitto_sub binary (Debian package mosquitto-clients), or None."""
    return shutil.which("mosquitto_sub")


def run_mosquitto_sub(
    *,
    executable: str,
    host: str,
    port: int,
    client_id: str,
    protocol: str,
    qos: int,
    expected: int,
    timeout: float,
    out_dir: Path,
) -> dict[str, Any]:
    """Drain `client_id`'s session with mosquitto_sub, counting messages; return its figures.

    Each line is `<arrival time with ns> <topic> <payload>` (`-F '%U %t %p'`) in a file: that costs
    mosquitto_sub a formatted write per message, a small price for per-message times and a real
    (device, seq) loss count. CPU time and peak RSS come from wait4's rusage.
    """
    out_path = out_dir / f"{client_id}.out"
    argv = [
        executable,
        *("-h", host, "-p", str(port), "-i", client_id, "-c", "-q", str(qos)),
        *("-t", TELEMETRY_FILTER, "-C", str(expected), "-W", str(max(1, int(timeout)))),
        *("-F", "%U %t %p"),
    ]
    argv += ["-V", "5", "-x", str(SESSION_EXPIRY)] if protocol == "5" else ["-V", "311"]
    with out_path.open("wb") as out, (out_dir / f"{client_id}.err").open("wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    times: list[float] = []
    keys: list[int] = []
    with out_path.open("rb") as lines:
        for line in lines:
            stamp, topic, body = line.split(b" ", 2)
            seq = _SEQ.search(body)
            if seq is None:
                continue
            times.append(float(stamp))
            keys.append(message_key(device_index(topic.split(b"/")[1].decode()), int(seq.group(1))))
    out_path.unlink()
    summary = count_summary(times, keys, expected)
    summary.update(
        cpu_s=usage.ru_utime + usage.ru_stime,
        rss_peak_kb=usage.ru_maxrss,
        exit_status=process.returncode,
    )
    return summary


# -- bare paho-mqtt subscriber ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CountJob:
    """A subscriber that drains `client_id`'s persistent session, expecting `expected` messages."""

    host: str
    port: int
    client_id: str
    protocol: str
    expected: int
    idle_timeout: float
    connect_timeout: float = 10.0


def paho_counter_main(job: CountJob, conn: Connection) -> None:
    """Count messages with a bare paho callback subscriber (`loop_forever`, automatic acks)."""
    try:
        conn.send(_count(job))
    except Exception as exc:  # reported to the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    conn.close()


def _count(job: CountJob) -> dict[str, Any]:
    times: array[float] = array("d")
    keys: array[int] = array("q")
    expected = job.expected
    start_usage: list[resource.struct_rusage] = []
    end_usage: list[resource.struct_rusage] = []
    start_rss: list[int] = []

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = time.time()
        if not times:
            start_usage.append(resource.getrusage(resource.RUSAGE_SELF))
            start_rss.append(_rss_kb())
        times.append(now)
        # Payloads are unique per message (publish time and seq), so their hashes count them without
        # parsing JSON, which would no longer be the floor.
        keys.append(hash(message.payload))
        if len(times) >= expected:
            end_usage.append(resource.getrusage(resource.RUSAGE_SELF))
            client.disconnect()

    def on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)

    client = _client(job.client_id, job.protocol, persistent=True)
    client.on_message = on_message
    client.on_socket_open = on_socket_open
    _connect(client, job.host, job.port, job.protocol, clean_start=False)

    def watchdog() -> None:
        # Stop when messages stop coming (some were lost) rather than wait forever.
        seen, quiet_since = -1, time.monotonic()
        while not end_usage:
            time.sleep(0.1)
            if len(times) != seen:
                seen, quiet_since = len(times), time.monotonic()
            limit = job.idle_timeout if seen else job.idle_timeout + job.connect_timeout
            if time.monotonic() - quiet_since > limit:
                end_usage.append(resource.getrusage(resource.RUSAGE_SELF))
                client.disconnect()

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    client.loop_forever()
    if not start_usage:
        start_usage.append(end_usage[0])
        start_rss.append(_rss_kb())
    summary = count_summary(times, keys, expected)
    begin, end = start_usage[0], end_usage[0]
    summary.update(
        cpu_s=(end.ru_utime - begin.ru_utime) + (end.ru_stime - begin.ru_stime),
        rss_start_kb=start_rss[0],
        rss_peak_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    return summary


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- the device side of commands -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenJob:
    """Where the command listener connects."""

    host: str
    port: int
    client_id: str


def command_listener_main(job: ListenJob, ready: Event, stop: Event, conn: Connection) -> None:
    """Receive commands on `devices/+/commands`, note when each arrived, and ack it as a device would.

    Sends the parent `{"commands": [(device number, arrival time, command ts), ...]}` once `stop`
    is set.
    """
    records: list[tuple[int, float, float]] = []
    subscribed = threading.Event()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = time.time()
        device = message.topic.split("/")[1]
        command = json.loads(message.payload)
        records.append((device_index(device), now, float(command["ts"])))
        ack = json.dumps({"id": command["id"], "status": "ok"}).encode()
        client.publish(COMMAND_ACK_TOPIC.format(device_id=device), ack, qos=1)

    client = _client(job.client_id, "3.1.1", persistent=False)
    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.max_inflight_messages_set(1000)
    error = ""
    try:
        client.connect(job.host, job.port, keepalive=60)
        client.loop_start()
        client.subscribe(COMMAND_FILTER, qos=1)
        _wait(subscribed, "the command listener's SUBACK")
    except Exception as exc:  # reported to the parent
        error = f"{type(exc).__name__}: {exc}"
    ready.set()
    if not error:
        stop.wait()
        time.sleep(0.2)  # let the last acks leave
        client.disconnect()
        client.loop_stop()
    conn.send({"commands": records, "error": error})
    conn.close()
