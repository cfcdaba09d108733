"""gateway/mqttcodec.py: byte-exact vectors from the MQTT specifications and published captures,
cross-checks against paho-mqtt's own encoders and decoders, fragmentation and malformed input.

Vectors:
- Variable Byte Integer: MQTT 5.0 spec 1.5.5 (table of sizes) / 3.1.1 spec 2.2.3.
- CONNECT 5.0: the MQTTX CLI capture in EMQX's "MQTT 5.0 Packet Explained 01" (clean start, keepalive
  60, session expiry 300, user admin, password public); CONNECT 3.1.1: Digi's XBee "MQTT connect"
  example (client id DIGI, clean session, keepalive 60).
- PUBLISH 5.0: EMQX's "Packet Explained 02" capture (topic request, QoS 0, Message Expiry Interval
  300, Response Topic response, payload "This is a QoS 0 message").
- SUBSCRIBE 3.1.1: the spec's example 3.8.3 (packet id 10, "a/b" QoS 1, "c/d" QoS 2).
Everything else is built field by field from the spec's packet layouts, commented byte by byte.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any, cast

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions as PahoSubscribeOptions

from gateway.mqttcodec import (
    DISCONNECT_PACKET,
    NO_PROPERTIES,
    PINGREQ_PACKET,
    TOPIC_CACHE_SIZE,
    ConnAck,
    Disconnect,
    EncodeError,
    MalformedPacketError,
    MqttCodecError,
    MqttDecoder,
    Packet,
    PingResp,
    Properties,
    PubAck,
    Publish,
    SubAck,
    SubscribeOptions,
    _read_varint,
    _varint,
    decode_properties,
    encode_connect,
    encode_disconnect,
    encode_properties,
    encode_puback,
    encode_publish,
    encode_subscribe,
    publish_template,
    reason_name,
    topic_matches,
)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("\n", " "))


# -- paho as a reference -------------------------------------------------------------------------------


class _NoSocket:
    """Stands in for paho's socket, which it only checks for and closes here."""

    def close(self) -> None:
        pass


