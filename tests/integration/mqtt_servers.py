"""Pytest fixtures that run a real mosquitto on a free loopback port (loaded from tests/conftest.py).

`mosquitto` is shared by the whole session: tests must not stop, pause or kill it. Tests that do
(broker failure, restart on the same port and data) take `mosquitto_fresh`, their own broker.
`mosquitto_with` starts brokers of the test's own with more config lines (TLS listeners, password
files, ACLs); `tls_files` makes a CA, an unrelated CA and certificates with `cryptography`.
All skip, saying why, only when mosquitto is not installed; CI installs it.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.broker import MosquittoBroker, find_mosquitto

MISSING = "mosquitto is not installed (apt-get install mosquitto); CI installs it, so these tests run there"


def _executable() -> str:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip(MISSING)
    return executable


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """Yield a mosquitto shared by the session (`.host`, `.port`, `.url`); do not stop or signal it."""
    broker = MosquittoBroker(executable=_executable(), data_dir=tmp_path_factory.mktemp("mosquitto"))
    with broker:
        yield broker


@pytest.fixture
def mosquitto_fresh(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """Yield a mosquitto of this test's own, free to pause, kill and restart on the same port and data."""
    broker = MosquittoBroker(executable=_executable(), data_dir=tmp_path / "mosquitto")
    with broker:
        yield broker


# -- brokers with extra listeners, and TLS certificates made for the test -----------------------------


class ConfiguredMosquitto(MosquittoBroker):
    """mosquitto with more listeners after its own anonymous one (which the start-up probe uses).

    With `per_listener_settings`, options such as `allow_anonymous`, `password_file`, `acl_file` and
    the TLS files apply to the listener they follow, so the probe listener stays open while a later
    one requires a password or a certificate.
    """

    def __init__(self, *, per_listener_settings: bool = False, **options: Any) -> None:
        self.per_listener_settings = per_listener_settings
        super().__init__(**options)

    def config_text(self) -> str:
        """Render mosquitto.conf; `per_listener_settings` must come before any listener."""
        text = super().config_text()
        return "per_listener_settings true\n" + text if self.per_listener_settings else text


StartMosquitto = Callable[..., ConfiguredMosquitto]


@pytest.fixture
def mosquitto_with(tmp_path: Path) -> Iterator[StartMosquitto]:
    """Yield `start(extra_config, *, per_listener_settings=False)`: a running broker of this test's own.

    `extra_config` lines are appended to the usual config (after the anonymous probe listener); each
    broker started is stopped at the end of the test.
    """
    executable = _executable()
    started: list[ConfiguredMosquitto] = []

    def start(extra_config: Sequence[str], *, per_listener_settings: bool = False) -> ConfiguredMosquitto:
        broker = ConfiguredMosquitto(
            executable=executable,
            data_dir=tmp_path / f"mosquitto-{len(started)}",
            extra_config=list(extra_config),
            per_listener_settings=per_listener_settings,
        )
        started.append(broker)
        broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.close()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a loopback port that was free a moment ago (for an extra listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its unencrypted PEM private key, as files."""

    cert: Path
    key: Path


class TestCA:
    """A certificate authority made for a test: issues server and client certificates as PEM files.

    EC P-256 keys: generating one takes well under a millisecond, an RSA key tens of milliseconds.
    Files are world-readable because mosquitto, started as root without `user root`, reads them as
    the `mosquitto` user.
    """

    __test__ = False  # not a test class, despite the name

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        self.directory, self.name = directory, name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = self._write(f"{name}.pem", self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        expired: bool = False,
        file_name: str | None = None,
    ) -> KeyPair:
        """Issue a certificate: for a server (`hosts` as subject alternative names) or a client.

        `expired` makes one whose validity ended yesterday.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_after = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=30)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if server:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        stem = file_name or common_name
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return KeyPair(
            cert=self._write(f"{stem}.crt", certificate.public_bytes(serialization.Encoding.PEM)),
            key=self._write(f"{stem}.key", key_pem),
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o644)
        return path


@dataclass(frozen=True)
class TlsFiles:
    """Everything the TLS tests need: two unrelated CAs and certificates issued by the first."""

    ca: TestCA
    other_ca: TestCA  # trusts nothing the broker presents
    server: KeyPair  # for localhost and 127.0.0.1
    expired_server: KeyPair  # the same names, validity ended yesterday
    client: KeyPair  # a client certificate (CN "tidegate") signed by `ca`


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Yield a CA, an unrelated CA, server certificates (valid and expired) and a client certificate."""
    root = tmp_path_factory.mktemp("tls")
    root.chmod(0o755)
    ca = TestCA(root / "ca", "tidegate-test-ca")
    return TlsFiles(
        ca=ca,
        other_ca=TestCA(root / "other-ca", "unrelated-test-ca"),
        server=ca.issue("broker", server=True),
        expired_server=ca.issue("broker", server=True, expired=True, file_name="broker-expired"),
        client=ca.issue("tidegate", file_name="client-tidegate"),
    )


def tls_listener(
    port: int, server: KeyPair, ca_file: Path, *, require_certificate: bool = False
) -> list[str]:
    """Return mosquitto.conf lines for a TLS listener on 127.0.0.1:`port`."""
    return [
        f"listener {port} 127.0.0.1",
        f"cafile {ca_file}",
        f"certfile {server.cert}",
        f"keyfile {server.key}",
        f"require_certificate {'true' if require_certificate else 'false'}",
    ]


# -- brokers with their own queue and persistence settings (reliability tests) -------------------------


StartTunedMosquitto = Callable[..., MosquittoBroker]


@pytest.fixture
def mosquitto_tuned(tmp_path: Path) -> Iterator[StartTunedMosquitto]:
    """Yield `start(**options)`: a running mosquitto of this test's own, free to signal and restart.

    `options` are `MosquittoBroker`'s: `max_queued_messages` (what an offline session may queue
    before mosquitto drops messages), `autosave_interval` (seconds between persistence saves; a
    large one with `save()` decides exactly what a SIGKILL loses), `extra_config` lines. Every
    broker started is stopped at the end of the test.
    """
    executable = _executable()
    started: list[MosquittoBroker] = []

    def start(**options: Any) -> MosquittoBroker:
        broker = MosquittoBroker(
            executable=executable, data_dir=tmp_path / f"mosquitto-tuned-{len(started)}", **options
        )
        started.append(broker)
        broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.close()
