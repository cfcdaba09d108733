"""A sans-IO MQTT 3.1.1 and 5.0 codec for the client side: packet encoders and an incremental decoder.

No sockets, no event loop, no clock: encoders turn arguments into bytes, and `MqttDecoder.feed(data)`
turns whatever bytes arrived (any fragmentation) into the packets they complete. `gateway.mqtt`
drives it from asyncio. Written for the gateway's hot path: one `feed` call parses every packet of a
256 KiB socket read in one loop, PUBLISH topics are decoded once and cached (the same `str` object
comes back for the same topic, so the dict lookups downstream hit a cached hash), and MQTT 5 PUBLISH
properties cost one byte test when absent (the usual case) and are parsed once per distinct block
when present (a device type's messages share one content type).

Encoders cover what a subscribing and commanding client sends (CONNECT, SUBSCRIBE, PUBLISH, PUBACK,
PINGREQ, DISCONNECT); the decoder covers what a broker sends such a client (CONNACK, PUBLISH, PUBACK,
SUBACK, PINGRESP, DISCONNECT). Anything else from the broker (QoS 2 flow packets, UNSUBACK, AUTH) is
refused, because this client never asks for it.

    MqttCodecError              bytes and packets that break the MQTT specification
     ├── MalformedPacketError   what the broker sent is not valid MQTT (drop the connection)
     └── EncodeError            what we were asked to send cannot be encoded (bad topic, too long, ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# -- errors ------------------------------------------------------------------------------------------


class MqttCodecError(Exception):
    """Base of the codec's errors."""


class MalformedPacketError(MqttCodecError):
    """The bytes from the broker are not valid MQTT; the connection must be dropped."""


class EncodeError(MqttCodecError, ValueError):
    """A packet cannot be encoded from the arguments given (the message says which and why)."""


# -- constants ---------------------------------------------------------------------------------------

CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14
AUTH: Final = 15

PACKET_NAMES: Final = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
    AUTH: "AUTH",
}

MAX_REMAINING_LENGTH: Final = 268_435_455  # four bytes of Variable Byte Integer
MAX_STRING_BYTES: Final = 65_535
PINGREQ_PACKET: Final = b"\xc0\x00"
DISCONNECT_PACKET: Final = b"\xe0\x00"  # 3.1.1, and 5.0 with reason 0 (normal) and no properties
TOPIC_CACHE_SIZE: Final = 100_000  # distinct topics remembered; the cache is emptied when full
PROPERTIES_CACHE_SIZE: Final = 1_024  # distinct PUBLISH property blocks remembered (same for a device type)

# MQTT 5 reason codes (spec 2.4); 0x00 reads "Success" here whatever the packet.
REASON_NAMES: Final = {
    0x00: "Success",
    0x01: "Granted QoS 1",
    0x02: "Granted QoS 2",
    0x04: "Disconnect with Will Message",
    0x10: "No matching subscribers",
    0x11: "No subscription existed",
    0x18: "Continue authentication",
    0x19: "Re-authenticate",
    0x80: "Unspecified error",
    0x81: "Malformed Packet",
    0x82: "Protocol Error",
    0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep Alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic Filter invalid",
    0x90: "Topic Name invalid",
    0x91: "Packet Identifier in use",
    0x92: "Packet Identifier not found",
    0x93: "Receive Maximum exceeded",
    0x94: "Topic Alias invalid",
    0x95: "Packet too large",
    0x96: "Message rate too high",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported",
    0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time",
    0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}
# MQTT 3.1.1 CONNACK return codes (spec 3.2.2.3), named like their MQTT 5 counterparts.
CONNACK_V3_NAMES: Final = {
    0: "Success",
    1: "Unsupported Protocol Version",
    2: "Client Identifier not valid",
    3: "Server unavailable",
    4: "Bad User Name or Password",
    5: "Not authorized",
}


