"""Gateway configuration: one YAML file, validated by pydantic, overridable from the environment.

Environment variables override file values: `TIDEGATE_<SECTION>__<KEY>` (double underscore between
levels), e.g. `TIDEGATE_MQTT__URL=mqtt://broker:1883` or `TIDEGATE_STORE__PASSWORD=...`. Secrets are
`SecretStr`: they print as `**********` and never reach logs or error messages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from devices.errors import Problem, SourceFileError
from devices.topic import TopicScheme
from devices.yamlsource import LocatedDocument, format_path

ENV_PREFIX = "TIDEGATE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicSettings(_Section):
    """MQTT topic templates; each contains one `{device_id}` segment (the dead-letter topic none)."""

    telemetry: str = "devices/{device_id}/telemetry"
    commands: str = "devices/{device_id}/commands"
    command_acks: str = "devices/{device_id}/commands/ack"
    status: str = "devices/{device_id}/status"
    dead_letter: str = "tidegate/dead-letter"

    @field_validator("telemetry", "commands", "command_acks", "status")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        TopicScheme(value)  # raises ValueError with a clear message
        return value


class TlsSettings(_Section):
    """TLS to the broker, used when `mqtt.url` is `mqtts://` (and only then).

    The broker's certificate is always verified: it must chain to `ca_file` (or, without one, to a
    CA the system trusts) and be valid for `server_name` (default: the host in `mqtt.url`). There
    is deliberately no switch to skip verification; to trust a self-signed broker certificate, name
    it as `ca_file`. `cert_file` and `key_file` are tidegate's client certificate and private key
    (PEM, key unencrypted) for brokers that require one (mutual TLS); `key_file` may be left out
    when `cert_file` holds both.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = Field(None, min_length=1, max_length=253)

    @field_validator("key_file")
    @classmethod
    def _key_needs_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("cert_file") is None:
            raise ValueError("key_file is set without cert_file: the client certificate goes in cert_file")
        return value


