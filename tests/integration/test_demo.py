"""`tidegate demo` run as a user runs it: a subprocess, its JSON summary, then `tidegate query`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker import find_mosquitto
from tests.integration.mqtt_servers import MISSING

pytestmark = pytest.mark.integration

DURATION = "12"  # long enough for the demo greenhouses (seed 1) to heat past 30 °C and raise alerts
RUN_TIMEOUT = 60.0  # a 12 s demo takes ~15 s; this is only reached when it hangs
START_TIMEOUT = 30.0  # until the demo's broker is up and the devices publish; only reached on failure
SIGINT_DEADLINE = 15.0  # after Ctrl-C: settle, drain the writes, disconnect, print the summary
RULE = "greenhouse-overheat"
DEVICE_RE = re.compile(r"greenhouse-\d{4}\Z")


def tidegate(*args: str) -> list[str]:
    # the interpreter running the tests, so it does not matter which `tidegate` is first on PATH
    return [sys.executable, "-m", "gateway", *args]


def clean_environment(tmp: Path | None = None) -> dict[str, str]:
    """Return os.environ without TIDEGATE_* overrides; with `tmp`, temporary files go there."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TIDEGATE_")}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)  # the embedded mosquitto's data dir, even if the demo is killed
    return env


def child_pids(pid: int) -> list[int]:
    """Return the ids of `pid`'s direct children (from /proc; empty where there is none)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it exited while we looked
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


class DemoProcess:
    """`tidegate demo` in a subprocess, its stderr read line by line as it comes."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.args = args
        self.cwd = cwd
        self.stderr_lines: list[str] = []
        self.stdout = ""
        self._changed = threading.Condition()
        self._stderr_closed = False

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            tidegate("demo", *self.args),
            cwd=self.cwd,
            env=clean_environment(self.cwd),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_stderr, name="demo-stderr", daemon=True)
        self._reader.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            # It hung. The embedded mosquitto runs in a session of its own (so a terminal's Ctrl-C
            # reaches only the demo), so it would outlive the demo: kill it by pid, not by name.
            orphans = child_pids(self.proc.pid)
            self.proc.kill()
            for pid in orphans:
                with contextlib.suppress(ProcessLookupError):  # it exited while we looked
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                with self._changed:
                    self.stderr_lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._stderr_closed = True
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self.stderr_lines)

    def wait_for_stderr(self, pattern: str, timeout: float) -> re.Match[str]:
        """Block until a stderr line matches `pattern` and return the match; fail after `timeout`."""
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def matched() -> bool:
            found[:] = [m for m in map(regex.search, self.stderr_lines) if m is not None][:1]
            return bool(found) or self._stderr_closed

        with self._changed:
            self._changed.wait_for(matched, timeout)
        if not found:
            pytest.fail(f"no stderr line matching {pattern!r} within {timeout}s; stderr:\n{self.stderr}")
        return found[0]

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the demo to exit 0 and return its summary, the JSON object on the last stdout line."""
        assert self.proc.stdout is not None
        try:
            # with --json, stdout gets one short line at the very end: it cannot fill the pipe first
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"`tidegate demo {' '.join(self.args)}` still running after {timeout}s; stderr:\n{self.stderr}"
            )
        self.stdout = self.proc.stdout.read()
        self._reader.join()
        assert self.proc.returncode == 0, f"exit code {self.proc.returncode}; stderr:\n{self.stderr}"
        lines = self.stdout.splitlines()
        assert lines, f"no summary on stdout; stderr:\n{self.stderr}"
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary


def query(db: Path, measurement: str) -> list[dict[str, Any]]:
    """Run `tidegate query --json` against the demo's SQLite store and return its rows."""
    done = subprocess.run(
        tidegate("query", "--sqlite", str(db), "--json", "--measurement", measurement),
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


# -- a demo run to its --duration, once per embedded broker -----------------------------------------


@dataclass(frozen=True)
class FinishedDemo:
    summary: dict[str, Any]
    db: Path


@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def finished_demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FinishedDemo:
    broker: str = request.param
    if broker == "mosquitto" and find_mosquitto() is None:
        pytest.skip(MISSING)
    workdir = tmp_path_factory.mktemp(f"demo-{broker}")
    with DemoProcess(
        "--duration", DURATION, "--json", "--dir", str(workdir), "--broker", broker, cwd=workdir
    ) as demo:
        summary = demo.finish(timeout=RUN_TIMEOUT)
    assert summary["broker"].startswith(f"{broker} mqtt://"), summary
    assert Path(summary["store"]) == workdir / "tidegate.db"
    return FinishedDemo(summary, workdir / "tidegate.db")


def test_demo_loses_nothing_and_the_rule_turns_fans_on(finished_demo: FinishedDemo) -> None:
    summary = finished_demo.summary
    for key in ("received", "stored", "alerts", "commands_sent", "commands_acked"):
        assert summary[key] > 0, f"{key} is 0: {summary}"
    assert summary["received"] == summary["sent_by_devices"], summary  # nothing lost on the way in
    assert summary["stored"] == summary["received"], summary  # nor on the way to the store
    assert summary["commands_acked"] == summary["commands_acked_by_devices"], summary
    zero = ("rejected", "points_rejected", "commands_failed", "commands_timed_out", "commands_rejected")
    assert {key: summary[key] for key in zero} == dict.fromkeys(zero, 0), summary


def test_query_reads_back_every_telemetry_message(finished_demo: FinishedDemo) -> None:
    rows = query(finished_demo.db, "telemetry")
    assert len(rows) == finished_demo.summary["received"]
    seqs: dict[str, list[int]] = {}
    for row in rows:
        assert DEVICE_RE.match(row["device"]), row
        assert isinstance(row["temperature"], float), row
        seqs.setdefault(row["device"], []).append(row["seq"])
    assert len(seqs) == finished_demo.summary["devices"]
    for device, numbers in seqs.items():
        assert sorted(numbers) == list(range(1, len(numbers) + 1)), f"gaps or repeats for {device}"


def test_query_reads_back_the_alerts_the_rule_raised(finished_demo: FinishedDemo) -> None:
    rows = query(finished_demo.db, "alerts")
    summary = finished_demo.summary
    assert len(rows) == summary["alerts"]
    states = Counter(row["state"] for row in rows)
    assert states == Counter(raised=summary["alerts_raised"], cleared=summary["alerts_cleared"])
    for row in rows:
        assert row["rule"] == RULE and row["severity"] == "warning", row
        assert DEVICE_RE.match(row["device"]), row
        if row["state"] == "raised":
            assert row["temperature"] > 30, row  # the value that raised it is stored with the alert
            assert row["message"] == f"temperature {row['temperature']} above 30", row


def test_query_reads_back_each_command_and_its_ack(finished_demo: FinishedDemo) -> None:
    rows = query(finished_demo.db, "commands")
    summary = finished_demo.summary
    statuses = Counter(row["status"] for row in rows)
    assert statuses == Counter(sent=summary["commands_sent"], ok=summary["commands_acked"]), rows
    sent = {row["id"]: row for row in rows if row["status"] == "sent"}
    for row in rows:
        assert row["name"] == "fan" and row["rule"] == RULE, row
        assert DEVICE_RE.match(row["device"]), row
        if row["status"] == "sent":
            assert json.loads(row["params"]) in ({"on": True}, {"on": False}), row
        else:
            command = sent[row["id"]]  # every ack answers a command the gateway sent...
            assert row["device"] == command["device"], row  # ...to that same device
            assert row["ts"] >= command["ts"] and row["latency_ms"] >= 0, row
    assert any(json.loads(row["params"]) == {"on": True} for row in sent.values())


# -- Ctrl-C ------------------------------------------------------------------------------------------


class FirstTelemetry:
    """An MQTT client on its own thread that notes when any device's telemetry arrives."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.arrived = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-demo-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda client, *_: client.subscribe("devices/+/telemetry", qos=1)
        self.client.on_message = lambda *_: self.arrived.set()

    def __enter__(self) -> Self:
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_ctrl_c_stops_the_demo_cleanly_and_it_still_prints_the_summary(tmp_path: Path) -> None:
    # -v logs the embedded broker's address, which is how we see the devices start publishing
    with DemoProcess("--json", "-v", "--dir", str(tmp_path), cwd=tmp_path) as demo:
        where = demo.wait_for_stderr(r"embedded \w+ broker at mqtt://([\d.]+):(\d+)", START_TIMEOUT)
        with FirstTelemetry(where[1], int(where[2])) as telemetry:
            assert telemetry.arrived.wait(START_TIMEOUT), f"no telemetry; stderr:\n{demo.stderr}"
        demo.proc.send_signal(signal.SIGINT)
        summary = demo.finish(timeout=SIGINT_DEADLINE)

    assert summary["received"] > 0, summary
    assert summary["received"] == summary["sent_by_devices"], summary
    assert summary["stored"] == summary["received"], summary
    assert "Traceback" not in demo.stderr, demo.stderr
