"""Payload decoding: every accepted shape and every rejection reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.errors import PayloadError
from devices.payload import INT64_MAX, PayloadDecoder

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
        (b'{"t": ' + b"9" * 4000 + b"}", "outside int64"),
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
    fields.pop("ts", None)
    fields.pop("seq", None)
    if not fields:
        return
    [event] = decoder.decode("dev-1", json.dumps(fields).encode(), NOW)
    assert dict(event.fields) == fields
