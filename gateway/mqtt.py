"""paho-mqtt driven from the asyncio event loop, with manual acks and a reconnect loop.

Why paho and not aiomqtt here: aiomqtt PUBACKs a QoS 1 message before our code sees it and creates a
Task per message; paho 2.x offers manual acks and, driven by `add_reader`/`add_writer` on our own loop
(as Home Assistant's MQTT integration does), costs no thread hop and no per-message Task.

Acks are only sent on the connection that received the message: after a reconnect the broker
redelivers whatever we had not acked, so a stale ack is dropped rather than risk acking a reused
packet id.

TLS: `tls_context` builds the client context (TLS 1.2 or later, the broker's certificate always
verified, optionally our client certificate) and paho uses it through `tls_set_context`. A failed
connection is described in `ConnectionStats.last_error` and the log in words an operator can act on
("TLS: certificate verify failed: certificate has expired", "TLS: broker requires a client
certificate"), and retried with the same backoff as any other refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from devices.errors import Problem, SourceFileError

log = logging.getLogger(__name__)

MessageHandler = Callable[[paho.MQTTMessage], None]
MISC_INTERVAL = 0.5  # keepalive pings and the dead-link check; a fraction of the shortest keepalive (5s)
MAX_OUTGOING_QUEUE = 10_000  # QoS 1 publishes held while disconnected; beyond this publish() fails loudly


class MqttPublishError(Exception):
    """A publish could not be queued (disconnected with a full queue, or the topic is invalid)."""


# -- TLS ------------------------------------------------------------------------------------------------

# OpenSSL verify codes (X509_V_ERR_*) that mean "not issued by a CA we trust"
_UNTRUSTED_ISSUER = {2, 18, 19, 20, 21}
_CERT_EXPIRED, _CERT_NOT_YET_VALID = 10, 9
_NAME_MISMATCH = {62, 64}  # host name, IP address
# alerts a broker sends when it does not accept the client certificate we presented
_CLIENT_CERT_REJECTED = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_DECRYPT_ERROR",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
_SSL_ERROR_TEXT = re.compile(r"\[SSL: (?P<reason>[A-Z0-9_]+)\] (?P<text>[^(]*)")


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS to the broker.

    Attributes:
        ca_file: PEM CA certificate(s) the broker's certificate must chain to; None = the system's CAs.
        cert_file, key_file: our client certificate and unencrypted key (mutual TLS); `key_file`
            None means `cert_file` holds both.
        server_name: the name the broker's certificate must be valid for; None = the host dialled.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None


class _TlsContext(ssl.SSLContext):
    """A client context that verifies the broker against `server_name` and hands paho a finished handshake.

    paho wraps its socket with the host it dials as `server_hostname` and no way to name another,
    and shakes hands after `wrap_socket` returns; a handshake that fails there leaves the socket
    unclosed. Shaking hands inside `wrap_socket` lets `ssl` close it on failure (paho's own
    `do_handshake` afterwards is a no-op on a finished handshake).
    """

    server_name: str | None = None

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        """Wrap `sock` for the broker named `server_name` (else `server_hostname`) and shake hands."""
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=True,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name or server_hostname,
            session=session,
        )


class _EncryptedKeyError(Exception):
    pass


def _refuse_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise _EncryptedKeyError


def _file_problem(path: Path, setting: str, message: str) -> SourceFileError:
    return SourceFileError([Problem(str(path), None, None, f"mqtt.tls.{setting}", message)])


def _read_pem(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _file_problem(path, setting, f"cannot read: {exc.strerror}") from None


def tls_context(options: TlsOptions) -> ssl.SSLContext:
    """Build the client TLS context: TLS 1.2 or later, CERT_REQUIRED, host name checked.

    Raises:
        SourceFileError: a file cannot be read or holds no usable PEM certificate or key; the
            problem names the file and its setting, never the file's contents.
    """
    context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.server_name = options.server_name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if options.ca_file is not None:
        _read_pem(options.ca_file, "ca_file")
        try:
            context.load_verify_locations(cafile=str(options.ca_file))
        except ssl.SSLError:
            raise _file_problem(options.ca_file, "ca_file", "no PEM CA certificate in it") from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if options.cert_file is not None:
        cert = _read_pem(options.cert_file, "cert_file")
        if b"-----BEGIN CERTIFICATE-----" not in cert:
            raise _file_problem(options.cert_file, "cert_file", "no PEM certificate in it")
        key_file, key_setting = (
            (options.key_file, "key_file")
            if options.key_file is not None
            else (options.cert_file, "cert_file")
        )
        _read_pem(key_file, key_setting)
        try:
            context.load_cert_chain(str(options.cert_file), str(key_file), password=_refuse_passphrase)
        except _EncryptedKeyError:
            message = (
                "the private key is encrypted; tidegate needs it unencrypted "
                "(openssl pkey -in KEY -out PLAIN), in a file only tidegate's user can read"
            )
            raise _file_problem(key_file, key_setting, message) from None
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                message = f"this private key does not belong to the certificate in {options.cert_file}"
            else:
                message = "no PEM private key in it"
            raise _file_problem(key_file, key_setting, message) from None
    return context


def describe_tls_failure(error: BaseException | str, tls: TlsOptions, port: int) -> str | None:
    """Say what went wrong with TLS in words an operator can act on, or None if it was not TLS.

    Args:
        error: the exception from connecting (handshake failures, certificate checks), or the text
            of a read error once the handshake is done (TLS 1.3 brokers refuse a client certificate
            then, with an alert).
        tls: the options the connection used (named in the advice).
        port: the port dialled.
    """
    ca = f"ca_file={tls.ca_file}" if tls.ca_file is not None else "the system's CAs"
    if isinstance(error, ssl.SSLCertVerificationError):
        code, text = error.verify_code, str(error.verify_message).rstrip(".")
        if code in _NAME_MISMATCH:
            return f"TLS: {text[:1].lower()}{text[1:]}"
        if code in _UNTRUSTED_ISSUER:
            return f"TLS: certificate verify failed: {text} (the broker's certificate is not issued by {ca})"
        if code in (_CERT_EXPIRED, _CERT_NOT_YET_VALID):
            return f"TLS: certificate verify failed: {text} (the broker's certificate)"
        return f"TLS: certificate verify failed: {text} ({ca})"
    if isinstance(error, ConnectionResetError | ConnectionAbortedError | BrokenPipeError | ssl.SSLEOFError):
        return f"TLS: the broker closed the connection during the handshake ({error}): is port {port} a TLS listener?"
    match = _SSL_ERROR_TEXT.search(str(error))
    if match is None:
        return None
    reason, text = match["reason"], match["text"].strip()
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED" or (
        reason == "SSLV3_ALERT_HANDSHAKE_FAILURE" and tls.cert_file is None
    ):
        return f"TLS: broker requires a client certificate ({text}): set mqtt.tls.cert_file and key_file"
    if reason in _CLIENT_CERT_REJECTED and tls.cert_file is not None:
        return f"TLS: the broker rejected our client certificate (cert_file={tls.cert_file}): {text}"
    if reason in _NOT_TLS:
        return f"TLS: the broker did not answer in TLS ({text}): is port {port} a TLS listener?"
    return f"TLS: {text}"


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic filter, its QoS, and the handler for messages that match it."""

    topic_filter: str
    qos: int
    handler: MessageHandler


