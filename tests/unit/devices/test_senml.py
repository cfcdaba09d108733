"""SenML JSON (RFC 8428) decoding: the RFC's own examples, base fields, identity and every rejection.

The vectors in the first part are the examples of RFC 8428 section 5.1, adapted where tidegate's
name rule needs a field after the device id (`<device id>:<field>`).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.errors import PayloadError
from devices.payload import PayloadDecoder
from devices.senml import RELATIVE_TIME_LIMIT, SenmlDecoder

NOW = 1_764_000_000.0
OW = "urn:dev:ow:10e2073a01080063"  # the 1-wire device of the RFC's examples
decoder = SenmlDecoder(max_bytes=4096, max_batch=20, max_fields=4, max_string=16)


def decode(pack: list[dict[str, object]], device_id: str = "gh-1") -> list[tuple[float, dict[str, object]]]:
    events = decoder.decode(device_id, json.dumps(pack).encode(), NOW)
    assert all(event.device_id == device_id for event in events)
    return [(event.ts, dict(event.fields)) for event in events]


def reject(pack: object, device_id: str = "gh-1") -> str:
    payload = pack if isinstance(pack, bytes) else json.dumps(pack).encode()
    with pytest.raises(PayloadError) as info:
        decoder.decode(device_id, payload, NOW)
    assert info.value.device_id == device_id
    return info.value.reason


# -- RFC 8428 section 5.1 -----------------------------------------------------------------------------


def test_rfc_5_1_1_single_data_point_taken_now() -> None:
    # The RFC names the sensor itself; tidegate needs the field after the device id.
    assert decode([{"n": f"{OW}:temp", "u": "Cel", "v": 23.1}], OW) == [(NOW, {"temp": 23.1})]
    assert "is the device itself" in reject([{"n": OW, "u": "Cel", "v": 23.1}], OW)


def test_rfc_5_1_2_multiple_data_points_now() -> None:
    pack = [{"bn": f"{OW}:", "n": "voltage", "u": "V", "v": 120.1}, {"n": "current", "u": "A", "v": 1.2}]
    assert decode(pack, OW) == [(NOW, {"voltage": 120.1, "current": 1.2})]


def test_rfc_5_1_2_relative_times_against_a_base_time() -> None:
    bt = 1.276020076001e09  # Tue Jun 8 18:01:16.001 UTC 2010
    pack: list[dict[str, object]] = [
        {
            "bn": "urn:dev:ow:10e2073a0108006:",
            "bt": bt,
            "bu": "A",
            "bver": 5,
            "n": "voltage",
            "u": "V",
            "v": 120.1,
        },
        {"n": "current", "t": -5, "v": 1.2},
        {"n": "current", "t": -4, "v": 1.3},
        {"n": "current", "t": -3, "v": 1.4},
        {"n": "current", "t": -2, "v": 1.5},
        {"n": "current", "t": -1, "v": 1.6},
        {"n": "current", "v": 1.7},
    ]
    assert decode(pack, "urn:dev:ow:10e2073a0108006") == [
        (bt - 5, {"current": 1.2}),
        (bt - 4, {"current": 1.3}),
        (bt - 3, {"current": 1.4}),
        (bt - 2, {"current": 1.5}),
        (bt - 1, {"current": 1.6}),
        (bt, {"voltage": 120.1, "current": 1.7}),
    ]


def test_rfc_5_1_3_readings_told_apart_only_by_unit_are_rejected() -> None:
    pack = [
        {"bn": f"{OW}:humidity", "bt": 1.320067464e09, "bu": "%RH", "v": 20},
        {"u": "lon", "v": 24.30621},
    ]
    assert reject(pack, OW) == (
        "[1] field 'humidity' appears twice at time 1320067464.0 (tidegate tells readings apart by name, not by unit)"
    )


def test_rfc_5_1_3_with_distinct_names() -> None:
    pack: list[dict[str, object]] = [
        {"bn": f"{OW}:", "bt": 1.320067464e09, "n": "humidity", "bu": "%RH", "v": 20},
        {"n": "lon", "u": "lon", "v": 24.30621},
        {"n": "lat", "u": "lat", "v": 60.07965},
        {"n": "humidity", "t": 60, "v": 20.3},
        {"n": "battery", "u": "%EL", "t": 150, "v": 98},
    ]
    assert decode(pack, OW) == [
        (1_320_067_464.0, {"humidity": 20, "lon": 24.30621, "lat": 60.07965}),
        (1_320_067_524.0, {"humidity": 20.3}),
        (1_320_067_614.0, {"battery": 98}),
    ]


def test_rfc_5_1_5_multiple_data_types() -> None:
    pack: list[dict[str, object]] = [
        {"bn": f"{OW}:", "n": "temp", "u": "Cel", "v": 23.1},
        {"n": "label", "vs": "Machine Room"},
        {"n": "open", "vb": False},
    ]
    assert decode(pack, OW) == [(NOW, {"temp": 23.1, "label": "Machine Room", "open": False})]
    pack.append({"n": "nfv-reader", "vd": "aGkgCg"})
    assert reject(pack, OW) == "[3] vd (data value) is not supported; send text as vs"


def test_rfc_5_1_6_a_collection_naming_another_device_is_rejected() -> None:
    pack: list[dict[str, object]] = [
        {"bn": "2001:db8::2/", "bt": 1.320078429e09, "n": "temperature", "u": "Cel", "v": 25.2},
        {"n": "humidity", "u": "%RH", "v": 30},
    ]
    assert decode(pack, "2001:db8::2") == [(1_320_078_429.0, {"temperature": 25.2, "humidity": 30})]
    pack += [{"bn": "2001:db8::1/", "n": "temperature", "u": "Cel", "v": 12.3}, {"n": "humidity", "v": 67}]
    assert reject(pack, "2001:db8::2") == (
        "[2] SenML name '2001:db8::1/temperature' names device '2001:db8::1', but the topic is for device"
        " '2001:db8::2' (expected 'temperature', '2001:db8::2:temperature' or '2001:db8::2/temperature')"
    )


def test_rfc_5_1_7_a_record_with_base_fields_only() -> None:
    pack: list[dict[str, object]] = [
        {"bn": f"{OW}:"},
        {"n": "temp", "u": "Cel", "v": 23.1},
        {"n": "heat", "u": "/", "v": 1},
        {"n": "fan", "u": "/", "v": 0},
    ]
    assert decode(pack, OW) == [(NOW, {"temp": 23.1, "heat": 1, "fan": 0})]


# -- names and identity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        pytest.param({"n": "temperature", "v": 1}, id="bare field"),
        pytest.param({"n": "gh-1:temperature", "v": 1}, id="colon"),
        pytest.param({"n": "gh-1/temperature", "v": 1}, id="slash"),
        pytest.param({"bn": "gh-1:", "n": "temperature", "v": 1}, id="bn + n"),
        pytest.param({"bn": "gh-1/temperature", "v": 1}, id="bn alone"),
        pytest.param({"bn": "gh-1:temp", "n": "erature", "v": 1}, id="split anywhere"),
    ],
)
def test_accepted_names(record: dict[str, object]) -> None:
    assert decode([record]) == [(NOW, {"temperature": 1})]


def test_a_field_may_start_with_underscore_only_after_the_device_id() -> None:
    assert decode([{"n": "gh-1:_raw", "v": 1}]) == [(NOW, {"_raw": 1})]
    assert "SenML name '_raw' is not allowed" in reject([{"n": "_raw", "v": 1}])


def test_device_ids_with_colons_keep_them() -> None:
    assert decode([{"bn": "site:gh-1:", "n": "t", "v": 1}], "site:gh-1") == [(NOW, {"t": 1})]
    assert "is the device itself" in reject([{"bn": "site:gh-1", "v": 1}], "site:gh-1")


@pytest.mark.parametrize(
    ("pack", "named"),
    [
        pytest.param([{"bn": "dev-b:", "n": "temperature", "v": 1}], "dev-b", id="another device"),
        pytest.param(
            [{"bn": "urn:dev:mac:0024befffe804ff1:", "n": "temperature", "v": 1}],
            "urn:dev:mac:0024befffe804ff1",
            id="urn",
        ),
        pytest.param([{"n": "dev-b/temperature", "v": 1}], "dev-b", id="in n"),
        pytest.param([{"n": "gh-1/sensor/temperature", "v": 1}], "gh-1/sensor", id="nested"),
        pytest.param([{"bn": "gh-10:", "n": "temperature", "v": 1}], "gh-10", id="prefix of another id"),
        pytest.param([{"bn": "GH-1:", "n": "temperature", "v": 1}], "GH-1", id="case differs"),
        pytest.param(
            [{"bn": "gh-1:", "n": "t", "v": 1}, {"bn": "dev-b:", "n": "temperature", "v": 2}],
            "dev-b",
            id="later record",
        ),
    ],
)
def test_a_name_for_another_device_is_rejected(pack: list[dict[str, object]], named: str) -> None:
    reason = reject(pack)
    assert f"names device {named!r}, but the topic is for device 'gh-1'" in reason
    assert reason.startswith(f"[{len(pack) - 1}] SenML name ")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"v": 1}, "[0] record has no name (n, or bn from this or an earlier record)"),
        ({"n": "a b", "v": 1}, "[0] SenML name 'a b' is not allowed"),
        ({"n": "-temp", "v": 1}, "[0] SenML name '-temp' is not allowed"),
        ({"n": "temp\n", "v": 1}, "is not allowed"),
        ({"n": "x" * 257, "v": 1}, "n: string longer than 256"),
        ({"bn": "gh-1:" + "x" * 200, "n": "x" * 60, "v": 1}, "[0] SenML name 'gh-1:xxx"),  # 265 together
        ({"n": "gh-1:", "v": 1}, "[0] SenML name 'gh-1:' has no field after the device id"),
        ({"n": "gh-1:0temp", "v": 1}, "field name '0temp' (from SenML name 'gh-1:0temp') is not allowed"),
        ({"n": "gh-1:" + "x" * 65, "v": 1}, "is not allowed"),
        ({"n": "ts", "v": 1}, "'ts' is a reserved name"),
        ({"n": "gh-1:device", "vs": "gh-1"}, "'device' is a reserved name"),
        ({"n": "device_id", "vs": "gh-1"}, "'device_id' is a reserved name"),
        ({"n": 7, "v": 1}, "[0] n must be a string, got int 7"),
        ({"bn": ["gh-1:"], "n": "t", "v": 1}, "bn must be a string, got list"),
    ],
)
def test_invalid_names(record: dict[str, object], reason: str) -> None:
    assert reason in reject([record])


# -- values, sums, base values -------------------------------------------------------------------------


def test_base_value_and_base_sum_are_added() -> None:
    pack: list[dict[str, object]] = [
        {"bn": "gh-1:", "bv": 100, "n": "level", "v": 1.5},
        {"n": "count", "v": 2},  # int + int stays an int
        {"bs": 1000, "n": "energy", "s": 5, "vs": "ok"},  # a sum and a value in one record
        {"n": "water", "s": 7},  # bs still applies
        {"n": "gas", "v": -100},  # from here on, every record has a sum (RFC 8428 4.5.4)
    ]
    events = SenmlDecoder().decode("gh-1", json.dumps(pack).encode(), NOW)
    assert [(e.ts, dict(e.fields)) for e in events] == [
        (
            NOW,
            {
                "level": 101.5,
                "count": 102,
                "energy": "ok",
                "energy_sum": 1005,
                "water_sum": 1007,
                "gas": 0,
                "gas_sum": 1000,
            },
        )
    ]


def test_base_value_applies_to_v_only() -> None:
    pack: list[dict[str, object]] = [{"bv": 5, "n": "mode", "vs": "auto"}, {"n": "on", "vb": True}]
    assert decode(pack) == [(NOW, {"mode": "auto", "on": True})]


def test_units_and_update_time_are_checked_and_not_stored() -> None:
    pack: list[dict[str, object]] = [
        {"bu": "Cel", "n": "t", "v": 21, "ut": 60},
        {"n": "h", "u": "%RH", "v": 40},
    ]
    assert decode(pack) == [(NOW, {"t": 21, "h": 40})]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"n": "t"}, "[0] record has no value (v, vs, vb) or sum (s)"),
        ({"n": "t", "u": "Cel"}, "record has no value"),
        ({"n": "t", "v": 1, "vs": "1"}, "[0] record has more than one value (v, vs); RFC 8428 allows one"),
        ({"n": "t", "vb": True, "vd": "AA"}, "more than one value (vb, vd)"),
        ({"n": "t", "v": True}, "[0] v must be a number, got bool True"),
        ({"n": "t", "v": "21.5"}, "v must be a number, got str '21.5'"),
        ({"n": "t", "v": None}, "v must be a number, got NoneType None"),
        ({"n": "t", "vs": 5}, "vs must be a string, got int 5"),
        ({"n": "t", "vs": "x" * 17}, "vs: string longer than 16"),
        ({"n": "t", "vb": 1}, "vb must be true or false, got int 1"),
        ({"n": "t", "vb": "true"}, "vb must be true or false"),
        ({"n": "t", "vd": "aGkgCg"}, "vd (data value) is not supported"),
        ({"n": "t", "s": "5"}, "s must be a number"),
        ({"n": "t", "v": 1, "u": 5}, "u must be a string, got int 5"),
        ({"n": "t", "v": 1, "u": "x" * 257}, "u: string longer than 256"),
        ({"n": "t", "v": 1, "bu": 5}, "bu must be a string"),
        ({"n": "t", "v": 1, "bu": "x" * 257}, "bu: string longer than 256"),
        ({"n": "t", "v": 1, "ut": -1}, "ut must not be negative, got -1"),
        ({"n": "t", "v": 1, "ut": "soon"}, "ut must be a number"),
        ({"n": "t", "bv": "1", "v": 1}, "bv must be a number"),
        ({"n": "t", "bs": False, "s": 1}, "bs must be a number, got bool False"),
        ({"n": "t", "bv": 2**63 - 1, "v": 1}, "v plus its base value is 9223372036854775808, outside int64"),
        ({"n": "t", "bs": -(2**63), "s": -1}, "s plus its base value is -9223372036854775809, outside int64"),
        ({"n": "t", "bv": 1e308, "v": 1e308}, "v plus its base value overflows a double"),
        ({}, "[0] record has no SenML fields"),
        ({"comment": "hi"}, "record has no SenML fields"),
    ],
)
def test_invalid_values(record: dict[str, object], reason: str) -> None:
    assert reason in reject([record])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'[{"n": "t", "v": NaN}]', "NaN is not a number"),
        (b'[{"n": "t", "v": Infinity}]', "Infinity is not a number"),
        (b'[{"n": "t", "v": 1e400}]', "overflows a double"),
        (b'[{"n": "t", "v": 9223372036854775808}]', "outside int64"),
        (b'[{"n": "t", "v": ' + b"9" * 5000 + b"}]", "exceeds 4096"),
        (b'[{"n": "t", "v": ' + b"9" * 3000 + b"}]", "outside int64"),
        (b'[{"n": "t", "bt": 1e400, "v": 1}]', "overflows a double"),
        (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
        (b"", "empty payload"),
        (b"\xff", "not UTF-8"),
        (b"[{", "invalid JSON"),
        (b"[]", "empty SenML pack"),
        (b'{"n": "t", "v": 1}', "a SenML pack must be a JSON array of records, got dict"),
        (b"[1]", "[0] SenML records must be JSON objects, got int"),
        (b'[{"n": "t", "v": 1}, "x"]', "[1] SenML records must be JSON objects, got str"),
        (b'[{"bn": "gh-1:"}]', "SenML pack has no record with a value or sum"),
        (b"[" + b'{"n":"t","v":1},' * 20 + b'{"n":"t","v":1}]', "SenML pack of 21 records exceeds 20"),
        (
            json.dumps([{"n": f"f{i}", "v": i} for i in range(5)]).encode(),
            "[0] 5 fields at time 1764000000.0 exceed 4",
        ),
        (b'[{"n": "t", "v": 1}, {"n": "t", "v": 2}]', "[1] field 't' appears twice at time 1764000000.0"),
        (
            b'[{"n": "t", "v": 1}, {"n": "t_sum", "v": 2}, {"n": "t", "s": 2}]',
            "[2] field 't_sum' appears twice",
        ),
        (
            b'[{"n": "' + b"x" * 61 + b'", "s": 1}]',
            "sum field name '" + "x" * 61 + "_sum' is too long (at most 64 characters)",
        ),
    ],
)
def test_pack_level_rejections(payload: bytes, reason: str) -> None:
    assert reason in reject(payload)


# -- time ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "ts"),
    [
        pytest.param({"n": "t", "v": 1}, NOW, id="no time is now"),
        pytest.param({"n": "t", "t": 0, "v": 1}, NOW, id="zero is now"),
        pytest.param({"n": "t", "t": -60, "v": 1}, NOW - 60, id="negative is the past"),
        pytest.param({"n": "t", "t": 30.5, "v": 1}, NOW + 30.5, id="positive is the future"),
        pytest.param({"bt": -100, "n": "t", "t": 10, "v": 1}, NOW - 90, id="relative base time"),
        pytest.param({"n": "t", "t": 1_763_999_000, "v": 1}, 1_763_999_000.0, id="absolute t"),
        pytest.param(
            {"bt": 1_763_999_000, "n": "t", "t": -0.5, "v": 1}, 1_763_998_999.5, id="absolute bt + t"
        ),
    ],
)
def test_resolved_time(record: dict[str, object], ts: float) -> None:
    assert decode([record]) == [(ts, {"t": 1})]


@pytest.mark.parametrize(
    ("t", "resolved"),
    [
        pytest.param(RELATIVE_TIME_LIMIT - 1, NOW + RELATIVE_TIME_LIMIT - 1, id="2**28 - 1 is relative"),
        pytest.param(RELATIVE_TIME_LIMIT, float(RELATIVE_TIME_LIMIT), id="2**28 is absolute (1978)"),
        pytest.param(1_764_000_000_000, 1_764_000_000_000.0, id="milliseconds"),
        pytest.param(-(NOW - 946_000_000), 946_000_000.0, id="before 2000"),
    ],
)
def test_times_outside_the_window_are_rejected(t: float, resolved: float) -> None:
    assert reject([{"n": "t", "t": t, "v": 1}]) == (
        f"[0] time {resolved!r} (bt + t) is outside the accepted time window"
    )


def test_records_are_grouped_by_time_oldest_first() -> None:
    pack: list[dict[str, object]] = [
        {"bn": "gh-1:", "bt": 1_763_999_000, "n": "t", "t": 20, "v": 3},
        {"n": "h", "t": 10, "v": 2},
        {"n": "t", "t": 10, "v": 1},
        {"n": "h", "t": 20, "v": 4},
        {"n": "t", "t": 0, "v": 0},
    ]
    assert decode(pack) == [
        (1_763_999_000.0, {"t": 0}),
        (1_763_999_010.0, {"h": 2, "t": 1}),
        (1_763_999_020.0, {"t": 3, "h": 4}),
    ]


# -- seq, versions, extension labels ---------------------------------------------------------------------


def test_a_record_named_seq_is_the_sequence_number_of_its_time() -> None:
    pack: list[dict[str, object]] = [
        {"bn": "gh-1:", "n": "seq", "v": 41, "t": -1},
        {"n": "t", "v": 20.5, "t": -1},
        {"n": "seq", "v": 42},
        {"n": "t", "v": 21.0},
    ]
    events = decoder.decode("gh-1", json.dumps(pack).encode(), NOW)
    assert [(e.ts, e.seq, dict(e.fields)) for e in events] == [
        (NOW - 1, 41, {"t": 20.5}),
        (NOW, 42, {"t": 21.0}),
    ]


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ([{"n": "seq", "v": 1.5}, {"n": "t", "v": 1}], "[0] a record named 'seq' must carry"),
        ([{"n": "seq", "v": -1}, {"n": "t", "v": 1}], "[0] a record named 'seq' must carry"),
        ([{"n": "seq", "vs": "1"}, {"n": "t", "v": 1}], "[0] a record named 'seq' must carry"),
        ([{"n": "seq", "v": 1, "s": 1}, {"n": "t", "v": 1}], "[0] a record named 'seq' must carry"),
        ([{"bv": 0.5, "n": "seq", "v": 1}, {"n": "t", "v": 1}], "[0] a record named 'seq' must carry"),
        ([{"n": "seq", "v": 1}, {"n": "seq", "v": 2}, {"n": "t", "v": 1}], "[1] seq appears twice at time"),
        (
            [{"n": "seq", "v": 1, "t": -5}, {"n": "t", "v": 1}],
            "[0] no metric fields at time 1763999995.0, only seq",
        ),
    ],
)
def test_invalid_seq(records: list[dict[str, object]], reason: str) -> None:
    assert reason in reject(records)


@pytest.mark.parametrize(
    ("pack", "reason"),
    [
        ([{"bver": 11, "n": "t", "v": 1}], "[0] SenML version 11 is newer than 10, which tidegate reads"),
        ([{"bver": 0, "n": "t", "v": 1}], "bver must be a positive integer, got int 0"),
        ([{"bver": "10", "n": "t", "v": 1}], "bver must be a positive integer, got str '10'"),
        ([{"bver": True, "n": "t", "v": 1}], "bver must be a positive integer, got bool True"),
        (
            [{"bver": 5, "n": "t", "v": 1}, {"bver": 10, "n": "h", "v": 1}],
            "[1] record has SenML version 10 but the pack began with 5",
        ),
        (
            [{"n": "t", "v": 1}, {"bver": 9, "n": "h", "v": 1}],
            "[1] record has SenML version 9 but the pack began with 10",
        ),
        ([{"n": "t", "v": 1, "unit_": "x"}], "[0] label 'unit_' must be understood"),
    ],
)
def test_versions_and_must_understand_labels(pack: list[dict[str, object]], reason: str) -> None:
    assert reason in reject(pack)


def test_same_version_repeated_and_unknown_labels_are_accepted() -> None:
    pack: list[dict[str, object]] = [
        {"bver": 10, "n": "t", "v": 1, "ct": "x"},  # unknown labels are ignored (RFC 8428 4.4)
        {"bver": 10, "n": "h", "v": 2, "l": [{"href": "/x"}]},
    ]
    assert decode(pack) == [(NOW, {"t": 1, "h": 2})]


# -- the same readings as the JSON form ------------------------------------------------------------------

values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
)
# A SenML name starts with a letter or digit, so a bare field cannot start with "_" as a JSON key can.
field_names = st.from_regex(r"[a-z][a-z0-9_.-]{0,10}", fullmatch=True).filter(
    lambda name: name not in ("ts", "seq", "device", "device_id")
)


@given(
    st.dictionaries(field_names, values, min_size=1, max_size=4),
    st.sampled_from(["", "dev-1:", "dev-1/"]),
    st.booleans(),
)
def test_senml_and_json_forms_give_the_same_event(
    fields: dict[str, object], prefix: str, in_base: bool
) -> None:
    records: list[dict[str, object]] = []
    for name, value in fields.items():
        label = "vb" if isinstance(value, bool) else "vs" if isinstance(value, str) else "v"
        records.append({"n": name if in_base else prefix + name, label: value})
    if in_base:
        records[0]["bn"] = prefix  # applies to every later record too
    [senml] = decoder.decode("dev-1", json.dumps(records).encode(), NOW)
    [plain] = PayloadDecoder(max_fields=4, max_string=16).decode("dev-1", json.dumps(fields).encode(), NOW)
    assert (senml.ts, dict(senml.fields), senml.seq) == (plain.ts, dict(plain.fields), plain.seq)
