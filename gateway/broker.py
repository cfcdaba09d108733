"""Embedded MQTT brokers for `tidegate demo` and the integration tests.

`MosquittoBroker` runs a real `mosquitto` on a free loopback port with its own directory (config, log,
persistence), and can be stopped, paused, killed and restarted on the same port and data, which is
what failure tests need. `AmqttBroker` runs amqtt's pure-Python broker in this event loop, for
machines without mosquitto. `embedded_broker()` picks one and yields its `mqtt://127.0.0.1:PORT` URL.

Wire protocol the brokers carry (QoS 1 everywhere):

    devices/{device_id}/telemetry       device -> gateway (decoded by devices/payload.py)
        {"ts": <epoch seconds float>, "seq": <int, starting at 1 and +1 per message>,
         "<metric>": <number|bool|string>, ...}
    devices/{device_id}/commands        gateway -> device (devices/command.py `Command`)
        {"id", "name", "params", "ts"}
    devices/{device_id}/commands/ack    device -> gateway (devices/command.py `CommandAck`)
        {"id", "status": "ok"|"error", "detail"?}; unknown command names are acked "error" with a detail

What amqtt 0.12.1 cannot do, checked against paho-mqtt 2.2 clients:

- MQTT 5: only 3.1.1 is spoken. A v5 CONNECT gets a 3.1.1 "unacceptable protocol version" CONNACK
  and the connection is closed: a paho `protocol=MQTTv5` client fails to connect (aiomqtt raises
  MqttCodeError at once).
- Persistent sessions (clean_session=False) keep subscriptions and queue QoS 1 messages while the
  client is away only for sessions that are not "anonymous"; amqtt's own anonymous-auth plugin marks
  every session anonymous, so `AmqttBroker` installs `_OpenAuthPlugin` instead. Sessions live in
  memory only: they are gone when the broker stops, and there is no restart on the same data.
- A message is delivered at the subscription's QoS, not at min(publish QoS, subscription QoS): a
  QoS 0 publication reaches a QoS 1 subscriber as QoS 1.
- Nothing to signal: it runs in this process, so SIGSTOP/SIGKILL failure tests need mosquitto.

    BrokerError                  the embedded broker could not do what was asked
     └── BrokerStartError        it was not found, exited, or did not accept MQTT connections in time
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from amqtt.broker import Broker
from amqtt.errors import BrokerError as AmqttBrokerError
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

log = logging.getLogger(__name__)

Backend = Literal["auto", "mosquitto", "amqtt"]
LOOPBACK = "127.0.0.1"
MOSQUITTO_FALLBACK = "/usr/sbin/mosquitto"  # Debian installs the broker outside a normal user's PATH
START_ATTEMPTS = 3  # a free port picked by us can be taken by someone else before the broker binds it
PROBE_INTERVAL = 0.02
LOG_TAIL_LINES = 20

# A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 10 s, client id "tidegate-probe"): a CONNACK
# proves the broker is serving MQTT, not merely that something holds the port.
_PROBE_CLIENT_ID = b"tidegate-probe"
_PROBE_BODY = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(_PROBE_CLIENT_ID).to_bytes(2, "big") + _PROBE_CLIENT_ID
_PROBE_CONNECT = bytes((0x10, len(_PROBE_BODY))) + _PROBE_BODY
_CONNACK_ACCEPTED = b"\x20\x02\x00\x00"  # session-present 0: the probe asked for a clean session
_DISCONNECT = b"\xe0\x00"


class BrokerError(Exception):
    """Base of the embedded broker's errors."""


class BrokerStartError(BrokerError):
    """The broker did not come up; `log_tail` holds the end of its output when there is any."""

    def __init__(self, message: str, *, backend: str, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- broker log ---\n{log_tail}" if log_tail else ""))
        self.backend = backend
        self.log_tail = log_tail


def find_mosquitto() -> str | None:
    """Return the path of the `mosquitto` executable: PATH first, then /usr/sbin/mosquitto."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    if os.access(MOSQUITTO_FALLBACK, os.X_OK):
        return MOSQUITTO_FALLBACK
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _connack_ok(reply: bytes) -> bool:
    return reply == _CONNACK_ACCEPTED


def probe_mqtt(host: str, port: int, timeout: float = 1.0) -> bool:
    """Tell whether an MQTT 3.1.1 broker accepts a connection at host:port (blocking)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_PROBE_CONNECT)
            reply = b""
            while len(reply) < len(_CONNACK_ACCEPTED):
                chunk = sock.recv(len(_CONNACK_ACCEPTED) - len(reply))
                if not chunk:
                    return False
                reply += chunk
            if not _connack_ok(reply):
                return False
            sock.sendall(_DISCONNECT)
            return True
    except OSError:  # refused, reset, or timed out (socket.timeout is an OSError)
        return False