@dataclass(slots=True)
class ConnectionStats:
    """What happened to the connection so far."""

    connects: int = 0
    disconnects: int = 0
    sessions_lost: int = 0  # connected with session_present = 0 after having had a session
    last_error: str = ""


class MqttConnection:
    """One MQTT client connection with a persistent session, driven by the running event loop.

    Args:
        host, port: the broker.
        client_id: fixed, so the broker can keep our session between connections.
        protocol: "5" or "3.1.1".
        session_expiry: MQTT 5 session expiry in seconds (3.1.1 uses clean_session=False instead).
        receive_maximum: MQTT 5 Receive Maximum (unacked messages in flight towards us).
        manual_ack: ack QoS 1 messages only when `ack()` is called.
        on_session_lost: called with (since, until) epoch seconds, the window in which messages may
            have been lost, when the broker did not resume our session.
        tls: connect over TLS with these options (None: plain TCP).

    Raises:
        SourceFileError: a TLS file cannot be used (see `tls_context`).

    With this module's logger at DEBUG when the connection is made, paho's own protocol trace goes
    to the `gateway.mqtt.paho` logger (it shows that a password is sent, never the password).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        subscriptions: Sequence[Subscription],
        protocol: str = "5",
        username: str | None = None,
        password: SecretStr | None = None,
        keepalive: int = 30,
        session_expiry: int = 86_400,
        receive_maximum: int = 65_535,
        reconnect_min_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        manual_ack: bool = True,
        on_session_lost: Callable[[float, float], None] | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self._subscriptions = list(subscriptions)
        self._mqtt5 = protocol == "5"
        self._keepalive = keepalive
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        self._min_delay, self._max_delay = reconnect_min_delay, reconnect_max_delay
        self.stats = ConnectionStats()
        self.generation = 0  # bumped on every successful CONNACK; acks carry the generation they belong to
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._ended: asyncio.Event | None = None
        self._sock_fd: int | None = None
        self._paused = False
        self._last_inbound = 0.0
        self._link_up = False  # CONNACK received and not yet disconnected (acks may flow)
        self._subscribe_mid: int | None = None
        self._unconfirmed: deque[paho.MQTTMessageInfo] = deque()
        self._had_session = False
        self._disconnected_at: float | None = None
        self._on_session_lost = on_session_lost
        self._closing = False
        self._tls = tls
        # per connection attempt: whether a CONNACK came, and the last error paho logged before it
        self._connack_seen = False
        self._early_error = ""
        self._reader: Callable[[], None] = self._read if tls is None else self._read_tls

        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self._mqtt5 else paho.MQTTv311,
            clean_session=None if self._mqtt5 else False,
            manual_ack=manual_ack,
        )
        if username is not None:
            client.username_pw_set(username, password.get_secret_value() if password else None)
        if tls is not None:
            client.tls_set_context(tls_context(tls))
        if log.isEnabledFor(logging.DEBUG):
            # only then: paho formats a line per packet for its logger, a cost on the hot path
            client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.max_inflight_messages_set(100)  # our outgoing QoS 1 window (commands)
        client.max_queued_messages_set(MAX_OUTGOING_QUEUE)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        for sub in self._subscriptions:
            client.message_callback_add(sub.topic_filter, self._wrap(sub.handler))
        client.on_message = self._on_unexpected_message
        self._client = client

    # -- public API -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect with backoff and jitter, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ended = asyncio.Event()
        misc = asyncio.create_task(self._misc_loop(), name="mqtt-misc")
        try:
            delay = self._min_delay
            first = True
            while not self._closing:
                self._ended.clear()
                generation_before = self.generation
                try:
                    await self._loop.run_in_executor(None, self._connect_blocking, first)
                    first = False
                except (OSError, ValueError) as exc:
                    tls_problem = self._describe_tls_failure(exc)
                    self.stats.last_error = f"cannot connect to {self.host}:{self.port}: {tls_problem or exc}"
                    # a TLS refusal is a configuration problem that retrying will not fix by itself
                    level = logging.ERROR if tls_problem else logging.WARNING
                    log.log(level, "%s; retrying in up to %.1fs", self.stats.last_error, delay)
                else:
                    await self._ended.wait()  # set on disconnect, refused CONNACK or keepalive timeout
                if self._closing:
                    break
                if self.generation != generation_before:
                    delay = self._min_delay  # we were connected: a fresh outage starts a fresh backoff
                # jitter spreads the reconnects of many clients after a broker restart
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._max_delay)
        finally:
            misc.cancel()
            await asyncio.gather(misc, return_exceptions=True)

    @property
    def unconfirmed_publishes(self) -> int:
        """Our QoS 1 publishes (commands, dead letters) the broker has not acknowledged yet."""
        self._unconfirmed = deque(info for info in self._unconfirmed if not info.is_published())
        return len(self._unconfirmed)

    async def disconnect(self, *, flush_timeout: float = 5.0) -> None:
        """Disconnect cleanly; the broker keeps our session (and queues for us) until it expires.

        Our own QoS 1 publishes live only in paho's memory until the broker acknowledges them, so
        wait (bounded) for those first rather than lose commands at shutdown.
        """
        self._closing = True
        if self._link_up:
            try:
                async with asyncio.timeout(flush_timeout):
                    # paho signals completion per message id only; a short poll is simpler than tracking them
                    while self.unconfirmed_publishes and self._link_up:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            except TimeoutError:
                log.warning(
                    "%d publish(es) not acknowledged by the broker within %ss of shutdown: they are lost",
                    self.unconfirmed_publishes,
                    flush_timeout,
                )
            self._client.disconnect()
            if self._ended is not None:
                try:
                    await asyncio.wait_for(self._ended.wait(), timeout=5)
                except TimeoutError:
                    log.warning("broker did not close the connection within 5s")
        self._close_socket()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """Queue a publish; paho sends it now or after the next reconnect (QoS 1).

        `properties` are MQTT 5 PUBLISH properties (ignored on an MQTT 3.1.1 connection). Note that
        paho sends a queued message with its properties as given, so a Message Expiry Interval is
        not reduced by the time the message waited in paho's queue.

        Raises:
            MqttPublishError: the outgoing queue is full or the topic is invalid.
        """
        try:
            info = self._client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties if self._mqtt5 else None
            )
        except ValueError as exc:
            raise MqttPublishError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise MqttPublishError(f"outgoing queue full ({MAX_OUTGOING_QUEUE}) while disconnected")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttPublishError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if qos:
            self._unconfirmed.append(info)  # pruned in the misc loop; paho bounds what is outstanding

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """PUBACK a message if it arrived on the current connection (else the broker redelivers it)."""
        if qos and generation == self.generation and self._link_up:
            self._client.ack(mid, qos)

    def pause_reading(self) -> None:
        """Stop reading the socket so the broker holds further messages (backpressure)."""
        if not self._paused and self._sock_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._sock_fd)
        self._paused = True

    def resume_reading(self) -> None:
        """Read the socket again after `pause_reading`."""
        if self._paused and self._sock_fd is not None and self._loop is not None:
            self._loop.add_reader(self._sock_fd, self._reader)
            if self._tls is not None:  # decrypted bytes held by OpenSSL do not make the socket readable
                self._loop.call_soon(self._read_pending)
        self._paused = False

    @property
    def paused(self) -> bool:
        """True while reading is paused for backpressure."""
        return self._paused

    def assume_session(self, since: float) -> None:
        """Take it that the broker holds our session, as an earlier run recorded (gateway/runstate.py).

        A first CONNACK with session_present = 0 then counts as a lost session, its possible-loss
        window starting at `since` (epoch seconds), the last moment that run knew it had it.
        """
        self._had_session = True
        self._disconnected_at = since

    # -- paho plumbing ----------------------------------------------------------------------------

    def _connect_blocking(self, first: bool) -> None:
        # Runs in a worker thread: paho's connect resolves and opens the TCP socket synchronously.
        self._connack_seen = False
        self._early_error = ""
        # Until the CONNACK, keep what paho logs as errors: after a TLS 1.3 handshake the broker
        # may still refuse us (no client certificate), and paho only logs why before it closes.
        # Not kept while connected: paho formats every per-packet line for an `on_log` callback.
        self._client.on_log = self._on_paho_log
        if first:
            properties = None
            if self._mqtt5:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self._session_expiry
                properties.ReceiveMaximum = self._receive_maximum
            self._client.connect(
                self.host,
                self.port,
                keepalive=self._keepalive,
                clean_start=False if self._mqtt5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )
        else:
            self._client.reconnect()

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._call_in_loop(self._register_socket, sock.fileno())

    def _read(self) -> None:
        assert self._loop is not None
        self._last_inbound = self._loop.time()
        self._client.loop_read()

    def _read_tls(self) -> None:
        # OpenSSL decrypts a whole TLS record at a time: the part of it paho has not read yet stays
        # in OpenSSL's buffer, and the socket will not signal readable for it. Read on while any is.
        self._read()
        self._read_pending()

    def _read_pending(self) -> None:
        sock = self._client.socket()
        while not self._paused and isinstance(sock, ssl.SSLSocket) and sock.pending():
            self._read()
            sock = self._client.socket()

    def _register_socket(self, fd: int) -> None:
        assert self._loop is not None
        self._sock_fd = fd
        self._last_inbound = self._loop.time()
        if not self._paused:
            self._loop.add_reader(fd, self._reader)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this just before closing the socket, on the loop thread (reads) or in our
        # connect thread (reconnect after a failed attempt, before any reader was added).
        self._call_in_loop(self._close_socket)

    def _close_socket(self) -> None:
        if self._sock_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._sock_fd)
            self._loop.remove_writer(self._sock_fd)
        self._sock_fd = None

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._add_writer, sock.fileno())

    def _add_writer(self, fd: int) -> None:
        assert self._loop is not None
        if fd == self._sock_fd:
            self._loop.add_writer(fd, self._client.loop_write)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        self._call_in_loop(self._remove_writer, fd)

    def _remove_writer(self, fd: int) -> None:
        assert self._loop is not None
        if fd >= 0:
            self._loop.remove_writer(fd)

    def _on_paho_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._early_error = text

    def _describe_tls_failure(self, error: BaseException | str) -> str | None:
        return describe_tls_failure(error, self._tls, self.port) if self._tls is not None else None

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self._connack_seen = True
        client.on_log = None
        if reason.is_failure:
            self.stats.last_error = f"broker refused the connection: {reason}"
            log.error("%s (client id %s)", self.stats.last_error, self.client_id)
            return
        self.generation += 1
        self.stats.connects += 1
        self.stats.last_error = ""
        session_present = bool(flags.session_present)
        if self._had_session and not session_present:
            # The broker forgot us (expired session, broker lost its state): messages queued for us
            # while we were away are gone. Record it; the gap shows up in per-device seq checks.
            self.stats.sessions_lost += 1
            since, until = self._disconnected_at or time.time(), time.time()
            log.warning(
                "MQTT session was not resumed (session_present=0): messages sent to us between %s and %s "
                "may have been lost",
                time.strftime("%H:%M:%S", time.localtime(since)),
                time.strftime("%H:%M:%S", time.localtime(until)),
            )
            if self._on_session_lost is not None:
                self._on_session_lost(since, until)
        self._had_session = True
        log.info("connected to %s:%s (session present: %s)", self.host, self.port, session_present)
        # Subscribe every time: harmless when the session kept them, required when it did not.
        self._link_up = True
        result, self._subscribe_mid = client.subscribe([(s.topic_filter, s.qos) for s in self._subscriptions])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("subscribe failed: %s", paho.error_string(result))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        if mid != self._subscribe_mid:
            return
        for sub, reason in zip(self._subscriptions, reasons, strict=False):
            if reason.is_failure:
                self.stats.last_error = f"broker refused the subscription to {sub.topic_filter!r}: {reason}"
                log.error("%s (client id %s)", self.stats.last_error, self.client_id)
        # `connected` means subscribed: messages published from now on reach us even without a session
        self.connected.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        was_connected = self._link_up
        self._link_up = False
        self.connected.clear()
        if was_connected:
            self._disconnected_at = time.time()
            self.stats.disconnects += 1
            if not self._closing:
                self.stats.last_error = f"connection lost: {reason}"
                log.warning("disconnected from %s:%s: %s", self.host, self.port, reason)
        elif not self._connack_seen and not self._closing:
            # closed before any CONNACK: a TLS refusal after the handshake, or not an MQTT listener
            early = self._early_error
            problem = self._describe_tls_failure(early) if early else None
            if problem is None:
                problem = "the connection closed before the broker answered CONNECT" + (
                    f" ({early})" if early else ""
                )
                if self._tls is None:
                    problem += f"; if port {self.port} is a TLS listener, use mqtts://"
            self.stats.last_error = f"cannot connect to {self.host}:{self.port}: {problem}"
            # TLS refusals are configuration problems; a bare close may be a broker going down
            level = logging.ERROR if problem.startswith("TLS:") else logging.WARNING
            log.log(level, "%s (client id %s)", self.stats.last_error, self.client_id)
        if self._ended is not None:
            self._ended.set()

    async def _misc_loop(self) -> None:
        assert self._loop is not None
        while True:
            await asyncio.sleep(MISC_INTERVAL)
            self._client.loop_misc()
            if len(self._unconfirmed) > 100:
                self._unconfirmed = deque(info for info in self._unconfirmed if not info.is_published())
            # paho pings after `keepalive` of silence and gives up only one more `keepalive` later, so
            # a silent partition would take ~2x keepalive to notice. A healthy link brings a PINGRESP
            # within keepalive + MISC_INTERVAL; past 1.5x keepalive of silence the link is dead.
            silent = self._loop.time() - self._last_inbound
            if self._link_up and not self._paused and silent > 1.5 * self._keepalive:
                log.warning("nothing from the broker for %.1fs: dropping the connection", silent)
                if self._sock_fd is not None:
                    # paho then reads end-of-stream and runs its usual disconnect path
                    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self._sock_fd)) as sock:
                        sock.shutdown(socket.SHUT_RDWR)

    def _wrap(self, handler: MessageHandler) -> Callable[[paho.Client, Any, paho.MQTTMessage], None]:
        def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
            handler(message)

        return on_message

    def _on_unexpected_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # A message matching none of our filters (e.g. left over from an old session): ack and drop.
        log.debug("ignoring message on unexpected topic %r", message.topic)
        self.ack(message.mid, message.qos, self.generation)
