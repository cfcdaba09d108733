"""Send one command from the command line: through a running gateway, or straight to the broker.

Through the gateway (`POST /commands` on its HTTP endpoint) the command gets everything the gateway
does for its own: the allow-list, retries, rate limit, offline policy, and an audit record in the
store. `--direct` is for when no gateway runs: it checks the allow-list of the registry the config
names, publishes once (QoS 1, with the MQTT 5 properties on an MQTT 5 connection) from a
short-lived client with a clean session, and waits for the device's ack itself. Nothing is
recorded in the store then, and there are no retries, rate limit or offline hold.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from devices.command import Command, CommandAck
from devices.errors import PayloadError
from devices.registry import DeviceRegistry
from devices.topic import TopicScheme
from gateway.commands import publish_properties
from gateway.config import Settings
from gateway.mqttcodec import Properties

CONNECT_TIMEOUT = 10.0
HTTP_SLACK = 10.0  # seconds the HTTP client waits beyond the outcome wait it asked the gateway for


# The PUBLISH properties tidegate sets, by the names paho gives them.
_PAHO_PUBLISH_NAMES = {
    "payload_format_indicator": "PayloadFormatIndicator",
    "message_expiry_interval": "MessageExpiryInterval",
    "content_type": "ContentType",
    "response_topic": "ResponseTopic",
    "correlation_data": "CorrelationData",
}


class CommandClientError(Exception):
    """The command could not be handed to the gateway or the broker; the message says why."""


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse `key=value` arguments; a value is JSON when it parses as JSON, else text.

    `speed=3` gives 3, `on=true` gives true, `mode=high` gives "high", `tags=["a"]` gives a list;
    `NaN` and `Infinity` stay text. Raises ValueError naming the bad argument.
    """
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"parameter {pair!r}: expected KEY=VALUE, e.g. speed=high or on=true")
        if key in params:
            raise ValueError(f"parameter {key!r} is given twice")
        try:
            value = json.loads(text, parse_constant=_refuse_constant)
        except ValueError:
            value = text
        params[key] = value
    return params


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def paho_publish_properties(properties: Properties) -> PahoProperties:
    """Copy the codec's PUBLISH properties into paho's, for the paho client of `--direct`."""
    theirs = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, paho_name in _PAHO_PUBLISH_NAMES.items():
        value = getattr(properties, name)
        if value is not None:
            setattr(theirs, paho_name, value)
    if properties.user_property:
        theirs.UserProperty = list(properties.user_property)
    return theirs


def send_through_gateway(
    url: str,
    device_id: str,
    name: str,
    params: dict[str, Any],
    *,
    ttl: float | None,
    wait: float,
    token: str | None,
) -> tuple[int, dict[str, Any]]:
    """POST the command to a running gateway; return (HTTP status, the command as JSON).

    Raises:
        CommandClientError: the gateway cannot be reached or answered something unexpected.
    """
    body: dict[str, Any] = {"device": device_id, "name": name, "params": params, "wait": wait}
    if ttl is not None:
        body["ttl"] = ttl
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        response = httpx.post(f"{url}/commands", json=body, headers=headers, timeout=wait + HTTP_SLACK)
    except httpx.HTTPError as exc:
        raise CommandClientError(f"cannot reach the gateway at {url}/commands: {exc}") from exc
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or ("status" not in answer and "error" not in answer):
        raise CommandClientError(
            f"{url}/commands answered {response.status_code}: {response.text.strip()[:200]}"
        )
    if "status" not in answer:
        raise CommandClientError(f"the gateway refused the request: {answer['error']}")
    return response.status_code, answer


