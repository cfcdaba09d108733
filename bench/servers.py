"""The servers a benchmark run needs: Mosquitto tuned for backlogs, a throwaway influxd, /proc readers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from gateway.broker import MosquittoBroker

LOOPBACK = "127.0.0.1"
INFLUXD_FALLBACK = "/usr/bin/influxd"
_TICKS = os.sysconf("SC_CLK_TCK")


def bench_broker(max_queued_messages: int) -> MosquittoBroker:
    """Return (not started) a mosquitto for the benchmark on a free loopback port, in a temp dir.

    `MosquittoBroker` already sets `max_inflight_messages 0`. On top of it: no persistence (an
    autosave of a 200k-message backlog would be broker work no subscriber asked for), QoS 0
    messages queued for offline sessions too (so the QoS 0 subscribers drain the same backlog), and a
    queue limit above the burst so nothing is dropped by the broker.
    """
    return MosquittoBroker(
        autosave_interval=3600,
        max_queued_messages=max_queued_messages,
        extra_config=("persistence false", "queue_qos0_messages true", "max_queued_bytes 0"),
    )


def find_influxd() -> str | None:
    """Return the influxd (1.x) binary: $TIDEGATE_INFLUXD, PATH, or Debian's location."""
    candidate = os.environ.get("TIDEGATE_INFLUXD") or shutil.which("influxd") or INFLUXD_FALLBACK
    return candidate if os.access(candidate, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class InfluxServer:
    """A throwaway influxd 1.x with its data in a temporary directory and HTTP on a free port."""

    def __init__(self, executable: str, start_timeout: float = 30.0) -> None:
        self.executable = executable
        self.start_timeout = start_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="tidegate-bench-influx-"))
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The HTTP API's base URL."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start influxd and wait until /ping answers; retry on another port if it loses a port race."""
        for _ in range(3):
            self.port = _free_port()
            config = self.directory / "influxdb.conf"
            d = self.directory
            config.write_text(
                "reporting-disabled = true\n"
                f'bind-address = "{LOOPBACK}:{_free_port()}"\n'
                f'[meta]\n  dir = "{d / "meta"}"\n  logging-enabled = false\n'
                f'[data]\n  dir = "{d / "data"}"\n  wal-dir = "{d / "wal"}"\n  query-log-enabled = false\n'
                "[monitor]\n  store-enabled = false\n"
                "[continuous_queries]\n  enabled = false\n"
                f'[http]\n  bind-address = "{LOOPBACK}:{self.port}"\n  log-enabled = false\n'
            )
            with (d / "influxd.log").open("ab") as log:
                self._process = subprocess.Popen(
                    [self.executable, "-config", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    if httpx.get(f"{self.url}/ping", timeout=1.0).status_code == 204:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            self.stop()
        tail = (self.directory / "influxd.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"influxd did not start:\n{tail}")

    def count(self, database: str, measurement: str = "telemetry", field: str = "seq") -> int:
        """Return how many points of `measurement` have `field` in `database`."""
        response = httpx.post(
            f"{self.url}/query",
            data={"db": database, "q": f'SELECT count("{field}") FROM "{measurement}"'},
            timeout=60.0,
        )
        response.raise_for_status()
        series = response.json()["results"][0].get("series") or []
        return int(series[0]["values"][0][1]) if series else 0

    def stop(self) -> None:
        """Stop influxd (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop influxd and remove its data."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def process_cpu(pid: int | None) -> float:
    """Return a process's user+system CPU seconds so far (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    # After the command name: state is field 3 of stat(5), so utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_kb(pid: int | str = "self") -> int:
    """Return a process's resident set size in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0