class PahoWire(paho.Client):
    """A paho client whose encoded packets land in `sent` instead of a socket."""

    def __init__(self, *, mqtt5: bool, client_id: str = "ref") -> None:
        super().__init__(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if mqtt5 else paho.MQTTv311,
            clean_session=None if mqtt5 else False,
        )
        self.sent: list[bytes] = []
        self._sock = cast(Any, _NoSocket())  # paho refuses to queue a PUBLISH without a socket
        self._clean_start = False

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: Any = None
    ) -> MQTTErrorCode:
        self.sent.append(bytes(packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def paho_properties(packet_type: int, **values: Any) -> PahoProperties:
    properties = PahoProperties(packet_type)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        if name == "UserProperty":
            for pair in value:
                properties.UserProperty = pair
        else:
            setattr(properties, name, value)
    return properties


def split_fixed_header(packet: bytes) -> tuple[int, bytes]:
    """Return (first byte, everything after the remaining length), as paho's decoders take them."""
    length, start = _read_varint(packet, 1, len(packet), "test")
    assert start + length == len(packet)
    return packet[0], packet[start:]


def paho_protocol(mqtt5: bool) -> MQTTProtocolVersion:
    return MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311


# -- Variable Byte Integer ----------------------------------------------------------------------------

VARINT_TABLE = [
    (0, "00"),
    (127, "7f"),
    (128, "80 01"),
    (16_383, "ff 7f"),
    (16_384, "80 80 01"),
    (2_097_151, "ff ff 7f"),
    (2_097_152, "80 80 80 01"),
    (268_435_455, "ff ff ff 7f"),
]


@pytest.mark.parametrize(("value", "encoded"), VARINT_TABLE)
def test_variable_byte_integer_matches_the_spec_table(value: int, encoded: str) -> None:
    assert _varint(value) == hexbytes(encoded)
    assert _read_varint(hexbytes(encoded), 0, len(hexbytes(encoded)), "t") == (value, len(hexbytes(encoded)))
    reference = PahoWire(mqtt5=True)._pack_remaining_length(bytearray(), value)
    assert bytes(reference) == hexbytes(encoded)


def test_variable_byte_integer_out_of_range_is_refused() -> None:
    with pytest.raises(EncodeError):
        _varint(268_435_456)
    with pytest.raises(MalformedPacketError, match="longer than 4 bytes"):
        _read_varint(hexbytes("ff ff ff ff 01"), 0, 5, "t")


# -- CONNECT ------------------------------------------------------------------------------------------


def test_connect_mqtt5_matches_the_emqx_capture() -> None:
    captured = hexbytes(
        "10 2f 00 04 4d 51 54 54 05 c2 00 3c 05 11 00 00 01 2c 00 0e 6d"
        " 71 74 74 78 5f 30 63 36 36 38 64 30 64 00 05 61 64 6d 69 6e 00"
        " 06 70 75 62 6c 69 63"
    )
    ours = encode_connect(
        "mqttx_0c668d0d",
        mqtt5=True,
        keepalive=60,
        clean_start=True,
        username="admin",
        password=b"public",
        session_expiry=300,
    )
    assert ours == captured


def test_connect_mqtt311_matches_the_digi_example() -> None:
    example = hexbytes("10 10 00 04 4d 51 54 54 04 02 00 3c 00 04 44 49 47 49")
    assert encode_connect("DIGI", mqtt5=False, keepalive=60, clean_start=True) == example


@pytest.mark.parametrize("mqtt5", [True, False])
@pytest.mark.parametrize("credentials", [None, ("tidegate", "s3cret"), ("only-user", None)])
def test_connect_matches_paho(mqtt5: bool, credentials: tuple[str, str | None] | None) -> None:
    wire = PahoWire(mqtt5=mqtt5, client_id="tidegate-gw")
    if credentials is not None:
        wire.username_pw_set(*credentials)
    if mqtt5:
        wire._connect_properties = paho_properties(
            PacketTypes.CONNECT, SessionExpiryInterval=86_400, ReceiveMaximum=65_535
        )
    wire._send_connect(30)
    username, password = credentials if credentials is not None else (None, None)
    ours = encode_connect(
        "tidegate-gw",
        mqtt5=mqtt5,
        keepalive=30,
        clean_start=False,
        username=username,
        password=password.encode() if password is not None else None,
        session_expiry=86_400 if mqtt5 else None,
        receive_maximum=65_535 if mqtt5 else None,
    )
    assert ours == wire.sent[0]


def test_connect_refuses_what_the_spec_forbids() -> None:
    with pytest.raises(EncodeError, match="password only together with a user name"):
        encode_connect("c", mqtt5=False, keepalive=30, clean_start=False, password=b"x")
    with pytest.raises(EncodeError, match="keepalive"):
        encode_connect("c", mqtt5=True, keepalive=70_000, clean_start=False)
    with pytest.raises(EncodeError, match="client id"):
        encode_connect("x" * 70_000, mqtt5=True, keepalive=30, clean_start=False)
    # MQTT 5 allows a password without a user name (spec 3.1.2.9)
    packet = encode_connect("c", mqtt5=True, keepalive=30, clean_start=False, password=b"x")
    assert packet[9] == 0x40


# -- PUBLISH ------------------------------------------------------------------------------------------


def test_publish_mqtt5_matches_the_emqx_capture() -> None:
    captured = hexbytes(
        "30 31 00 07 72 65 71 75 65 73 74 10 02 00 00 01 2c 08 00 08"
        " 72 65 73 70 6f 6e 73 65 54 68 69 73 20 69 73 20 61 20 51 6f"
        " 53 20 30 20 6d 65 73 73 61 67 65"
    )
    properties = Properties(message_expiry_interval=300, response_topic="response")
    ours = encode_publish("request", b"This is a QoS 0 message", mqtt5=True, properties=properties)
    assert ours == captured
    [decoded] = MqttDecoder(mqtt5=True).feed(captured)
    assert isinstance(decoded, Publish)
    assert (decoded.topic, decoded.payload, decoded.qos, decoded.mid) == (
        "request",
        b"This is a QoS 0 message",
        0,
        0,
    )
    assert decoded.properties == properties
    assert decoded.content_type is None


PUBLISH_CASES = [
    # (topic, payload, qos, retain, dup, packet id, property values by our names)
    ("devices/d-1/telemetry", b'{"t": 21.5}', 1, False, False, 1, {}),
    ("devices/d-1/commands", b"x" * 300, 1, True, True, 65_535, {"message_expiry_interval": 30}),
    ("a", b"", 0, True, False, 0, {"content_type": "application/json"}),
    (
        "devices/ü/commands",
        b"\x00\xff",
        1,
        False,
        False,
        4242,
        {
            "payload_format_indicator": 1,
            "message_expiry_interval": 3600,
            "content_type": "application/json",
            "response_topic": "devices/ü/commands/ack",
            "correlation_data": b"6f1c0d8e9b2a4f7e",
            "user_property": (("source", "tidegate"), ("source", "rule")),
        },
    ),
    ("big", b"y" * 20_000, 1, False, False, 7, {}),
]
# The same PUBLISH properties by the names paho gives them, for building paho's side of a comparison.
PAHO_NAMES = {
    "payload_format_indicator": "PayloadFormatIndicator",
    "message_expiry_interval": "MessageExpiryInterval",
    "content_type": "ContentType",
    "response_topic": "ResponseTopic",
    "correlation_data": "CorrelationData",
    "user_property": "UserProperty",
}


def paho_publish_properties(values: dict[str, Any]) -> PahoProperties:
    return paho_properties(PacketTypes.PUBLISH, **{PAHO_NAMES[name]: value for name, value in values.items()})


@pytest.mark.parametrize("mqtt5", [True, False])
@pytest.mark.parametrize(("topic", "payload", "qos", "retain", "dup", "packet_id", "props"), PUBLISH_CASES)
def test_publish_is_byte_identical_to_paho_and_decodes_both_ways(
    mqtt5: bool,
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int,
    props: dict[str, Any],
) -> None:
    if not mqtt5:
        props = {}
    wire = PahoWire(mqtt5=mqtt5)
    paho_props = paho_publish_properties(props) if props else None
    wire._send_publish(packet_id, topic.encode(), payload, qos, retain, dup, None, paho_props)
    ours = encode_publish(
        topic,
        payload,
        mqtt5=mqtt5,
        qos=qos,
        retain=retain,
        dup=dup,
        packet_id=packet_id,
        properties=Properties(**props) if props else None,
    )
    assert ours == wire.sent[0]
    # ours decoded by paho
    first, rest = split_fixed_header(ours)
    theirs = paho_packet.decode_publish(first, rest, paho_protocol(mqtt5))
    assert (theirs.topic.decode(), theirs.payload, theirs.qos, theirs.retain, theirs.dup, theirs.mid) == (
        topic,
        payload,
        qos,
        retain,
        dup,
        packet_id,
    )
    # paho's decoded by ours (the broker sends the same PUBLISH layout to subscribers)
    [decoded] = MqttDecoder(mqtt5=mqtt5).feed(wire.sent[0])
    assert isinstance(decoded, Publish)
    assert (decoded.topic, decoded.payload, decoded.qos, decoded.retain, decoded.dup, decoded.mid) == (
        topic,
        payload,
        qos,
        retain,
        dup,
        packet_id,
    )
    assert decoded.content_type == props.get("content_type")
    assert decoded.properties == Properties(**props)


def test_publish_properties_are_parsed_once_per_distinct_block() -> None:
    json_type = Properties(content_type="application/json")
    stream = b"".join(
        encode_publish(
            f"devices/d-{i}/telemetry", b"{}", mqtt5=True, qos=1, packet_id=i + 1, properties=json_type
        )
        for i in range(3)
    ) + encode_publish("t", b"p", mqtt5=True)
    first, second, third, plain = MqttDecoder(mqtt5=True).feed(stream)
    assert isinstance(first, Publish) and isinstance(second, Publish) and isinstance(third, Publish)
    assert first.content_type == "application/json"
    assert first.properties is second.properties is third.properties  # one object, parsed once
    assert isinstance(plain, Publish)
    assert plain.properties is NO_PROPERTIES
    assert plain.content_type is None
    assert plain.properties.content_type is None
    assert not hasattr(plain.properties, "ContentType")  # paho's spelling is paho's only


def test_publish_template_leaves_room_for_the_packet_id() -> None:
    packet, offset = publish_template("a/b", b"xyz", mqtt5=True, qos=1)
    packet[offset : offset + 2] = (513).to_bytes(2, "big")
    assert bytes(packet) == encode_publish("a/b", b"xyz", mqtt5=True, qos=1, packet_id=513)
    assert publish_template("a/b", b"xyz", mqtt5=True, qos=0)[1] == -1


@pytest.mark.parametrize(
    ("topic", "kwargs", "message"),
    [
        ("", {}, "must not be empty"),
        ("devices/+/commands", {}, "wildcard"),
        ("devices/#", {}, "wildcard"),
        ("a\x00b", {}, "U\\+0000"),
        ("x" * 65_536, {}, "at most 65535"),
        ("t", {"qos": 1, "packet_id": 0}, "between 1 and 65535"),
        ("t", {"qos": 1, "packet_id": 65_536}, "between 1 and 65535"),
        ("t", {"qos": 3}, "QoS must be 0, 1 or 2"),
        ("t", {"dup": True}, "DUP must be off"),
        ("t", {"properties": Properties(session_expiry_interval=5)}, "cannot be sent"),
        ("t", {"properties": Properties(message_expiry_interval=-1)}, "between 0 and"),
    ],
)
def test_publish_refuses_what_cannot_be_sent(topic: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        encode_publish(topic, b"", mqtt5=True, **kwargs)


def test_publish_properties_need_mqtt5() -> None:
    with pytest.raises(EncodeError, match="need MQTT 5"):
        encode_publish("t", b"", mqtt5=False, properties=Properties(content_type="x"))


# -- SUBSCRIBE, PUBACK, PINGREQ, DISCONNECT -----------------------------------------------------------


def test_subscribe_mqtt311_matches_the_spec_example() -> None:
    example = hexbytes("82 0e 00 0a 00 03 61 2f 62 01 00 03 63 2f 64 02")
    assert encode_subscribe(10, [("a/b", 1), ("c/d", 2)], mqtt5=False) == example


@pytest.mark.parametrize("mqtt5", [True, False])
def test_subscribe_matches_paho(mqtt5: bool) -> None:
    options = [
        SubscribeOptions(qos=1),
        SubscribeOptions(qos=0, no_local=True, retain_as_published=True, retain_handling=2),
        SubscribeOptions(qos=1, retain_handling=1),
    ]
    filters = ["devices/+/telemetry", "devices/+/status", "$share/g/devices/#"]
    wire = PahoWire(mqtt5=mqtt5)
    wire._last_mid = 99  # paho numbers it 100
    paho_topics: list[tuple[bytes, Any]] = [
        (
            f.encode(),
            PahoSubscribeOptions(o.qos, o.no_local, o.retain_as_published, o.retain_handling)
            if mqtt5
            else o.qos,
        )
        for f, o in zip(filters, options, strict=True)
    ]
    wire._send_subscribe(False, paho_topics)
    ours_options = options if mqtt5 else [SubscribeOptions(qos=o.qos) for o in options]
    assert encode_subscribe(100, list(zip(filters, ours_options, strict=True)), mqtt5=mqtt5) == wire.sent[0]


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "#/a"])
def test_subscribe_refuses_invalid_filters(bad: str) -> None:
    with pytest.raises(EncodeError):
        encode_subscribe(1, [(bad, 1)], mqtt5=True)


def test_puback_pingreq_disconnect_vectors_and_paho() -> None:
    assert encode_puback(1, mqtt5=False) == hexbytes("40 02 00 01")
    assert encode_puback(0x1234, mqtt5=True) == hexbytes("40 02 12 34")  # reason 0 left out (3.4.2.1)
    assert encode_puback(7, 0x10, mqtt5=True) == hexbytes("40 03 00 07 10")
    assert hexbytes("c0 00") == PINGREQ_PACKET
    assert encode_disconnect(mqtt5=True) == DISCONNECT_PACKET == hexbytes("e0 00")
    assert encode_disconnect(0x04, mqtt5=True) == hexbytes("e0 01 04")
    assert encode_disconnect(mqtt5=True, session_expiry=0) == hexbytes("e0 07 00 05 11 00 00 00 00")
    wire = PahoWire(mqtt5=True)
    wire._send_puback(0x1234)
    wire._send_simple_command(paho.PINGREQ)
    wire._send_disconnect()
    assert wire.sent == [encode_puback(0x1234, mqtt5=True), PINGREQ_PACKET, DISCONNECT_PACKET]
    with pytest.raises(EncodeError):
        encode_puback(1, 0x80, mqtt5=False)
    with pytest.raises(EncodeError):
        encode_disconnect(0x04, mqtt5=False)


# -- decoding what the broker sends -------------------------------------------------------------------


def decode_one(data: bytes, *, mqtt5: bool = True) -> Packet:
    packets = MqttDecoder(mqtt5=mqtt5).feed(data)
    assert len(packets) == 1, packets
    return packets[0]


CONNACK_V5_WITH_PROPERTIES = hexbytes(
    "20 2b"  # CONNACK, remaining length 43
    " 01 00"  # session present, Success
    " 28"  # property length 40
    " 11 00 00 0e 10"  # Session Expiry Interval 3600
    " 21 00 14"  # Receive Maximum 20
    " 24 01"  # Maximum QoS 1
    " 27 00 10 00 00"  # Maximum Packet Size 1048576
    " 12 00 04 61 75 74 6f"  # Assigned Client Identifier "auto"
    " 13 00 3c"  # Server Keep Alive 60
    " 1f 00 02 6f 6b"  # Reason String "ok"
    " 26 00 01 6b 00 01 76"  # User Property ("k", "v")
    " 22 00 0a"  # Topic Alias Maximum 10
)


def test_connack_mqtt5_properties() -> None:
    connack = decode_one(CONNACK_V5_WITH_PROPERTIES)
    assert connack == ConnAck(
        session_present=True,
        reason_code=0,
        properties=Properties(
            session_expiry_interval=3600,
            receive_maximum=20,
            maximum_qos=1,
            maximum_packet_size=1_048_576,
            assigned_client_identifier="auto",
            server_keep_alive=60,
            reason_string="ok",
            user_property=(("k", "v"),),
            topic_alias_maximum=10,
        ),
    )
    first, rest = split_fixed_header(CONNACK_V5_WITH_PROPERTIES)
    theirs = paho_packet.decode_connack(first, rest, MQTTProtocolVersion.MQTTv5)
    assert theirs.properties is not None
    assert getattr(theirs.properties, "ReceiveMaximum", None) == 20
    assert getattr(theirs.properties, "AssignedClientIdentifier", None) == "auto"
    assert getattr(theirs.properties, "ServerKeepAlive", None) == 60


@pytest.mark.parametrize(
    ("data", "mqtt5", "expected"),
    [
        ("20 02 00 00", False, ConnAck(False, 0)),
        ("20 02 01 00", False, ConnAck(True, 0)),
        ("20 02 00 05", False, ConnAck(False, 5)),  # 3.1.1: not authorized
        ("20 03 00 87 00", True, ConnAck(False, 0x87)),  # 5.0: Not authorized, no properties
        ("20 02 00 00", True, ConnAck(False, 0)),  # 5.0 broker leaving out an empty property block
        (
            "20 09 00 86 06 1f 00 03 62 61 64",
            True,
            ConnAck(False, 0x86, Properties(reason_string="bad")),
        ),
    ],
)
def test_connack(data: str, mqtt5: bool, expected: ConnAck) -> None:
    assert decode_one(hexbytes(data), mqtt5=mqtt5) == expected


def test_connack_reason_names() -> None:
    assert reason_name(5, mqtt5=False, connack=True) == "Not authorized"
    assert reason_name(0x87) == "Not authorized"
    assert reason_name(0x86) == "Bad User Name or Password"
    assert reason_name(0x80, mqtt5=False) == "Failure"
    assert "0x7e" in reason_name(0x7E)


@pytest.mark.parametrize(
    ("data", "mqtt5", "expected"),
    [
        ("90 03 00 0a 01", False, SubAck(10, (1,))),
        ("90 05 00 0a 01 80 00", False, SubAck(10, (1, 0x80, 0))),
        ("90 05 00 0b 00 01 87", True, SubAck(11, (1, 0x87))),
        (
            "90 09 00 0b 05 1f 00 02 6e 6f 87",
            True,
            SubAck(11, (0x87,), Properties(reason_string="no")),
        ),
        ("40 02 00 05", False, PubAck(5)),
        ("40 02 00 05", True, PubAck(5)),
        ("40 03 00 05 10", True, PubAck(5, 0x10)),
        ("40 04 00 05 87 00", True, PubAck(5, 0x87)),
        ("40 08 00 05 87 04 1f 00 01 78", True, PubAck(5, 0x87, Properties(reason_string="x"))),
        ("d0 00", True, PingResp()),
        ("e0 00", True, Disconnect(0)),
        ("e0 01 8b", True, Disconnect(0x8B)),
        ("e0 08 8b 06 1f 00 03 62 79 65", True, Disconnect(0x8B, Properties(reason_string="bye"))),
    ],
)
def test_control_packets(data: str, mqtt5: bool, expected: Packet) -> None:
    assert decode_one(hexbytes(data), mqtt5=mqtt5) == expected


def test_suback_and_puback_agree_with_paho() -> None:
    suback = hexbytes("90 09 00 0b 05 1f 00 02 6e 6f 87")
    first, rest = split_fixed_header(suback)
    theirs = paho_packet.decode_suback(first, rest, MQTTProtocolVersion.MQTTv5)
    ours = decode_one(suback)
    assert isinstance(ours, SubAck)
    assert (ours.packet_id, list(ours.reason_codes)) == (theirs.mid, [c.value for c in theirs.reason_codes])
    puback = hexbytes("40 08 00 05 87 04 1f 00 01 78")
    first, rest = split_fixed_header(puback)
    paho_ack = paho_packet.decode_puback(first, rest, MQTTProtocolVersion.MQTTv5)
    ours_ack = decode_one(puback)
    assert isinstance(ours_ack, PubAck)
    assert (ours_ack.packet_id, ours_ack.reason_code) == (paho_ack.mid, paho_ack.reason.value)
    assert ours_ack.properties.reason_string == getattr(paho_ack.properties, "ReasonString", None) == "x"


def test_topics_are_decoded_once_and_shared() -> None:
    decoder = MqttDecoder(mqtt5=True)
    stream = b"".join(encode_publish("devices/d-7/telemetry", bytes([i]), mqtt5=True) for i in range(3))
    first, second, third = decoder.feed(stream)
    assert isinstance(first, Publish) and isinstance(second, Publish) and isinstance(third, Publish)
    assert first.topic is second.topic is third.topic  # one str: its hash is computed once downstream
    assert [first.payload, second.payload, third.payload] == [b"\x00", b"\x01", b"\x02"]


def test_topic_cache_is_bounded() -> None:
    decoder = MqttDecoder(mqtt5=False)
    for i in range(TOPIC_CACHE_SIZE + 10):
        decoder.feed(encode_publish(f"t/{i}", b"", mqtt5=False))
    assert len(decoder._topics) <= TOPIC_CACHE_SIZE


# -- fragmentation ------------------------------------------------------------------------------------

_topic_level = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="+#/\x00"),
    min_size=1,
    max_size=8,
)
_topic = st.lists(_topic_level, min_size=1, max_size=4).map("/".join)
_properties = st.builds(
    Properties,
    message_expiry_interval=st.none() | st.integers(0, 2**32 - 1),
    content_type=st.none()
    | st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),
    correlation_data=st.none() | st.binary(max_size=20),
    user_property=st.lists(
        st.tuples(st.text(max_size=5).filter(lambda s: "\x00" not in s), st.just("v")), max_size=2
    ).map(tuple),
)