class MqttSettings(_Section):
    """How tidegate connects to the broker.

    `mqtts://HOST[:PORT]` (port 8883 by default) connects over TLS, configured by `tls`; plain
    `mqtt://` (port 1883) with a `tls` section is refused rather than silently sent in clear. The
    password comes from `password` (better: the environment, `TIDEGATE_MQTT__PASSWORD`) or from
    `password_file`, read at start with surrounding whitespace stripped.
    """

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    client_id: str = Field("tidegate", min_length=1, max_length=64)
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: TlsSettings = TlsSettings()
    keepalive: int = Field(30, ge=5, le=3600)
    # MQTT 5: how long the broker keeps our session (and queued messages) while we are away.
    session_expiry: int = Field(86_400, ge=0)
    # MQTT 5 Receive Maximum: unacked QoS 1 messages the broker may send us. We ack only after a
    # batch is written, so this must exceed the batch size or throughput collapses.
    receive_maximum: int = Field(65_535, ge=1, le=65_535)
    reconnect_min_delay: float = Field(0.5, gt=0)
    reconnect_max_delay: float = Field(30.0, gt=0)
    topics: TopicSettings = TopicSettings()

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("expected mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS")
        if parts.port is None and ":" in parts.netloc.rsplit("]", 1)[-1]:
            raise ValueError("invalid port")
        return value

    # Field validators rather than one model validator, so an error points at the key concerned.
    @field_validator("password_file")
    @classmethod
    def _one_password(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("password") is not None:
            raise ValueError("set either password or password_file, not both")
        return value

    @field_validator("tls")
    @classmethod
    def _tls_needs_mqtts(cls, value: TlsSettings, info: ValidationInfo) -> TlsSettings:
        url = info.data.get("url")
        if url is not None and urlsplit(url).scheme != "mqtts" and value != TlsSettings():
            raise ValueError("set, but the url is mqtt:// (plain TCP): use mqtts://HOST[:PORT] for TLS")
        return value

    @property
    def host(self) -> str:
        """Broker host name."""
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        """Broker port (1883 when the URL has none; 8883 for mqtts://)."""
        return urlsplit(self.url).port or (8883 if self.tls_enabled else 1883)

    @property
    def tls_enabled(self) -> bool:
        """True when the URL is `mqtts://`."""
        return urlsplit(self.url).scheme == "mqtts"

    def read_password(self) -> SecretStr | None:
        """Return the password: `password`, or the stripped contents of `password_file` (read now).

        Raises:
            SourceFileError: the password file cannot be read, is not UTF-8 or is empty. The
                message never quotes the file's contents.
        """
        if self.password_file is None:
            return self.password
        where = "mqtt.password_file"
        try:
            text = self.password_file.read_bytes().decode("utf-8")
        except OSError as exc:
            message = f"cannot read the password file: {exc.strerror}"
            raise SourceFileError([Problem(str(self.password_file), None, None, where, message)]) from None
        except UnicodeDecodeError:
            message = "the password file is not UTF-8 text"
            raise SourceFileError([Problem(str(self.password_file), None, None, where, message)]) from None
        password = text.strip()
        if not password:
            message = "the password file is empty: expected the MQTT password"
            raise SourceFileError([Problem(str(self.password_file), None, None, where, message)])
        return SecretStr(password)


class InfluxV1Settings(_Section):
    """InfluxDB 1.x HTTP API (also InfluxDB 3's v1 compatibility endpoints)."""

    kind: Literal["influxdb_v1"]
    url: str = "http://127.0.0.1:8086"
    database: str = "tidegate"
    retention_policy: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    create_database: bool = False
    timeout: float = Field(10.0, gt=0)


class InfluxV2Settings(_Section):
    """InfluxDB v2 API (InfluxDB 2.x, Cloud, 1.8+ and 3.x writes)."""

    kind: Literal["influxdb_v2"]
    url: str = "http://127.0.0.1:8086"
    token: SecretStr
    org: str
    bucket: str
    timeout: float = Field(10.0, gt=0)


class SqliteSettings(_Section):
    """The embedded local store: a SQLite file, for trying tidegate without InfluxDB."""

    kind: Literal["sqlite"]
    path: Path = Path("tidegate.db")


class NullSettings(_Section):
    """Discard everything (benchmarks)."""

    kind: Literal["null"]


StoreSettings = Annotated[
    InfluxV1Settings | InfluxV2Settings | SqliteSettings | NullSettings, Field(discriminator="kind")
]


class BatchSettings(_Section):
    """How writes are batched. A message is acknowledged to the broker only once its batch is written."""

    size: int = Field(5_000, ge=1)
    flush_interval: float = Field(1.0, gt=0)
    max_pending: int = Field(50_000, ge=1)


class IngestSettings(_Section):
    """Limits applied to device payloads before and while parsing."""

    max_payload_bytes: int = Field(65_536, ge=64)
    max_batch: int = Field(1_000, ge=1)
    dead_letter_max_bytes: int = Field(1_024, ge=0)


class RulesSettings(_Section):
    """Where rule files live, and where the rules' state is kept across restarts.

    `checkpoint_file` unset means `rules-state.json` next to the config file (in the working
    directory when there is no file); a relative one resolves against the config file's directory.
    Settings built in code have no file to sit next to: there, an unset `checkpoint_file` means no
    checkpoints. `checkpoint_enabled: false` turns them off.
    """

    dir: Path | None = None
    checkpoint_enabled: bool = True
    checkpoint_file: Path | None = None
    checkpoint_interval: float = Field(10.0, gt=0)


class CommandSettings(_Section):
    """Command delivery (see devices/delivery.py for the lifecycle).

    `ttl`: seconds a command may wait to be sent (device offline, broker disconnected, rate limit)
    before it is `expired`; also its MQTT 5 Message Expiry and the `expires` in its body.
    `ack_timeout`: seconds from the first publish to the ack before it is `timed_out`; within it the
    same command (same id) is published again every `retry_interval`, `max_attempts` times in all.
    `offline`: for a device whose last status is offline: `hold` (queue until its birth message, at
    most `max_queued_per_device`), `send` (publish anyway; MQTT 5 expiry bounds it) or `reject`.
    `rate`/`burst`: a token bucket per device; commands beyond it wait in the device's queue.
    `token`: when set, `POST /commands` on the HTTP endpoint needs `Authorization: Bearer <token>`
    (set it with TIDEGATE_COMMANDS__TOKEN); without it anyone who reaches `http.listen` may send.
    """

    ttl: float = Field(300.0, gt=0)
    ack_timeout: float = Field(30.0, gt=0)
    retry_interval: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=100)
    offline: Literal["hold", "send", "reject"] = "hold"
    max_queued_per_device: int = Field(100, ge=1)
    max_pending: int = Field(10_000, ge=1)
    rate: float = Field(1.0, gt=0)
    burst: int = Field(5, ge=1)
    token: SecretStr | None = None