def reason_name(code: int, *, mqtt5: bool = True, connack: bool = False) -> str:
    """Name a reason code (MQTT 5) or a CONNACK return code (3.1.1, `connack=True`) for logs."""
    if not mqtt5 and connack:
        return CONNACK_V3_NAMES.get(code, f"unknown return code {code}")
    if not mqtt5 and code == 0x80:
        return "Failure"  # 3.1.1 SUBACK
    return REASON_NAMES.get(code, f"unknown reason code 0x{code:02x}")


def connack_refused(code: int, *, mqtt5: bool) -> bool:
    """Tell whether a CONNACK reason (5.0) or return code (3.1.1) refuses the connection."""
    return code >= 0x80 if mqtt5 else code != 0


# -- properties --------------------------------------------------------------------------------------

# Property identifier -> (field name, wire type). Wire types: b byte, h two-byte int, i four-byte int,
# v variable byte integer, s UTF-8 string, d binary data, p UTF-8 string pair.
_PROPERTY_TYPES: Final = {
    0x01: ("payload_format_indicator", "b"),
    0x02: ("message_expiry_interval", "i"),
    0x03: ("content_type", "s"),
    0x08: ("response_topic", "s"),
    0x09: ("correlation_data", "d"),
    0x0B: ("subscription_identifier", "v"),
    0x11: ("session_expiry_interval", "i"),
    0x12: ("assigned_client_identifier", "s"),
    0x13: ("server_keep_alive", "h"),
    0x15: ("authentication_method", "s"),
    0x16: ("authentication_data", "d"),
    0x17: ("request_problem_information", "b"),
    0x18: ("will_delay_interval", "i"),
    0x19: ("request_response_information", "b"),
    0x1A: ("response_information", "s"),
    0x1C: ("server_reference", "s"),
    0x1F: ("reason_string", "s"),
    0x21: ("receive_maximum", "h"),
    0x22: ("topic_alias_maximum", "h"),
    0x23: ("topic_alias", "h"),
    0x24: ("maximum_qos", "b"),
    0x25: ("retain_available", "b"),
    0x26: ("user_property", "p"),
    0x27: ("maximum_packet_size", "i"),
    0x28: ("wildcard_subscription_available", "b"),
    0x29: ("subscription_identifier_available", "b"),
    0x2A: ("shared_subscription_available", "b"),
}
_MULTIPLE: Final = frozenset({0x0B, 0x26})  # may appear more than once; collected in order
_PUBLISH_PROPERTIES: Final = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x23, 0x26})  # that we may send