async def probe_mqtt_async(host: str, port: int) -> bool:
    """Tell whether an MQTT 3.1.1 broker accepts a connection at host:port (wrap in `asyncio.timeout`)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    try:
        writer.write(_PROBE_CONNECT)
        await writer.drain()
        if not _connack_ok(await reader.readexactly(len(_CONNACK_ACCEPTED))):
            return False
        writer.write(_DISCONNECT)
        await writer.drain()
        return True
    except (OSError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class MosquittoBroker:
    """A `mosquitto` process on a loopback port, with its config, log and persistence in one directory.

    Use it as a context manager (`with` in fixtures, `async with` in the event loop) or call
    `start()`/`stop()`. Between start and stop the process can be signalled (`pause`, `resume`,
    `kill`, `save`) and `restart()`ed on the same port and data directory.

    Args:
        executable: the mosquitto binary; `find_mosquitto()` when omitted.
        port: the port to listen on; a free one when omitted (kept across restarts).
        data_dir: where the config, log and persistence go; a temporary directory, removed on
            `close()`, when omitted. A given directory is kept.
        autosave_interval: seconds between persistence saves. mosquitto writes its database only on
            a clean exit, on SIGUSR1 (`save()`) and every this many seconds, so after `kill()` the
            restarted broker has the state of the last save. 1 s keeps that loss small in tests.
        max_queued_messages: QoS 1/2 messages held per client beyond those in flight (for a
            disconnected persistent session: all of them) before mosquitto drops new ones.
        extra_config: more `mosquitto.conf` lines, appended as given.
        start_timeout: seconds to wait for the broker to accept an MQTT connection.
        stop_timeout: seconds to wait after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        *,
        executable: str | None = None,
        host: str = LOOPBACK,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        autosave_interval: int = 1,
        max_queued_messages: int = 1_000_000,
        extra_config: tuple[str, ...] | list[str] = (),
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.executable = executable or find_mosquitto() or ""
        self.host = host
        self._auto_port = port is None
        self.port = port if port is not None else _free_port(host)
        self._owns_dir = data_dir is None
        if data_dir is None:
            data_dir = tempfile.mkdtemp(prefix="tidegate-mosquitto-")
        self.data_dir = Path(data_dir).absolute()  # mosquitto resolves relative paths against its own cwd
        if any(c.isspace() for c in str(self.data_dir)):
            # mosquitto.conf values end at whitespace; a path with a space would be cut short
            raise ValueError(f"mosquitto data_dir {str(self.data_dir)!r} must not contain whitespace")
        self.autosave_interval = autosave_interval
        self.max_queued_messages = max_queued_messages
        self.extra_config = tuple(extra_config)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MosquittoBroker({self.url}, {state}, data_dir={str(self.data_dir)!r})"

    @property
    def url(self) -> str:
        """The broker URL clients connect to, `mqtt://HOST:PORT`."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        """The generated mosquitto.conf."""
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """The broker's log file (`log_dest file`)."""
        return self.data_dir / "mosquitto.log"

    @property
    def output_path(self) -> Path:
        """Where the process's stdout and stderr go (errors from before the log file is open)."""
        return self.data_dir / "mosquitto.out"

    @property
    def persistence_dir(self) -> Path:
        """The directory holding mosquitto.db."""
        return self.data_dir / "persistence"

    @property
    def pid(self) -> int | None:
        """The process id while the process exists."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Tell whether the process exists (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Return the broker's log so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def config_text(self) -> str:
        """Render the mosquitto.conf this broker runs with."""
        lines = [
            "# Written by tidegate (gateway/broker.py) for an embedded broker; regenerated on every start.",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            f"autosave_interval {self.autosave_interval}",
            # 0 = no limit on QoS 1/2 messages in flight to a client (default 20). mosquitto 2.0 also
            # sends this value as MQTT 5 Receive Maximum, limiting what a v5 client may have in flight
            # towards it; with 0 it sends none (65535). A subscriber that needs flow control sets its
            # own Receive Maximum (MQTT 5); a 3.1.1 subscriber gets messages as fast as it reads them.
            "max_inflight_messages 0",
            f"max_queued_messages {self.max_queued_messages}",
            # Commands and acks are small request/response packets; Nagle would hold them back.
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto switches to user "mosquitto" (or "nobody"), which cannot write our
            # private temp dir: stay root instead (it prints a warning about that to stderr).
            lines.append("user root")
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    # -- process control (blocking; for fixtures and scripts) -------------------------------------

    def start(self) -> None:
        """Start mosquitto and block until it accepts MQTT connections."""
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                self._spawn()
                deadline = time.monotonic() + self.start_timeout
                while True:
                    if probe_mqtt(self.host, self.port, timeout=min(1.0, self.start_timeout)):
                        log.info("mosquitto %s ready (pid %s)", self.url, self.pid)
                        return
                    if not self.running:
                        break
                    if time.monotonic() > deadline:
                        raise self._start_error(
                            f"mosquitto did not accept connections within {self.start_timeout}s"
                        )
                    time.sleep(PROBE_INTERVAL)
                self._retry_or_raise(attempt)
        except BaseException:
            self._kill_now()  # interrupted or failed half-way: leave nothing running
            raise

    def stop(self) -> None:
        """Stop mosquitto: SIGTERM (it saves its database), then SIGKILL after `stop_timeout`."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._terminate()
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("mosquitto %s ignored SIGTERM for %ss; killing it", self.url, self.stop_timeout)
        finally:
            self._kill_now()

    def restart(self) -> None:
        """Stop mosquitto if it runs, then start it again on the same port and data directory."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL mosquitto and reap it: no save, clients see their connections reset."""
        self._kill_now()

    def close(self) -> None:
        """Stop mosquitto and remove the data directory when it is a temporary one."""
        try:
            self.stop()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

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

    # -- process control (non-blocking; for use inside the event loop) ----------------------------

    async def start_async(self) -> None:
        """Start mosquitto and wait until it accepts MQTT connections, without blocking the loop."""
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                self._spawn()
                deadline = time.monotonic() + self.start_timeout
                while True:
                    try:
                        async with asyncio.timeout(min(1.0, self.start_timeout)):
                            ready = await probe_mqtt_async(self.host, self.port)
                    except TimeoutError:
                        ready = False
                    if ready:
                        log.info("mosquitto %s ready (pid %s)", self.url, self.pid)
                        return
                    if not self.running:
                        break
                    if time.monotonic() > deadline:
                        raise self._start_error(
                            f"mosquitto did not accept connections within {self.start_timeout}s"
                        )
                    # No exit or readiness event exists for a Popen process: poll, briefly.
                    await asyncio.sleep(PROBE_INTERVAL)
                self._retry_or_raise(attempt)
        except BaseException:
            self._kill_now()  # cancelled or failed half-way: leave nothing running
            raise

    async def stop_async(self) -> None:
        """Stop mosquitto like `stop()`, waiting in a thread so the loop keeps running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._terminate()
        try:
            await asyncio.to_thread(proc.wait, self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("mosquitto %s ignored SIGTERM for %ss; killing it", self.url, self.stop_timeout)
        finally:
            self._kill_now()  # also when cancelled while waiting: never leave it running

    async def restart_async(self) -> None:
        """Restart mosquitto on the same port and data directory, without blocking the loop."""
        await self.stop_async()
        await self.start_async()

    async def close_async(self) -> None:
        """Stop mosquitto and remove the data directory when it is a temporary one."""
        try:
            await self.stop_async()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        try:
            await self.start_async()
        except BaseException:
            await self.close_async()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close_async()

    # -- signals ----------------------------------------------------------------------------------

    def send_signal(self, sig: signal.Signals | int) -> None:
        """Send a signal to the running process, or raise `BrokerError` when there is none."""
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError(f"mosquitto {self.url} is not running")
        self._proc.send_signal(sig)

    def pause(self) -> None:
        """Freeze mosquitto (SIGSTOP): connections stay open but nothing is read or answered."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused mosquitto (SIGCONT)."""
        self.send_signal(signal.SIGCONT)

    def save(self) -> None:
        """Ask mosquitto to write its persistence database now (SIGUSR1; it does so asynchronously)."""
        self.send_signal(signal.SIGUSR1)

    # -- internals --------------------------------------------------------------------------------

    def _spawn(self) -> None:
        if self.running:
            raise BrokerError(f"mosquitto {self.url} is already running (pid {self.pid})")
        if not self.executable:
            raise BrokerStartError(
                f"mosquitto is neither on PATH nor at {MOSQUITTO_FALLBACK} (apt-get install mosquitto)",
                backend="mosquitto",
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.persistence_dir.mkdir(exist_ok=True)
        self.conf_path.write_text(self.config_text(), encoding="utf-8")
        with self.output_path.open("ab") as output:
            try:
                # A session of its own: Ctrl-C in a terminal reaches tidegate, which stops the broker
                # after the gateway and devices, instead of the broker dying first under them.
                self._proc = subprocess.Popen(
                    [self.executable, "-c", str(self.conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BrokerStartError(f"cannot run {self.executable}: {exc}", backend="mosquitto") from exc
        log.debug("started %s -c %s (pid %s)", self.executable, self.conf_path, self._proc.pid)

    def _retry_or_raise(self, attempt: int) -> None:
        # The process exited during start-up. Only a port we picked ourselves may be retried.
        proc = self._proc
        code = proc.returncode if proc is not None else None
        text = _tail(self.log_path) + "\n" + _tail(self.output_path)
        if self._auto_port and "in use" in text and attempt < START_ATTEMPTS:
            log.info("port %s was taken before mosquitto bound it; trying another", self.port)
            self.port = _free_port(self.host)
            return
        raise self._start_error(f"mosquitto exited with code {code} during start-up")

    def _start_error(self, message: str) -> BrokerStartError:
        tail = "\n".join(part for part in (_tail(self.output_path), _tail(self.log_path)) if part)
        message = f"{message} ({self.url}, config {self.conf_path})"
        return BrokerStartError(message, backend="mosquitto", log_tail=tail)

    def _terminate(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        # A paused (SIGSTOPped) process only acts on SIGTERM once continued.
        self._proc.send_signal(signal.SIGCONT)

    def _kill_now(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()  # reap, so no zombie and no ResourceWarning from Popen.__del__


class _OpenAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """Let every client in as a named (not anonymous) session, so persistent sessions keep messages."""

    async def authenticate(self, *, session: Session) -> bool:
        """Accept the client; amqtt drops offline messages for anonymous sessions, so don't mark it."""
        return True


_AMQTT_PLUGINS: dict[str, dict[str, object]] = {f"{__name__}._OpenAuthPlugin": {}}


class AmqttBroker:
    """amqtt's pure-Python MQTT 3.1.1 broker on a loopback port, running in the current event loop.

    See the module docstring for what it does not support. Use as `async with AmqttBroker() as b`.
    """

    def __init__(self, *, host: str = LOOPBACK, port: int | None = None) -> None:
        self.host = host
        self._auto_port = port is None
        self.port = port if port is not None else _free_port(host)
        self._broker: Broker | None = None

    def __repr__(self) -> str:
        return f"AmqttBroker({self.url}, {'running' if self.running else 'stopped'})"

    @property
    def url(self) -> str:
        """The broker URL clients connect to, `mqtt://HOST:PORT`."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Tell whether the broker is serving."""
        return self._broker is not None

    async def start(self) -> None:
        """Start serving; raise `BrokerStartError` when the port cannot be bound."""
        if self._broker is not None:
            raise BrokerError(f"amqtt broker {self.url} is already running")
        for attempt in range(1, START_ATTEMPTS + 1):
            config = {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                # Explicit plugins replace amqtt's defaults: no $SYS publisher (its psutil use
                # raises a DeprecationWarning), no packet logging, and our open auth plugin.
                "plugins": dict(_AMQTT_PLUGINS),
            }
            broker = Broker(config)
            try:
                await broker.start()
            except AmqttBrokerError as exc:
                if self._auto_port and attempt < START_ATTEMPTS and "in use" in str(exc):
                    self.port = _free_port(self.host)
                    continue
                message = f"amqtt could not listen on {self.url}: {exc}"
                raise BrokerStartError(message, backend="amqtt") from exc
            self._broker = broker
            log.info("amqtt broker %s ready", self.url)
            return

    async def stop(self) -> None:
        """Disconnect every client and stop serving."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


@contextlib.asynccontextmanager
async def embedded_broker(*, backend: Backend = "auto") -> AsyncIterator[str]:
    """Run an MQTT broker on a free loopback port for the block and yield its `mqtt://` URL.

    Args:
        backend: "mosquitto" (raise `BrokerStartError` if it is not installed), "amqtt", or "auto":
            mosquitto when `find_mosquitto()` finds it, else amqtt.
    """
    if backend == "amqtt" or (backend == "auto" and find_mosquitto() is None):
        if backend == "auto":
            log.info("mosquitto not found; using the pure-Python amqtt broker (MQTT 3.1.1 only)")
        async with AmqttBroker() as amqtt_broker:
            yield amqtt_broker.url
        return
    async with MosquittoBroker() as mosquitto:
        yield mosquitto.url