@st.composite
def broker_packet(draw: st.DrawFn, mqtt5: bool) -> bytes:
    kind = draw(st.sampled_from(["publish", "publish", "publish", "puback", "pingresp", "suback", "connack"]))
    if kind == "publish":
        qos = draw(st.integers(0, 1))
        return encode_publish(
            draw(_topic),
            draw(st.binary(max_size=300)),
            mqtt5=mqtt5,
            qos=qos,
            retain=draw(st.booleans()),
            dup=qos == 1 and draw(st.booleans()),
            packet_id=draw(st.integers(1, 65_535)) if qos else 0,
            properties=draw(_properties) if mqtt5 else None,
        )
    if kind == "puback":
        return struct.pack("!BBH", 0x40, 2, draw(st.integers(1, 65_535)))
    if kind == "pingresp":
        return hexbytes("d0 00")
    if kind == "suback":
        codes = draw(st.lists(st.sampled_from([0, 1, 0x80]), min_size=1, max_size=3))
        body = struct.pack("!H", draw(st.integers(1, 65_535))) + (b"\x00" if mqtt5 else b"") + bytes(codes)
        return bytes((0x90, len(body))) + body
    return hexbytes("20 03 01 00 00") if mqtt5 else hexbytes("20 02 01 00")


@settings(max_examples=200, deadline=None)
@given(data=st.data(), mqtt5=st.booleans())
def test_any_split_of_a_stream_decodes_to_the_same_packets(data: st.DataObject, mqtt5: bool) -> None:
    packets = data.draw(st.lists(broker_packet(mqtt5), min_size=1, max_size=12))
    stream = b"".join(packets)
    whole = MqttDecoder(mqtt5=mqtt5).feed(stream)
    assert len(whole) == len(packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = MqttDecoder(mqtt5=mqtt5)
    pieces: list[Packet] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        pieces += decoder.feed(stream[start:cut])
        start = cut
    assert pieces == whole
    assert decoder.buffered == 0


def test_byte_by_byte_and_large_packets() -> None:
    payload = bytes(range(256)) * 1200  # a 300 KiB payload: a 3-byte remaining length
    stream = encode_publish("big", payload, mqtt5=True, qos=1, packet_id=9) + hexbytes("d0 00")
    decoder = MqttDecoder(mqtt5=True)
    got: list[Packet] = []
    for index in range(0, 40):
        got += decoder.feed(stream[index : index + 1])
    got += decoder.feed(memoryview(stream)[40:100_000])
    assert got == []
    got += decoder.feed(bytearray(stream[100_000:]))
    assert len(got) == 2
    assert isinstance(got[0], Publish) and got[0].payload == payload and got[0].mid == 9
    assert got[1] == PingResp()


# -- malformed input ----------------------------------------------------------------------------------

MALFORMED = [
    ("30 ff ff ff ff 7f", True, "longer than 4 bytes"),
    ("30 05 00 09 61 62 63", True, "shorter than its fields|past"),  # topic length 9 in a 5-byte body
    ("32 04 00 01 61 00", True, "shorter than its fields|no property length"),  # packet id cut short
    ("32 05 00 01 61 00 00", False, "packet identifier 0"),
    ("36 05 00 01 61 00 01", False, "QoS 3"),
    ("38 03 00 01 61", False, "DUP set on a QoS 0"),
    ("30 03 00 00 00", True, "empty topic"),
    ("30 04 00 02 ff fe", False, "not valid UTF-8"),
    ("30 05 00 03 61 2f 2b", False, "wildcard"),
    ("30 07 00 01 61 03 7f 00 00", True, "unknown property identifier"),
    ("30 09 00 01 61 05 03 00 05 61 62", True, "runs past"),
    ("30 0b 00 01 61 07 02 00 00 00 01 02 00", True, "runs past"),
    ("30 0e 00 01 61 0a 02 00 00 00 01 02 00 00 00 02", True, "more than once"),
    ("30 06 00 01 61 05 01 00", True, "properties run past the packet"),
    ("41 02 00 01", True, "reserved flags"),
    ("40 01 00", True, "PUBACK with remaining length 1"),
    ("40 03 00 01 00", False, "PUBACK with remaining length 3"),
    ("40 05 00 01 00 05 00", True, "property length 5 does not match"),
    ("20 03 00 00 00", False, "CONNACK with remaining length 3"),
    ("20 02 02 00", True, "CONNACK: reserved flags"),
    ("90 02 00 01", True, "SUBACK with remaining length 2"),
    ("90 03 00 01 00", True, "without reason codes"),
    ("d0 01 00", True, "PINGRESP with remaining length 1"),
    ("e0 00", False, "DISCONNECT from an MQTT 3.1.1 broker"),
    ("10 00", True, "unexpected CONNECT"),
    ("50 02 00 01", True, "unexpected PUBREC"),
    ("f0 00", True, "unexpected AUTH"),
]


@pytest.mark.parametrize(("data", "mqtt5", "message"), MALFORMED)
def test_malformed_packets_are_refused(data: str, mqtt5: bool, message: str) -> None:
    with pytest.raises(MalformedPacketError, match=message):
        MqttDecoder(mqtt5=mqtt5).feed(hexbytes(data))


def test_a_packet_over_the_size_limit_is_refused_from_its_header() -> None:
    decoder = MqttDecoder(mqtt5=True, max_packet_size=1024)
    with pytest.raises(MalformedPacketError, match="exceeds the maximum packet size"):
        decoder.feed(hexbytes("30 80 10"))  # announces 2048 bytes; none of them needed to refuse it


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=200), mqtt5=st.booleans())
def test_garbage_raises_only_codec_errors(garbage: bytes, mqtt5: bool) -> None:
    with contextlib.suppress(MqttCodecError):  # anything else (IndexError, ...) fails the test
        MqttDecoder(mqtt5=mqtt5).feed(garbage)