class SpoolSettings(_Section):
    """The durable spool: batches wait on disk while the store fails them (see gateway/store/spool.py).

    On by default. `dir` unset means `spool` next to the config file (in the working directory when
    there is no file); a relative `dir` resolves against the config file's directory. Settings built
    in code rather than loaded have no file to sit next to: there, an unset `dir` means no spool.
    When `max_bytes` of segments are held, tidegate stops acknowledging and reading instead of
    dropping anything, and the broker holds the messages.
    """

    enabled: bool = True
    dir: Path | None = None
    max_bytes: int = Field(1 << 30, ge=1 << 20)


class DeadLetterSettings(_Section):
    """The dead-letter file: refused payloads and points, with reasons, one JSON object per line.

    `file` unset means `dead-letter.jsonl` next to the config file (in the working directory when
    there is no file); settings built in code have no file to sit next to and then keep none.
    """

    enabled: bool = True
    file: Path | None = None
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024)


class HttpSettings(_Section):
    """The operations endpoint: Prometheus `/metrics`, `/healthz`, JSON `/status`."""

    listen: str | None = Field(None, description="HOST:PORT, e.g. 127.0.0.1:9464; unset = no endpoint")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9464")
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, or None when disabled."""
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class DevicesSettings(_Section):
    """The device registry (see devices/registry.py) and what to do with devices not in it.

    `unknown`: `accept` stores their telemetry like any other; `reject` dead-letters it;
    `quarantine` stores it in the `quarantine` measurement, keeps it from the rules, and lists the
    device in `tidegate devices`. With no `file`, every device is unknown.
    """

    file: Path | None = None
    unknown: Literal["accept", "reject", "quarantine"] = "accept"


class ActionSettings(_Section):
    """Rule actions that leave the gateway other than commands: webhooks (see gateway/actions.py).

    A webhook is POSTed within `webhook_timeout` seconds, tried at most `webhook_attempts` times
    (first retry after `webhook_backoff` seconds, doubling), `webhook_workers` at a time; at most
    `webhook_queue` wait, and more are dropped, counted and logged rather than slow down ingest.
    """

    webhook_timeout: float = Field(5.0, gt=0)
    webhook_attempts: int = Field(3, ge=1, le=10)
    webhook_backoff: float = Field(1.0, gt=0)
    webhook_workers: int = Field(4, ge=1, le=64)
    webhook_queue: int = Field(1_000, ge=1)


class Settings(_Section):
    """The whole gateway configuration."""

    mqtt: MqttSettings = MqttSettings()
    store: StoreSettings = SqliteSettings(kind="sqlite")
    batch: BatchSettings = BatchSettings()
    ingest: IngestSettings = IngestSettings()
    rules: RulesSettings = RulesSettings()
    commands: CommandSettings = CommandSettings()
    http: HttpSettings = HttpSettings()
    spool: SpoolSettings = SpoolSettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    devices: DevicesSettings = DevicesSettings()
    actions: ActionSettings = ActionSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = overrides
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return overrides


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_path(overrides: Mapping[str, Any], path: list[str | int]) -> bool:
    node: Any = overrides
    for item in path:
        if not isinstance(node, Mapping) or item not in node:
            return False
        node = node[item]
    return True


def _resolve_paths(settings: Settings, base_dir: Path) -> Settings:
    updates: dict[str, Any] = {}
    if settings.rules.dir is not None and not settings.rules.dir.is_absolute():
        updates["rules"] = settings.rules.model_copy(update={"dir": base_dir / settings.rules.dir})
    if settings.devices.file is not None and not settings.devices.file.is_absolute():
        updates["devices"] = settings.devices.model_copy(update={"file": base_dir / settings.devices.file})
    if isinstance(settings.store, SqliteSettings) and not settings.store.path.is_absolute():
        updates["store"] = settings.store.model_copy(update={"path": base_dir / settings.store.path})
    rules = updates.get("rules", settings.rules)
    if rules.checkpoint_enabled and (
        rules.checkpoint_file is None or not rules.checkpoint_file.is_absolute()
    ):
        state_file = base_dir / (
            Path("rules-state.json") if rules.checkpoint_file is None else rules.checkpoint_file
        )
        updates["rules"] = rules.model_copy(update={"checkpoint_file": state_file})
    spool = settings.spool
    if spool.enabled and (spool.dir is None or not spool.dir.is_absolute()):
        spool_dir = base_dir / (Path("spool") if spool.dir is None else spool.dir)
        updates["spool"] = spool.model_copy(update={"dir": spool_dir})
    dead = settings.dead_letter
    if dead.enabled and (dead.file is None or not dead.file.is_absolute()):
        dead_file = base_dir / (Path("dead-letter.jsonl") if dead.file is None else dead.file)
        updates["dead_letter"] = dead.model_copy(update={"file": dead_file})
    mqtt_paths: dict[str, Any] = {}
    if settings.mqtt.password_file is not None and not settings.mqtt.password_file.is_absolute():
        mqtt_paths["password_file"] = base_dir / settings.mqtt.password_file
    tls = settings.mqtt.tls
    tls_paths = {
        name: base_dir / path
        for name in ("ca_file", "cert_file", "key_file")
        if (path := getattr(tls, name)) is not None and not path.is_absolute()
    }
    if tls_paths:
        mqtt_paths["tls"] = tls.model_copy(update=tls_paths)
    if mqtt_paths:
        updates["mqtt"] = settings.mqtt.model_copy(update=mqtt_paths)
    return settings.model_copy(update=updates) if updates else settings


def _check_mqtt_files(
    mqtt: MqttSettings, doc: LocatedDocument | None, overrides: Mapping[str, Any], file: str
) -> None:
    """Read the password file and load the TLS files now, so a bad one is reported at its key."""
    from gateway.tls import TlsOptions, tls_context  # ssl: only when there is TLS to check

    problems: list[Problem] = []
    try:
        mqtt.read_password()
    except SourceFileError as exc:
        problems += exc.problems
    if mqtt.tls_enabled:
        tls = mqtt.tls
        try:
            tls_context(TlsOptions(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file))
        except SourceFileError as exc:
            problems += exc.problems
    located = []
    for problem in problems:
        # the problem names the file it is about; place it where the setting naming that file is
        loc: list[str | int] = [*problem.where.split(".")]
        message = f"{problem.file}: {problem.message}"
        if _env_path(overrides, loc):
            env_name = ENV_PREFIX + "__".join(str(p).upper() for p in loc)
            located.append(Problem(f"environment {env_name}", None, None, problem.where, message))
        elif doc is not None:
            located.append(doc.problem(loc, message))
        else:
            located.append(Problem(file, None, None, problem.where, message))
    if located:
        raise SourceFileError(located)


def load_settings(
    path: str | Path | None, environ: Mapping[str, str] | None = None, *, check_files: bool = True
) -> Settings:
    """Load and validate the configuration, listing every problem with its location.

    Args:
        path: the YAML file, or None for defaults plus environment.
        environ: the environment to read overrides from (default: os.environ).
        check_files: also read the MQTT password file and load the TLS files, reporting problems
            at their keys. Commands that only read other sections (`status` reads `http.listen`)
            pass False, so they work for a user who may not read the gateway's secrets.

    Raises:
        SourceFileError: the file or the environment has problems; all are listed.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        doc = None
        data: Any = {}
        base_dir = Path.cwd()
        file = "<defaults>"
    else:
        file = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SourceFileError([Problem(file, None, None, "", f"cannot read: {exc.strerror}")]) from None
        doc = LocatedDocument(text, file)
        data = doc.data if doc.data is not None else {}
        base_dir = Path(path).resolve().parent
        if not isinstance(data, dict):
            raise SourceFileError([doc.problem([], "expected a mapping of sections (mqtt, store, ...)")])
    overrides = _env_overrides(environ)
    try:
        settings = Settings.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = [p for p in error["loc"] if isinstance(p, str | int)]
            # a discriminated union adds the tag ("influxdb_v1") to the location; it is not a key
            if (
                loc
                and loc[0] == "store"
                and len(loc) > 1
                and str(loc[1]) in ("influxdb_v1", "influxdb_v2", "sqlite", "null")
            ):
                loc = [loc[0], *loc[2:]]
            value = error.get("input")
            secret = any(str(p) in ("password", "token") for p in loc)
            shown = "" if secret or isinstance(value, dict | list) or value is None else f" (got {value!r})"
            if _env_path(overrides, loc):
                env_name = ENV_PREFIX + "__".join(str(p).upper() for p in loc)
                problems.append(
                    Problem(f"environment {env_name}", None, None, format_path(loc), error["msg"] + shown)
                )
            elif doc is not None:
                problems.append(doc.problem(loc, error["msg"] + shown))
            else:
                problems.append(Problem(file, None, None, format_path(loc), error["msg"] + shown))
        problems.sort(key=lambda p: (p.file, p.line or 0, p.column or 0))
        raise SourceFileError(problems) from None
    settings = _resolve_paths(settings, base_dir)
    if check_files:
        _check_mqtt_files(settings.mqtt, doc, overrides, file)
    return settings


def redacted(settings: Settings) -> dict[str, Any]:
    """Return the settings as plain data with secrets masked, for display."""
    return settings.model_dump(mode="json")
