"""A small asyncio TCP proxy for fault tests: pass, blackhole, reset, delay and half-close, switched at runtime.

`FaultProxy` listens on a free loopback port and forwards every accepted connection to one upstream
address. Run it in the test's own event loop (`async with FaultProxy(host, port) as proxy`), or in a
thread with a loop of its own (`with ThreadedFaultProxy(host, port) as proxy`) when the code under
test runs somewhere else. Modes, set with `set_mode` and applied to the open connections at once:

    PASS        forward both ways.
    BLACKHOLE   forward nothing and close nothing: bytes from either side are read and discarded,
                new connections are accepted and never connected upstream. This is a partition that
                no FIN or RST reveals; only a timeout (MQTT keepalive) can notice it. A connection that
                was blackholed stays so for its life (its stream has lost bytes): after PASS is set
                again, only new connections pass, as through a firewall that lost its state.
    RESET       RST both sides of every open connection (SO_LINGER 0), and of every new one as soon as it
                is accepted. `reset_connections()` does the same once without changing the mode.
    DELAY       forward both ways, each chunk `delay` seconds after it was read, in order.
    HALF_CLOSE  send FIN towards the client and drop what upstream sends; the client's bytes still go
                upstream. The client sees a clean end of stream while its own writes succeed.

Counters: `accepted` (connections accepted so far) and `open_connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CHUNK = 65_536
QUEUED_CHUNKS = 1_024  # per direction while delaying; a full queue stops reading (backpressure)
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN

T = TypeVar("T")


class Mode(enum.Enum):
    """What the proxy does with the bytes of its connections."""

    PASS = "pass"
    BLACKHOLE = "blackhole"
    RESET = "reset"
    DELAY = "delay"
    HALF_CLOSE = "half-close"


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class _Connection:
    """One client connection and, once opened, its upstream connection."""

    def __init__(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.client_reader, self.client_writer = client_reader, client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.half_closed = False

    def reset(self) -> None:
        _reset(self.client_writer)
        if self.upstream_writer is not None:
            _reset(self.upstream_writer)

    def half_close(self) -> None:
        if not self.half_closed:
            self.half_closed = True
            if self.client_writer.can_write_eof() and not self.client_writer.is_closing():
                with contextlib.suppress(OSError):
                    self.client_writer.write_eof()

    def abort(self) -> None:
        self.client_writer.transport.abort()
        if self.upstream_writer is not None:
            self.upstream_writer.transport.abort()


class FaultProxy:
    """Forward TCP connections from a loopback port to `upstream_host:upstream_port`, with faults on demand.

    Args:
        upstream_host, upstream_port: where connections go.
        host: the address to listen on; `port` (after `start`) is the port, picked free.
        mode, delay: the initial mode and, for DELAY, seconds each chunk is held.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = LOOPBACK,
        mode: Mode = Mode.PASS,
        delay: float = 0.0,
    ) -> None:
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.host = host
        self.port = 0
        self.mode = mode
        self.delay = delay
        self.accepted = 0
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.host}:{self.port} -> {self.upstream_host}:{self.upstream_port}, "
            f"{self.mode.value}, {len(self._connections)} open)"
        )

    @property
    def open_connections(self) -> int:
        """Return how many client connections are open."""
        return len(self._connections)

    async def start(self) -> None:
        """Listen on a free port (`self.port`)."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening and abort every connection."""
        if self._server is not None:
            self._server.close()
        self._closing = True
        for connection in list(self._connections):
            connection.abort()
        if self._handlers:
            # Aborted connections end their handlers on the next loop turns; cancel only stragglers
            # (a handler still connecting upstream, say).
            _, stragglers = await asyncio.wait(set(self._handlers), timeout=1.0)
            for task in stragglers:
                task.cancel()
            await asyncio.gather(*stragglers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def set_mode(self, mode: Mode, *, delay: float | None = None) -> None:
        """Switch mode; open connections are blackholed, reset or half-closed at once."""
        self.mode = mode
        if delay is not None:
            self.delay = delay
        for connection in list(self._connections):
            self._apply(connection)
        log.info("fault proxy %s:%s now %s", self.host, self.port, mode.value)

    def reset_connections(self) -> int:
        """RST every open connection (both sides) and keep the mode; return how many there were."""
        connections = list(self._connections)
        for connection in connections:
            connection.reset()
        return len(connections)

    def _apply(self, connection: _Connection) -> None:
        if self.mode is Mode.BLACKHOLE:
            connection.blackholed = True
        elif self.mode is Mode.RESET:
            connection.reset()
        elif self.mode is Mode.HALF_CLOSE:
            connection.half_close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        connection = _Connection(reader, writer)
        self._connections.add(connection)
        try:
            await self._serve(connection)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by `aclose`: end quietly, or asyncio's start_server callback logs the
            # cancellation as an error when it asks the task for its exception.
            if not self._closing:
                raise
        finally:
            self._connections.discard(connection)
            connection.abort()
            self._handlers.discard(task)

    async def _serve(self, connection: _Connection) -> None:
        self._apply(connection)
        if connection.blackholed:
            # Never connect upstream: swallow what the client sends until it gives up.
            while await connection.client_reader.read(CHUNK):
                pass
            return
        if self.mode is Mode.RESET:
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self.upstream_host, self.upstream_port
        )
        connection.upstream_writer = upstream_writer
        self._apply(connection)  # the mode may have changed while connecting
        async with asyncio.TaskGroup() as group:
            group.create_task(
                self._pump(connection, connection.client_reader, upstream_writer, towards_client=False)
            )
            group.create_task(
                self._pump(connection, upstream_reader, connection.client_writer, towards_client=True)
            )

    async def _pump(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        towards_client: bool,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._send(connection, queue, writer, towards_client=towards_client))
            try:
                while data := await reader.read(CHUNK):
                    if connection.blackholed or (towards_client and connection.half_closed):
                        continue
                    await queue.put((loop.time() + (self.delay if self.mode is Mode.DELAY else 0.0), data))
            except OSError:
                pass
            await queue.put((0.0, b""))  # end of stream: the sender forwards it (or not) in order

    async def _send(
        self,
        connection: _Connection,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        *,
        towards_client: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if connection.blackholed or (towards_client and connection.half_closed):
                if not data:
                    return  # a partition shows no end of stream either
                continue
            try:
                if not data:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
            except OSError:
                return


class ThreadedFaultProxy:
    """A `FaultProxy` running in a thread with its own event loop; its methods are thread-safe.

    Use as `with ThreadedFaultProxy(host, port) as proxy:`; `proxy.port` is where clients connect.
    """

    def __init__(self, upstream_host: str, upstream_port: int, **options: Any) -> None:
        self._proxy = FaultProxy(upstream_host, upstream_port, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    @property
    def host(self) -> str:
        """The address clients connect to."""
        return self._proxy.host

    @property
    def port(self) -> int:
        """The port clients connect to."""
        return self._proxy.port

    @property
    def mode(self) -> Mode:
        """The current mode."""
        return self._proxy.mode

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        return self._proxy.accepted

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return self._call(self._counted())

    def set_mode(self, mode: Mode, *, delay: float | None = None) -> None:
        """Switch mode (see `FaultProxy.set_mode`); returns once applied."""
        self._call(self._in_loop(lambda: self._proxy.set_mode(mode, delay=delay)))

    def reset_connections(self) -> int:
        """RST every open connection; returns once done, with how many there were."""
        return self._call(self._in_loop(self._proxy.reset_connections))

    def start(self) -> None:
        """Start the thread and listen."""
        self._thread.start()
        self._call(self._proxy.start())

    def close(self) -> None:
        """Abort every connection, stop the loop and join the thread."""
        if self._thread.is_alive():
            self._call(self._proxy.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def _counted(self) -> int:
        return self._proxy.open_connections

    @staticmethod
    async def _in_loop(fn: Callable[[], T]) -> T:
        return fn()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)
