"""TLS to the broker: the client context, and what a failed handshake means in an operator's words.

`tls_context` builds the client context (TLS 1.2 or later, the broker's certificate always verified,
optionally our client certificate). `describe_tls_failure` turns a failed connection into a line an
operator can act on ("TLS: certificate verify failed: certificate has expired", "TLS: broker
requires a client certificate"); the connection logs it, shows it in status and retries with the
same backoff as any other refusal.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from devices.errors import Problem, SourceFileError

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

    Used by paho in `tidegate command send --direct` (the gateway's own connection passes
    `server_hostname` to asyncio instead, which wraps through `wrap_bio`, not `wrap_socket`).
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