@dataclass(frozen=True, slots=True, kw_only=True)
class Properties:
    """MQTT 5 properties of any packet; what a packet did not carry is None (or empty).

    Names are the specification's, in snake case. `subscription_identifier` and `user_property` may
    repeat, so they are tuples. Build one to publish with, e.g.
    `Properties(message_expiry_interval=60, content_type="application/json")`.
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifier: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_property: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None


NO_PROPERTIES: Final = Properties()


def _utf8(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacketError(f"{what} is not valid UTF-8: {data[:60]!r}") from exc
    if "\x00" in text:
        raise MalformedPacketError(f"{what} contains U+0000: {text[:60]!r}")
    return text


def _read_varint(buf: bytes, i: int, end: int, what: str) -> tuple[int, int]:
    """Return (value, index after it) of the Variable Byte Integer at `i`, which must end before `end`."""
    value = 0
    shift = 0
    while True:
        if i >= end:
            raise MalformedPacketError(f"{what}: Variable Byte Integer runs past the end")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise MalformedPacketError(f"{what}: Variable Byte Integer longer than 4 bytes")


def decode_properties(data: bytes, what: str = "properties") -> Properties:
    """Parse the bytes of a property block (after its length) into `Properties`."""
    values: dict[str, object] = {}
    multiple: dict[str, list[object]] = {}
    end = len(data)
    i = 0
    while i < end:
        identifier, i = _read_varint(data, i, end, what)
        entry = _PROPERTY_TYPES.get(identifier)
        if entry is None:
            raise MalformedPacketError(f"{what}: unknown property identifier 0x{identifier:02x}")
        name, kind = entry
        value: object
        if kind == "b":
            if i + 1 > end:
                raise MalformedPacketError(f"{what}: {name} runs past the end")
            value = data[i]
            i += 1
        elif kind == "h":
            if i + 2 > end:
                raise MalformedPacketError(f"{what}: {name} runs past the end")
            value = (data[i] << 8) | data[i + 1]
            i += 2
        elif kind == "i":
            if i + 4 > end:
                raise MalformedPacketError(f"{what}: {name} runs past the end")
            value = int.from_bytes(data[i : i + 4], "big")
            i += 4
        elif kind == "v":
            value, i = _read_varint(data, i, end, f"{what}: {name}")
        else:
            raw: list[bytes] = []
            for _ in range(2 if kind == "p" else 1):
                if i + 2 > end:
                    raise MalformedPacketError(f"{what}: {name} runs past the end")
                length = (data[i] << 8) | data[i + 1]
                i += 2
                if i + length > end:
                    raise MalformedPacketError(f"{what}: {name} runs past the end")
                raw.append(data[i : i + length])
                i += length
            if kind == "d":
                value = raw[0]
            elif kind == "s":
                value = _utf8(raw[0], f"{what}: {name}")
            else:
                value = (_utf8(raw[0], f"{what}: {name}"), _utf8(raw[1], f"{what}: {name}"))
        if identifier in _MULTIPLE:
            multiple.setdefault(name, []).append(value)
        elif name in values:
            raise MalformedPacketError(f"{what}: {name} appears more than once")
        else:
            values[name] = value
    for name, items in multiple.items():
        values[name] = tuple(items)
    return Properties(**values)  # type: ignore[arg-type]  # names and types come from _PROPERTY_TYPES


def _varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise EncodeError(f"{value} does not fit a Variable Byte Integer (0 to {MAX_REMAINING_LENGTH})")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(text: str, what: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > MAX_STRING_BYTES:
        raise EncodeError(f"{what} is {len(data)} bytes in UTF-8; MQTT allows at most {MAX_STRING_BYTES}")
    if "\x00" in text:
        raise EncodeError(f"{what} must not contain U+0000")
    return len(data).to_bytes(2, "big") + data


def _binary(data: bytes, what: str) -> bytes:
    if len(data) > MAX_STRING_BYTES:
        raise EncodeError(f"{what} is {len(data)} bytes; MQTT allows at most {MAX_STRING_BYTES}")
    return len(data).to_bytes(2, "big") + bytes(data)


def _unsigned(value: int, size: int, what: str) -> bytes:
    if not 0 <= value < 1 << (8 * size):
        raise EncodeError(f"{what} must be between 0 and {(1 << (8 * size)) - 1}, got {value}")
    return value.to_bytes(size, "big")


def encode_properties(properties: Properties | None, allowed: frozenset[int] | None = None) -> bytes:
    """Encode a property block with its length, properties in ascending identifier order.

    `allowed` limits which identifiers may be set (EncodeError otherwise).
    """
    if properties is None or properties == NO_PROPERTIES:
        return b"\x00"
    if not isinstance(properties, Properties):  # e.g. paho's, whose attribute names differ
        raise EncodeError(f"properties must be gateway.mqttcodec.Properties, got {type(properties).__name__}")
    out = bytearray()
    for identifier, (name, kind) in _PROPERTY_TYPES.items():
        value = getattr(properties, name)
        if value is None or value == ():
            continue
        if allowed is not None and identifier not in allowed:
            raise EncodeError(f"property {name} cannot be sent in this packet")
        items = value if identifier in _MULTIPLE else (value,)
        for item in items:
            out += _varint(identifier)
            if kind == "b":
                out += _unsigned(item, 1, name)
            elif kind == "h":
                out += _unsigned(item, 2, name)
            elif kind == "i":
                out += _unsigned(item, 4, name)
            elif kind == "v":
                out += _varint(item)
            elif kind == "s":
                out += _string(item, name)
            elif kind == "d":
                out += _binary(item, name)
            else:
                key, val = item
                out += _string(key, f"{name} name") + _string(val, f"{name} value")
    return _varint(len(out)) + bytes(out)


# -- encoders ----------------------------------------------------------------------------------------


def _packet(first_byte: int, body: bytes | bytearray) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + bytes(body)


def encode_connect(
    client_id: str,
    *,
    mqtt5: bool,
    keepalive: int,
    clean_start: bool,
    username: str | None = None,
    password: bytes | None = None,
    session_expiry: int | None = None,
    receive_maximum: int | None = None,
) -> bytes:
    """Encode CONNECT (no will). `clean_start` is Clean Start (5.0) or Clean Session (3.1.1).

    `session_expiry` and `receive_maximum` are MQTT 5 properties (ignored for 3.1.1).
    """
    if not mqtt5 and password is not None and username is None:
        raise EncodeError("MQTT 3.1.1 allows a password only together with a user name")
    flags = 0x02 if clean_start else 0x00
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = bytearray(b"\x00\x04MQTT")
    body.append(5 if mqtt5 else 4)
    body.append(flags)
    body += _unsigned(keepalive, 2, "keepalive")
    if mqtt5:
        if receive_maximum == 0:
            raise EncodeError("receive_maximum must be at least 1")
        body += encode_properties(
            Properties(session_expiry_interval=session_expiry, receive_maximum=receive_maximum)
        )
    body += _string(client_id, "client id")
    if username is not None:
        body += _string(username, "user name")
    if password is not None:
        body += _binary(password, "password")
    return _packet(CONNECT << 4, body)


@dataclass(frozen=True, slots=True)
class SubscribeOptions:
    """What a SUBSCRIBE asks per filter: maximum QoS and, in MQTT 5, the subscription options."""

    qos: int = 1
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0  # 0 send retained at subscribe, 1 only if new, 2 never

    def byte(self, mqtt5: bool) -> int:
        """Return the options byte that follows the topic filter."""
        if self.qos not in (0, 1, 2):
            raise EncodeError(f"subscription QoS must be 0, 1 or 2, got {self.qos}")
        if not mqtt5:
            return self.qos
        if self.retain_handling not in (0, 1, 2):
            raise EncodeError(f"retain handling must be 0, 1 or 2, got {self.retain_handling}")
        return (
            self.qos
            | (0x04 if self.no_local else 0)
            | (0x08 if self.retain_as_published else 0)
            | (self.retain_handling << 4)
        )


def validate_topic_filter(topic_filter: str) -> None:
    """Raise EncodeError unless `topic_filter` is a valid MQTT topic filter."""
    if not topic_filter:
        raise EncodeError("a topic filter must not be empty")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise EncodeError(f"topic filter {topic_filter!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise EncodeError(f"topic filter {topic_filter!r}: '+' must be a whole level")


def encode_subscribe(
    packet_id: int,
    subscriptions: Sequence[tuple[str, SubscribeOptions | int]],
    *,
    mqtt5: bool,
    subscription_identifier: int | None = None,
) -> bytes:
    """Encode SUBSCRIBE for `(topic filter, options or QoS)` pairs."""
    if not subscriptions:
        raise EncodeError("SUBSCRIBE needs at least one topic filter")
    body = bytearray(_packet_id(packet_id))
    if mqtt5:
        body += encode_properties(
            Properties(
                subscription_identifier=() if subscription_identifier is None else (subscription_identifier,)
            )
        )
    for topic_filter, options in subscriptions:
        validate_topic_filter(topic_filter)
        if isinstance(options, int):
            options = SubscribeOptions(qos=options)
        body += _string(topic_filter, "topic filter")
        body.append(options.byte(mqtt5))
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def _packet_id(packet_id: int) -> bytes:
    if not 1 <= packet_id <= 0xFFFF:
        raise EncodeError(f"packet identifier must be between 1 and 65535, got {packet_id}")
    return packet_id.to_bytes(2, "big")


def validate_topic_name(topic: str) -> bytes:
    """Return the UTF-8 bytes of a topic one may publish to, or raise EncodeError saying why not."""
    if not topic:
        raise EncodeError("a topic must not be empty")
    if "+" in topic or "#" in topic:
        raise EncodeError(f"topic {topic!r} contains a wildcard ('+' or '#'); one cannot publish to it")
    if "\x00" in topic:
        raise EncodeError(f"topic {topic!r} contains U+0000")
    data = topic.encode("utf-8")
    if len(data) > MAX_STRING_BYTES:
        raise EncodeError(f"topic is {len(data)} bytes in UTF-8; MQTT allows at most {MAX_STRING_BYTES}")
    return data


def publish_template(
    topic: str,
    payload: bytes,
    *,
    mqtt5: bool,
    qos: int = 0,
    retain: bool = False,
    properties: Properties | None = None,
) -> tuple[bytearray, int]:
    """Encode PUBLISH with packet id 0 and DUP off; return it and the offset of the packet id.

    A client that sends the packet later (QoS 1 queued while disconnected) validates and encodes at
    once, then writes the packet id it assigns into bytes `[offset, offset + 2)` (offset is -1 for
    QoS 0), and sets bit 0x08 of byte 0 for a resend.
    """
    if qos not in (0, 1, 2):
        raise EncodeError(f"QoS must be 0, 1 or 2, got {qos}")
    topic_bytes = validate_topic_name(topic)
    head = len(topic_bytes).to_bytes(2, "big") + topic_bytes
    props = encode_properties(properties, _PUBLISH_PROPERTIES) if mqtt5 else b""
    if not mqtt5 and properties is not None and properties != NO_PROPERTIES:
        raise EncodeError("publish properties need MQTT 5")
    id_bytes = b"\x00\x00" if qos else b""
    length = len(head) + len(id_bytes) + len(props) + len(payload)
    if length > MAX_REMAINING_LENGTH:
        raise EncodeError(f"PUBLISH of {length} bytes exceeds MQTT's maximum of {MAX_REMAINING_LENGTH}")
    fixed = bytes(((PUBLISH << 4) | (qos << 1) | (1 if retain else 0),)) + _varint(length)
    offset = len(fixed) + len(head) if qos else -1
    return bytearray(fixed + head + id_bytes + props + bytes(payload)), offset


def encode_publish(
    topic: str,
    payload: bytes,
    *,
    mqtt5: bool,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int = 0,
    properties: Properties | None = None,
) -> bytes:
    """Encode PUBLISH; `packet_id` (1-65535) is required for QoS 1 and 2."""
    if dup and not qos:
        raise EncodeError("DUP must be off for QoS 0")
    packet, offset = publish_template(
        topic, payload, mqtt5=mqtt5, qos=qos, retain=retain, properties=properties
    )
    if qos:
        packet[offset : offset + 2] = _packet_id(packet_id)
    if dup:
        packet[0] |= 0x08
    return bytes(packet)


def encode_puback(packet_id: int, reason_code: int = 0, *, mqtt5: bool) -> bytes:
    """Encode PUBACK; MQTT 5 leaves out reason code 0 (spec 3.4.2.1)."""
    if mqtt5 and reason_code:
        return bytes((PUBACK << 4, 3)) + _packet_id(packet_id) + _unsigned(reason_code, 1, "reason code")
    if reason_code:
        raise EncodeError("MQTT 3.1.1 PUBACK has no reason code")
    return bytes((PUBACK << 4, 2)) + _packet_id(packet_id)


def encode_pingreq() -> bytes:
    """Encode PINGREQ."""
    return PINGREQ_PACKET


def encode_disconnect(
    reason_code: int = 0, *, mqtt5: bool, session_expiry: int | None = None, reason_string: str | None = None
) -> bytes:
    """Encode DISCONNECT; in MQTT 5 with a reason code and properties when they are not the defaults."""
    if not mqtt5:
        if reason_code or session_expiry is not None or reason_string is not None:
            raise EncodeError("MQTT 3.1.1 DISCONNECT carries no reason code or properties")
        return DISCONNECT_PACKET
    properties = Properties(session_expiry_interval=session_expiry, reason_string=reason_string)
    if properties == NO_PROPERTIES:
        return DISCONNECT_PACKET if reason_code == 0 else bytes((DISCONNECT << 4, 1, reason_code))
    return _packet(DISCONNECT << 4, _unsigned(reason_code, 1, "reason code") + encode_properties(properties))


# -- decoded packets ---------------------------------------------------------------------------------


class Publish:
    """An incoming PUBLISH: the message handed to subscription handlers.

    `mid` is the packet identifier (0 for QoS 0), named like paho's so ingest can ack with it.
    `properties` are the MQTT 5 properties (`NO_PROPERTIES` when there are none, and on 3.1.1).
    """

    __slots__ = ("dup", "mid", "payload", "properties", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        mid: int,
        qos: int,
        retain: bool,
        dup: bool,
        properties: Properties = NO_PROPERTIES,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.mid = mid
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.properties = properties

    @property
    def content_type(self) -> str | None:
        """The MQTT 5 Content Type, None when absent."""
        return self.properties.content_type

    def __repr__(self) -> str:
        return (
            f"Publish(topic={self.topic!r}, mid={self.mid}, qos={self.qos}, retain={self.retain}, "
            f"dup={self.dup}, payload={self.payload[:40]!r}{'...' if len(self.payload) > 40 else ''})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Publish):
            return NotImplemented
        return (
            self.topic == other.topic
            and self.payload == other.payload
            and self.mid == other.mid
            and self.qos == other.qos
            and self.retain == other.retain
            and self.dup == other.dup
            and self.properties == other.properties
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking value: compare, do not hash


@dataclass(frozen=True, slots=True)
class ConnAck:
    """CONNACK: session present, the reason (5.0) or return code (3.1.1), and the MQTT 5 properties."""

    session_present: bool
    reason_code: int
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class SubAck:
    """SUBACK: one reason code (granted QoS or failure) per topic filter, in request order."""

    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class PubAck:
    """PUBACK for one of our QoS 1 publishes."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class PingResp:
    """PINGRESP."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT from the broker (MQTT 5 only): why it is closing the connection."""

    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