# -- properties, topic filters ------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(properties=_properties)
def test_properties_round_trip_and_match_paho(properties: Properties) -> None:
    encoded = encode_properties(properties)
    _, start = _read_varint(encoded, 0, len(encoded), "t")
    assert decode_properties(encoded[start:]) == properties
    theirs = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    theirs.unpack(encoded)  # type: ignore[no-untyped-call]
    for name in ("message_expiry_interval", "content_type", "correlation_data"):
        assert getattr(theirs, PAHO_NAMES[name], None) == getattr(properties, name)


def test_properties_of_another_library_are_refused() -> None:
    theirs = paho_publish_properties({"correlation_data": b"id-1"})
    with pytest.raises(EncodeError, match=r"must be gateway\.mqttcodec\.Properties, got Properties"):
        encode_publish("t", b"p", mqtt5=True, properties=theirs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("devices/+/telemetry", "devices/d-1/telemetry", True),
        ("devices/+/telemetry", "devices/d-1/status", False),
        ("devices/+/telemetry", "devices/d-1/telemetry/x", False),
        ("devices/+/telemetry", "devices//telemetry", True),  # an empty level is a level
        ("devices/+/commands/ack", "devices/d-1/commands/ack", True),
        ("devices/#", "devices", True),  # '#' includes the parent level (spec 4.7.1.2)
        ("devices/#", "devices/a/b/c", True),
        ("#", "$SYS/broker/uptime", False),  # wildcards at the first level skip $ topics (4.7.2)
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$share/group/devices/+/telemetry", "devices/d/telemetry", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches
