"""Payload decoding: every accepted shape and every rejection reason."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import devices.payload as payload_module
from devices.errors import PayloadError
from devices.payload import INT64_MAX, PayloadDecoder, content_type_format

NOW = 1_764_000_000.0
decoder = PayloadDecoder(max_bytes=4096, max_batch=5, max_fields=3, max_string=10)


def test_object_with_ts_and_seq() -> None:
    [event] = decoder.decode(
        "d1", b'{"ts": 1763999999.5, "seq": 7, "t": 21.5, "on": true, "mode": "auto"}', NOW
    )
    assert (event.device_id, event.ts, event.seq) == ("d1", 1763999999.5, 7)
    assert event.fields == {"t": 21.5, "on": True, "mode": "auto"}


def test_missing_ts_uses_receive_time() -> None:
    [event] = decoder.decode("d1", b'{"t": 1}', NOW)
    assert event.ts == NOW and event.seq is None


def test_rfc3339_timestamp() -> None:
    [event] = decoder.decode("d1", b'{"ts": "2025-11-24T16:00:00.250+00:00", "t": 1}', NOW)
    assert event.ts == 1764000000.25


def test_array_of_objects() -> None:
    events = decoder.decode("d1", b'[{"seq": 1, "t": 1}, {"seq": 2, "t": 2}]', NOW)
    assert [e.seq for e in events] == [1, 2]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty payload"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "invalid JSON"),
        (b"42", "must be a JSON object or array"),
        (b"[]", "empty batch"),
        (b"[1]", "[0] batch items must be JSON objects"),
        (b'{"t": NaN}', "NaN is not a number"),
        (b'{"t": -Infinity}', "-Infinity is not a number"),
        (b'{"t": 1e400}', "overflows a double"),
        (b'{"t": 9223372036854775808}', "outside int64"),
        (b'{"t": ' + b"9" * 4000 + b"}", "outside int64"),  # beyond UNCHECKED_NUMBERS_MAX_BYTES
        (b'{"t": ' + b"9" * 2000 + b"}", "field 't': integer of 6644 bits is outside int64"),
        (b'{"t": -9223372036854775809}', "field 't': integer -9223372036854775809 is outside int64"),
        (b'{"t": -1e400}', "field 't': number overflows a double"),
        (b'{"t": 1e400}' + b" " * 3000, "invalid JSON: number 1e400 overflows a double"),  # hooks
        (b'[{"t": 1}, {"t": 1e400}]', "[1] field 't': number overflows a double"),
        (b'{"t": 1, "u": [1e400]}', "field 'u' must be a number, bool or string, got list"),
        (b'{"ts": 1e400, "t": 1}', "ts: number overflows a double"),
        (b'{"ts": ' + b"9" * 1000 + b', "t": 1}', "ts: integer of 3322 bits is outside int64"),
        (b'{"seq": 9223372036854775808, "t": 1}', "seq: integer 9223372036854775808 is outside int64"),
        (b'{"seq": true, "t": 1}', "seq must be a non-negative integer, got True"),
        (b'{"seq": null, "t": 1}', "seq must be a non-negative integer, got None"),
        (b'{"ts": null, "t": 1}', "ts must be epoch seconds or RFC 3339 text, got NoneType"),
        (b'{"t": 1} x', "invalid JSON: Extra data"),
        (b" ", "invalid JSON: Expecting value"),
        (b'{"t": {"nested": 1}}', "must be a number, bool or string, got dict"),
        (b'{"t": [1]}', "got list"),
        (b'{"t": null}', "got NoneType"),
        (b'{"ts": "yesterday", "t": 1}', "is not RFC 3339"),
        (b'{"ts": "2025-11-24T16:00:00", "t": 1}', "no time zone"),
        (b'{"ts": 1764000000000, "t": 1}', "outside the accepted time window"),
        (b'{"ts": true, "t": 1}', "ts must be epoch seconds"),
        (b'{"seq": -1, "t": 1}', "seq must be a non-negative integer"),
        (b'{"seq": 1.5, "t": 1}', "seq must be a non-negative integer"),
        (b'{"seq": 1}', "no metric fields"),
        (b'{"a b": 1}', "field name 'a b' is not allowed"),
        (b'{"t\\n": 1}', "is not allowed"),
        (b'{"s": "01234567890"}', "string longer than 10"),
        (b'{"a": 1, "b": 2, "c": 3, "d": 4}', "4 fields exceed 3"),
        (b"[" + b'{"t":1},' * 5 + b'{"t":1}]', "batch of 6 exceeds 5"),
        (b"[" * 3000 + b"]" * 3000, "exceeds 4096"),
        (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
    ],
)
def test_rejections_name_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        decoder.decode("d1", payload, NOW)
    assert reason in info.value.reason
    assert info.value.device_id == "d1"


@pytest.mark.parametrize("device_id", ["", "a b", "a,b", "a\nb", "a/b", "+", "#", "x" * 200, "-lead"])
def test_device_id_allow_list(device_id: str) -> None:
    with pytest.raises(PayloadError, match="device id"):
        decoder.decode(device_id, b'{"t": 1}', NOW)


@pytest.mark.parametrize("digits", [5_000, 40_000])
def test_huge_integers_are_refused_before_int_builds_them(digits: int) -> None:
    # RELIABILITY I3: above UNCHECKED_NUMBERS_MAX_BYTES the parse hook refuses the text itself
    with pytest.raises(PayloadError) as info:
        PayloadDecoder().decode("d1", b'{"t": ' + b"9" * digits + b"}", NOW)
    assert info.value.reason == "invalid JSON: integer 999999999999999999999999... is outside int64"


def test_pythons_integer_digit_limit_is_a_clean_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    # Were the unchecked parse used for a 5000-digit integer, int() would refuse it (sys.int_info)
    monkeypatch.setattr(payload_module, "UNCHECKED_NUMBERS_MAX_BYTES", 100_000)
    with pytest.raises(PayloadError) as info:
        PayloadDecoder().decode("d1", b'{"t": ' + b"9" * 5000 + b"}", NOW)
    assert info.value.reason == (
        f"invalid JSON: an integer has more than {sys.get_int_max_str_digits()} digits (outside int64)"
    )


@pytest.mark.parametrize("payload", [b' {"t": 1}', b'{"t": 1}\n', b'\t[{"t": 1}] '])
def test_whitespace_around_the_document_is_allowed(payload: bytes) -> None:
    assert [dict(e.fields) for e in decoder.decode("d1", payload, NOW)] == [{"t": 1}]


def test_valid_device_ids_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payload_module, "MAX_CACHED_IDS", 2)
    fresh = PayloadDecoder()
    for device_id in ("a", "b", "c"):
        fresh.decode(device_id, b'{"t": 1}', NOW)
    assert fresh._ids == {"c"}  # emptied when full
    with pytest.raises(PayloadError, match="device id 'a b' is not allowed"):
        fresh.decode("a b", b'{"t": 1}', NOW)
    assert fresh._ids == {"c"}


def test_int64_bounds_are_accepted() -> None:
    [event] = decoder.decode("d1", f'{{"a": {INT64_MAX}, "b": {-INT64_MAX - 1}}}'.encode(), NOW)
    assert event.fields == {"a": INT64_MAX, "b": -INT64_MAX - 1}


values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)


@given(
    st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True), values, min_size=1, max_size=3)
)
def test_round_trip_of_valid_objects(fields: dict[str, object]) -> None:
    for reserved in ("ts", "seq", "device", "device_id"):
        fields.pop(reserved, None)
    if not fields:
        return
    [event] = decoder.decode("dev-1", json.dumps(fields).encode(), NOW)
    assert dict(event.fields) == fields


# -- identity (RELIABILITY I6) and content types -----------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b'{"device": "d1", "t": 1}',
        b'{"device_id": "d1", "t": 1}',
        b'{"device": "d1", "device_id": "d1", "t": 1}',
        b'[{"device": "d1", "t": 1}, {"t": 1}]',
    ],
)
def test_a_payload_may_name_its_own_device(payload: bytes) -> None:
    events = decoder.decode("d1", payload, NOW)
    assert all(dict(e.fields) == {"t": 1} and e.device_id == "d1" for e in events)  # not stored as a field


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"device": "d2", "t": 1}', "'device' names device 'd2', but the topic is for device 'd1'"),
        (b'{"t": 1, "device_id": "D1"}', "'device_id' names device 'D1', but the topic is for device 'd1'"),
        (b'{"device": "d1", "device_id": "d2", "t": 1}', "'device_id' names device 'd2'"),
        (b'{"device": 1, "t": 1}', "'device' names device 1, but"),
        (b'{"device": null, "t": 1}', "'device' names device None, but"),
        (b'{"device": ["d1"], "t": 1}', "'device' names device ['d1'], but"),
        (b'{"device": "d1 ", "t": 1}', "'device' names device 'd1 ', but"),
        (b'[{"t": 1}, {"device": "d2", "t": 1}]', "[1] 'device' names device 'd2', but"),
        pytest.param(
            b'{"device": "' + b"x" * 500 + b'", "t": 1}',
            "'device' names device '" + "x" * 80 + "', but",
            id="long",
        ),
    ],
)
def test_a_payload_naming_another_device_is_rejected(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        decoder.decode("d1", payload, NOW)
    assert info.value.reason.startswith(reason)
    assert info.value.device_id == "d1"


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", "json"),
        ("application/senml+json", "senml"),
        ("Application/JSON; charset=utf-8", "json"),
        ("application/senml+json ;charset=UTF-8", "senml"),
    ],
)
def test_content_types(content_type: str, expected: str) -> None:
    assert content_type_format(content_type) == expected


@pytest.mark.parametrize(
    "content_type", ["", "text/plain", "application/senml+cbor", "application/jsonx", "application/cbor"]
)
def test_other_content_types_are_rejected(content_type: str) -> None:
    with pytest.raises(PayloadError) as info:
        content_type_format(content_type)
    assert info.value.reason == (
        f"unsupported content type {content_type!r} (expected application/json or application/senml+json)"
    )


def test_checked_field_names_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payload_module, "MAX_CACHED_NAMES", 2)
    fresh = PayloadDecoder()
    for name in ("a", "b", "c", "d"):
        [event] = fresh.decode("d1", f'{{"{name}": 1}}'.encode(), NOW)
        assert dict(event.fields) == {name: 1}
    assert fresh._names == {"a", "b"}
    with pytest.raises(PayloadError, match="field name 'a b' is not allowed"):
        fresh.decode("d1", b'{"a": 1, "a b": 1}', NOW)