Packet = Publish | ConnAck | SubAck | PubAck | PingResp | Disconnect
PINGRESP_PACKET: Final = PingResp()


# -- decoder -----------------------------------------------------------------------------------------


class MqttDecoder:
    """Incremental decoder of what a broker sends: `feed(data)` returns the packets `data` completed.

    Bytes of an unfinished packet are kept for the next call, so any split of a stream decodes to the
    same packets. Raises MalformedPacketError on invalid input; the decoder is then unusable.

    Args:
        mqtt5: the protocol level the connection speaks (5.0 or 3.1.1).
        max_packet_size: refuse packets larger than this (fixed header included).
    """

    __slots__ = ("_max_size", "_mqtt5", "_need", "_pending", "_property_blocks", "_topics")

    def __init__(self, *, mqtt5: bool, max_packet_size: int = MAX_REMAINING_LENGTH + 5) -> None:
        self._mqtt5 = mqtt5
        self._max_size = max_packet_size
        self._pending = bytearray()
        self._need = 0  # length of the unfinished packet in _pending, when its header was complete
        self._topics: dict[bytes, str] = {}
        self._property_blocks: dict[bytes, Properties] = {}

    @property
    def buffered(self) -> int:
        """Bytes held of a packet not yet complete."""
        return len(self._pending)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Return the packets completed by `data`, in order."""
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._need:
                return []
            buf = bytes(pending)
            pending.clear()
        else:
            buf = data if type(data) is bytes else bytes(data)
        packets: list[Packet] = []
        try:
            done = self._parse(buf, packets)
        except IndexError:
            # fields read past the end of the data: only a length that lies does that
            raise MalformedPacketError("a packet is shorter than its fields say") from None
        if done < len(buf):
            pending += memoryview(buf)[done:]
        return packets

    def _parse(self, buf: bytes, packets: list[Packet]) -> int:
        """Append every complete packet in `buf` to `packets`; return where the first incomplete one starts."""
        n = len(buf)
        i = 0
        append = packets.append
        mqtt5 = self._mqtt5
        topics = self._topics
        max_size = self._max_size
        while i + 1 < n:
            first = buf[i]
            length = buf[i + 1]
            if length < 0x80:
                j = i + 2
            elif i + 2 < n and buf[i + 2] < 0x80:  # two length bytes: packets of 128 B to 16 KiB
                length = (length & 0x7F) | (buf[i + 2] << 7)
                j = i + 3
            else:
                length, j = self._long_length(buf, i, n)
                if j < 0:
                    self._need = 0  # the length itself is incomplete
                    return i
            end = j + length
            if end - i > max_size:
                raise MalformedPacketError(
                    f"packet of {end - i} bytes exceeds the maximum packet size of {max_size}"
                )
            if end > n:
                self._need = end - i
                return i
            if first >> 4 == PUBLISH:
                qos = (first >> 1) & 0x03
                topic_end = j + 2 + ((buf[j] << 8) | buf[j + 1])
                if topic_end > end:
                    raise MalformedPacketError(
                        f"PUBLISH topic of {topic_end - j - 2} bytes runs past its remaining length {length}"
                    )
                topic_bytes = buf[j + 2 : topic_end]
                topic = topics.get(topic_bytes)
                if topic is None:
                    topic = self._new_topic(topic_bytes, first)
                k = topic_end
                if qos:
                    mid = (buf[k] << 8) | buf[k + 1]
                    k += 2
                    if qos == 3 or mid == 0:
                        raise MalformedPacketError(
                            f"PUBLISH on {topic!r}: QoS {qos}, packet id {mid}"
                            if qos == 3
                            else f"PUBLISH on {topic!r}: packet identifier 0"
                        )
                elif first & 0x08:
                    raise MalformedPacketError(f"PUBLISH on {topic!r}: DUP set on a QoS 0 message")
                else:
                    mid = 0
                properties = NO_PROPERTIES
                if mqtt5:
                    if k >= end:
                        raise MalformedPacketError(f"PUBLISH on {topic!r}: no property length")
                    if buf[k]:
                        # parsed now (a broken block drops the connection, as the spec wants) and
                        # shared: a device type's messages all carry the same block
                        size, k = _read_varint(buf, k, end, "PUBLISH property length")
                        if k + size > end:
                            raise MalformedPacketError(
                                f"PUBLISH on {topic!r}: properties run past the packet"
                            )
                        raw = buf[k : k + size]
                        properties = self._property_blocks.get(raw) or self._new_properties(raw)
                        k += size
                    else:
                        k += 1
                if k > end:
                    raise MalformedPacketError(
                        f"PUBLISH on {topic!r}: fields run past its remaining length {length}"
                    )
                append(Publish(topic, buf[k:end], mid, qos, first & 0x01 == 1, first & 0x08 == 8, properties))
            else:
                append(self._control(first, buf, j, end))
            i = end
        self._need = 0
        return i

    @staticmethod
    def _long_length(buf: bytes, i: int, n: int) -> tuple[int, int]:
        """Decode a remaining length of 3 or 4 bytes at i + 1: (length, body start), or (0, -1) if cut."""
        value = 0
        shift = 0
        j = i + 1
        while True:
            if j >= n:
                return 0, -1
            byte = buf[j]
            j += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, j
            shift += 7
            if shift > 21:
                break
        raise MalformedPacketError("remaining length longer than 4 bytes")

    def _new_topic(self, topic_bytes: bytes, first: int) -> str:
        if not topic_bytes:
            # MQTT 5 topic aliases: we announce no Topic Alias Maximum, so the broker must not use them
            raise MalformedPacketError("PUBLISH with an empty topic (topic aliases are not enabled)")
        topic = _utf8(topic_bytes, "PUBLISH topic")
        if "+" in topic or "#" in topic:
            raise MalformedPacketError(f"PUBLISH topic {topic!r} contains a wildcard")
        if len(self._topics) >= TOPIC_CACHE_SIZE:
            self._topics.clear()
        self._topics[topic_bytes] = topic
        return topic

    def _new_properties(self, raw: bytes) -> Properties:
        properties = decode_properties(raw, "PUBLISH properties")
        cache = self._property_blocks
        if len(cache) >= PROPERTIES_CACHE_SIZE:
            cache.clear()
        cache[raw] = properties
        return properties

    def _control(self, first: int, buf: bytes, j: int, end: int) -> Packet:
        kind = first >> 4
        flags = first & 0x0F
        size = end - j
        mqtt5 = self._mqtt5
        name = PACKET_NAMES.get(kind, f"type {kind}")
        if kind not in (CONNACK, PUBACK, SUBACK, PINGRESP, DISCONNECT):
            raise MalformedPacketError(f"unexpected {name} packet from the broker")
        if flags:
            raise MalformedPacketError(f"{name}: reserved flags 0x{flags:x} must be 0")
        if kind == PUBACK:
            if size < 2 or (size > 2 and not mqtt5):
                raise MalformedPacketError(f"PUBACK with remaining length {size}")
            packet_id = (buf[j] << 8) | buf[j + 1]
            if size == 2:
                return PubAck(packet_id)
            return PubAck(packet_id, buf[j + 2], self._properties(buf, j + 3, end, "PUBACK"))
        if kind == PINGRESP:
            if size:
                raise MalformedPacketError(f"PINGRESP with remaining length {size}")
            return PINGRESP_PACKET
        if kind == CONNACK:
            if size < 2 or (size != 2 and not mqtt5):
                raise MalformedPacketError(f"CONNACK with remaining length {size}")
            acknowledge = buf[j]
            if acknowledge & 0xFE:
                raise MalformedPacketError(f"CONNACK: reserved flags 0x{acknowledge:02x} must be 0")
            return ConnAck(bool(acknowledge & 0x01), buf[j + 1], self._properties(buf, j + 2, end, "CONNACK"))
        if kind == SUBACK:
            if size < 3:
                raise MalformedPacketError(f"SUBACK with remaining length {size}")
            packet_id = (buf[j] << 8) | buf[j + 1]
            k = j + 2
            properties = NO_PROPERTIES
            if mqtt5:
                prop_size, after = _read_varint(buf, k, end, "SUBACK property length")
                if after + prop_size > end:
                    raise MalformedPacketError("SUBACK properties run past the packet")
                properties = decode_properties(buf[after : after + prop_size], "SUBACK properties")
                k = after + prop_size
            codes = tuple(buf[k:end])
            if not codes:
                raise MalformedPacketError("SUBACK without reason codes")
            return SubAck(packet_id, codes, properties)
        # DISCONNECT: only MQTT 5 servers send one
        if not mqtt5:
            raise MalformedPacketError("DISCONNECT from an MQTT 3.1.1 broker")
        if size == 0:
            return Disconnect()
        return Disconnect(buf[j], self._properties(buf, j + 1, end, "DISCONNECT"))

    def _properties(self, buf: bytes, k: int, end: int, what: str) -> Properties:
        """Parse an optional property block from k to exactly end (MQTT 5; none at all is allowed)."""
        if k >= end or not self._mqtt5:
            if k < end:
                raise MalformedPacketError(f"{what}: {end - k} unexpected byte(s)")
            return NO_PROPERTIES
        size, start = _read_varint(buf, k, end, f"{what} property length")
        if start + size != end:
            raise MalformedPacketError(
                f"{what}: property length {size} does not match the {end - start} byte(s) left"
            )
        return decode_properties(buf[start:end], f"{what} properties") if size else NO_PROPERTIES


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Tell whether `topic` matches `topic_filter` (`+` one level, `#` the rest; spec 4.7).

    Wildcards at the first level do not match topics starting with `$` (spec 4.7.2). A shared
    subscription (`$share/group/filter`) matches like its filter.
    """
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        topic_filter = parts[2] if len(parts) == 3 else ""
    levels = topic_filter.split("/")
    names = topic.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(names):
            return False
        if level != "+" and level != names[index]:
            return False
    return len(names) == len(levels)