def send_direct(
    settings: Settings,
    registry: DeviceRegistry | None,
    device_id: str,
    name: str,
    params: dict[str, Any],
    *,
    ttl: float,
    wait: float,
) -> dict[str, Any]:
    """Publish the command straight to the broker and, when `wait` > 0, wait that long for the ack.

    Returns the command as plain data with `status`: `rejected` (not on the registry's allow-list:
    nothing published), `sent` (published, not waited for), `ok`, `error` or `timed_out`.

    Raises:
        CommandClientError: the broker cannot be reached or did not take the publish.
    """
    now = time.time()
    command = Command(uuid.uuid4().hex, device_id, name, dict(params), now, now + ttl)
    view: dict[str, Any] = {
        "id": command.id,
        "device": device_id,
        "name": name,
        "params": command.params,
        "status": "sent",
        "detail": "",
        "expires": command.expires,
        "latency_ms": None,
    }
    if registry is not None:
        problems = registry.allow_list().problems(device_id, name, params)
        if problems:
            return {**view, "status": "rejected", "detail": "; ".join(problems)}
    mqtt = settings.mqtt
    topics = mqtt.topics
    ack_topic = TopicScheme(topics.command_acks).format(device_id)
    link = _OneShotClient(settings, ack_topic if wait > 0 else None, command.id)
    try:
        link.connect()
        properties = (
            paho_publish_properties(publish_properties(command.id, max(math.ceil(ttl), 1), ack_topic))
            if mqtt.protocol == "5"
            else None
        )
        sent_at = time.time()
        info = link.client.publish(
            TopicScheme(topics.commands).format(device_id), command.encode(), qos=1, properties=properties
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,):
            raise CommandClientError(f"publish failed: {paho.error_string(info.rc)}")
        info.wait_for_publish(CONNECT_TIMEOUT)
        if not info.is_published():
            raise CommandClientError(
                f"the broker did not acknowledge the publish within {CONNECT_TIMEOUT:g}s"
            )
        if wait <= 0:
            return view
        ack = link.wait_for_ack(wait)
        if ack is None:
            return {**view, "status": "timed_out", "detail": f"no ack within {wait:g}s"}
        latency_ms = (time.time() - sent_at) * 1000.0
        return {**view, "status": ack.status, "detail": ack.detail, "latency_ms": latency_ms}
    finally:
        link.close()


class _OneShotClient:
    """A paho client on its own thread with a clean session, for one command and its ack."""

    def __init__(self, settings: Settings, ack_topic: str | None, command_id: str) -> None:
        mqtt = settings.mqtt
        self._settings = settings
        self._ack_topic = ack_topic
        self._command_id = command_id
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._acked = threading.Event()
        self._refused = ""
        self.ack: CommandAck | None = None
        self._mqtt5 = mqtt.protocol == "5"
        self._device_topic = TopicScheme(mqtt.topics.command_acks)
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"tidegate-cli-{uuid.uuid4().hex[:12]}",
            protocol=paho.MQTTv5 if self._mqtt5 else paho.MQTTv311,
            clean_session=None if self._mqtt5 else True,
        )
        password = mqtt.read_password()
        if mqtt.username is not None:
            self.client.username_pw_set(mqtt.username, password.get_secret_value() if password else None)
        if mqtt.tls_enabled:
            from gateway.tls import TlsOptions, tls_context

            tls = mqtt.tls
            self.client.tls_set_context(
                tls_context(
                    TlsOptions(
                        ca_file=tls.ca_file,
                        cert_file=tls.cert_file,
                        key_file=tls.key_file,
                        server_name=tls.server_name,
                    )
                )
            )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def connect(self) -> None:
        mqtt = self._settings.mqtt
        try:
            self.client.connect(mqtt.host, mqtt.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise CommandClientError(
                f"cannot connect to the broker at {mqtt.host}:{mqtt.port}: {exc}"
            ) from exc
        self.client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT) or self._refused:
            reason = self._refused or f"no CONNACK within {CONNECT_TIMEOUT:g}s"
            raise CommandClientError(f"cannot connect to the broker at {mqtt.host}:{mqtt.port}: {reason}")
        if self._ack_topic is not None:
            # subscribe before publishing, so an immediate ack is not missed
            result, _mid = self.client.subscribe(self._ack_topic, qos=1)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS or not self._subscribed.wait(CONNECT_TIMEOUT):
                raise CommandClientError(f"cannot subscribe to {self._ack_topic}")
            if self._refused:
                raise CommandClientError(self._refused)

    def wait_for_ack(self, timeout: float) -> CommandAck | None:
        self._acked.wait(timeout)
        return self.ack

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self._refused = f"the broker refused the connection: {reason}"
        self._connected.set()

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        if any(code.is_failure for code in reasons):
            self._refused = f"the broker refused the subscription to {self._ack_topic} (ACL?)"
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        device_id = self._device_topic.device_id(message.topic)
        if device_id is None:
            return
        # paho's message: paho's property names; an MQTT 3.1.1 message has no properties
        correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
        try:
            ack = CommandAck.decode(
                device_id,
                bytes(message.payload),
                correlation_id=correlation.decode() if isinstance(correlation, bytes) else None,
            )
        except (PayloadError, UnicodeDecodeError):
            return
        if ack.id == self._command_id and self.ack is None:
            self.ack = ack
            self._acked.set()
