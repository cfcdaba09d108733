"""Pytest fixtures that run real InfluxDB 1.x and VictoriaMetrics servers (loaded from tests/conftest.py).

Each server runs on free loopback ports with its data in a temporary directory, once per session.
`ServerProcess` owns the process: start and wait until it answers, stop, and the signals failure
tests need (pause/resume with SIGSTOP/SIGCONT, kill with SIGKILL, restart on the same ports and data).
Tests that signal a server should make their own with `InfluxDBServer`/`VictoriaMetricsServer` rather
than disturb the session's.

The fixtures skip, saying why, only when the binary is not installed (Debian packages `influxdb` and
`victoria-metrics`; CI installs both). `TIDEGATE_INFLUXD` and `TIDEGATE_VICTORIA_METRICS` override
the binaries' paths.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
START_ATTEMPTS = 3  # a free port we picked can be taken by someone else before the server binds it


def free_port() -> int:
    """Return a TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def find_binary(env_var: str, name: str, fallback: str) -> str | None:
    """Return the server binary's path from the environment, PATH or the Debian location, or None."""
    candidate = os.environ.get(env_var) or shutil.which(name) or fallback
    return candidate if os.access(candidate, os.X_OK) else None


class ServerProcess:
    """Run one server binary; start it and wait until `ready()` is true, stop it, signal it."""

    def __init__(self, name: str, argv: list[str], *, log_path: Path, ready: Callable[[], bool]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._ready = ready
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def pid(self) -> int | None:
        """Return the process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Return whether the process is alive (paused counts as alive)."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process and wait until it is ready; raise RuntimeError with its log if not."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self._process.returncode} while starting:\n{self.log_tail()}"
                )
            if self._ready():
                return
            time.sleep(POLL_INTERVAL)
        self.kill()
        raise RuntimeError(f"{self.name} was not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), killing the process if it does not exit within `timeout`."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if self._paused:
                process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        self._paused = False

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._process = None
        self._paused = False

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): it keeps its sockets but answers nothing."""
        if self._process is None or not self.running:
            raise RuntimeError(f"{self.name} is not running")
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused process run again (SIGCONT)."""
        if self._process is not None and self._paused:
            self._process.send_signal(signal.SIGCONT)
            self._paused = False

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop gracefully and start again with the same arguments (same ports and data)."""
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        """Return the end of the process's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _answers(url: str, expected_status: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == expected_status
        except httpx.HTTPError:
            return False

    return check


class _Server:
    process: ServerProcess

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.process.stop()

    def _start_with_retries(self, make: Callable[[], ServerProcess]) -> None:
        for attempt in range(START_ATTEMPTS):
            self.process = make()
            try:
                self.process.start()
                return
            except RuntimeError:
                self.process.stop()
                if attempt == START_ATTEMPTS - 1:
                    raise


class InfluxDBServer(_Server):
    """A real `influxd` (1.x) with meta, data and WAL in `directory`, HTTP and RPC on free loopback ports."""

    _names = itertools.count(1)

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.rpc_port = 0
        self._start_with_retries(self._make)

    def _make(self) -> ServerProcess:
        self.port = free_port()
        self.rpc_port = free_port()
        config = self.directory / "influxdb.conf"
        config.write_text(
            f"""\
reporting-disabled = true
bind-address = "{LOOPBACK}:{self.rpc_port}"

[meta]
  dir = "{self.directory / "meta"}"
  logging-enabled = false

[data]
  dir = "{self.directory / "data"}"
  wal-dir = "{self.directory / "wal"}"
  query-log-enabled = false

[monitor]
  store-enabled = false

[continuous_queries]
  enabled = false

[subscriber]
  enabled = false

[http]
  bind-address = "{LOOPBACK}:{self.port}"
  log-enabled = false
"""
        )
        return ServerProcess(
            "influxd",
            [self.executable, "-config", str(config)],
            log_path=self.directory / "influxd.log",
            ready=_answers(f"http://{LOOPBACK}:{self.port}/ping", 204),
        )

    @property
    def url(self) -> str:
        """Return the HTTP API's base URL."""
        return f"http://{LOOPBACK}:{self.port}"

    def create_database(self, prefix: str = "test") -> str:
        """Create a database with a name no other test uses and return the name."""
        name = f"{prefix}_{next(self._names)}"
        self.query(f'CREATE DATABASE "{name}"')
        return name

    def query(self, statement: str, database: str | None = None) -> list[dict[str, Any]]:
        """Run one InfluxQL statement; return its series (raise AssertionError on an error)."""
        data = {"q": statement, "epoch": "u"}
        if database is not None:
            data["db"] = database
        response = httpx.post(f"{self.url}/query", data=data, timeout=10.0)
        body = response.json()
        assert response.status_code == 200 and "error" not in body, body
        result = body["results"][0]
        assert "error" not in result, result["error"]
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    def rows(self, statement: str, database: str) -> list[dict[str, Any]]:
        """Run a SELECT and return one dict per row: "time" (µs), the series tags and the columns."""
        rows = []
        for series in self.query(statement, database):
            for values in series["values"]:
                row = dict(series.get("tags") or {})
                row.update(zip(series["columns"], values, strict=True))
                rows.append(row)
        return rows

    def write(self, database: str, body: str) -> httpx.Response:
        """Post raw line protocol (microsecond precision) and return the response."""
        return httpx.post(
            f"{self.url}/write",
            params={"db": database, "precision": "u"},
            content=body.encode(),
            timeout=10.0,
        )


class VictoriaMetricsServer(_Server):
    """A real single-node VictoriaMetrics with its data in `directory`, on a free loopback port.

    It stores `measurement_field` metric names, numbers only (booleans as 0/1) and millisecond times.
    """

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self._start_with_retries(self._make)

    def _make(self) -> ServerProcess:
        self.port = free_port()
        return ServerProcess(
            "victoria-metrics",
            [
                self.executable,
                f"-storageDataPath={self.directory / 'data'}",
                f"-httpListenAddr={LOOPBACK}:{self.port}",
                # The default one month would silently drop test points with older timestamps.
                "-retentionPeriod=100y",
                "-loggerLevel=ERROR",
            ],
            log_path=self.directory / "victoria-metrics.log",
            ready=_answers(f"http://{LOOPBACK}:{self.port}/health", 200),
        )

    @property
    def url(self) -> str:
        """Return the HTTP API's base URL (line protocol on /write and /api/v2/write)."""
        return f"http://{LOOPBACK}:{self.port}"

    def export(self, selector: str) -> list[dict[str, Any]]:
        """Flush recent writes and return the series matching `selector` from /api/v1/export."""
        httpx.get(f"{self.url}/internal/force_flush", timeout=10.0).raise_for_status()
        response = httpx.post(f"{self.url}/api/v1/export", data={"match[]": selector}, timeout=10.0)
        response.raise_for_status()
        return [json.loads(line) for line in response.content.splitlines() if line]

    def wait_for_samples(self, selector: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Export until at least `count` samples match (new series become searchable after ~1 s)."""
        deadline = time.monotonic() + timeout
        while True:
            series = self.export(selector)
            if sum(len(item["values"]) for item in series) >= count or time.monotonic() > deadline:
                return series
            time.sleep(0.1)


def _binary_or_skip(env_var: str, name: str, fallback: str, package: str) -> str:
    executable = find_binary(env_var, name, fallback)
    if executable is None:
        pytest.skip(
            f"{name} is not installed (apt-get install {package}); CI installs it, so these tests run there"
        )
    return executable


@pytest.fixture(scope="session")
def influxdb_v1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDBServer]:
    """Yield an InfluxDB 1.x shared by the session (`.url`, `.create_database()`, `.query()`); do not signal it."""
    executable = _binary_or_skip("TIDEGATE_INFLUXD", "influxd", "/usr/bin/influxd", "influxdb")
    with InfluxDBServer(executable, tmp_path_factory.mktemp("influxdb")) as server:
        yield server


@pytest.fixture(scope="session")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetricsServer]:
    """Yield a VictoriaMetrics shared by the session (`.url`, `.export()`); do not signal it."""
    executable = _binary_or_skip(
        "TIDEGATE_VICTORIA_METRICS", "victoria-metrics", "/usr/bin/victoria-metrics", "victoria-metrics"
    )
    with VictoriaMetricsServer(executable, tmp_path_factory.mktemp("victoria-metrics")) as server:
        yield server
