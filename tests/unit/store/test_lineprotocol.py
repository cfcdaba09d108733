"""Line protocol encoding: exact output, what is refused, and a round trip against a naive reader."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from influxdb_client.client.write.point import Point as ClientPoint
from influxdb_client.domain.write_precision import WritePrecision

from gateway.store import lineprotocol
from gateway.store.base import Point
from gateway.store.lineprotocol import LineProtocolError, encode_batch, encode_lines, encode_point
from tests.unit.store.reference import parse_line, should_reject

TS = 1_700_000_000.123456


def point(
    measurement: str = "m",
    tags: tuple[tuple[Any, Any], ...] = (),
    fields: Mapping[Any, Any] | None = None,
    ts: float = TS,
) -> Point:
    return Point(measurement, tags, {"v": 1} if fields is None else fields, ts)


@pytest.mark.parametrize(
    ("given_point", "line"),
    [
        (point(), "m v=1i 1700000000123456"),
        (point(fields={"x": 1.5}), "m x=1.5 1700000000123456"),
        (point(fields={"x": 1.0}), "m x=1.0 1700000000123456"),
        (point(fields={"x": -0.0}), "m x=-0.0 1700000000123456"),
        (point(fields={"x": 1e16}), "m x=1e+16 1700000000123456"),
        (point(fields={"x": 5e-324}), "m x=5e-324 1700000000123456"),
        (point(fields={"x": 2**63 - 1}), "m x=9223372036854775807i 1700000000123456"),
        (point(fields={"x": -(2**63)}), "m x=-9223372036854775808i 1700000000123456"),
        (point(fields={"t": True, "f": False}), "m t=true,f=false 1700000000123456"),
        (point(fields={"s": ""}), 'm s="" 1700000000123456'),
        (point(fields={"s": 'say "hi" \\o/'}), 'm s="say \\"hi\\" \\\\o/" 1700000000123456'),
        (point(fields={"s": "ends with \\"}), 'm s="ends with \\\\" 1700000000123456'),
        (point(fields={"s": "tab\tand ünïcödé 😀"}), 'm s="tab\tand ünïcödé 😀" 1700000000123456'),
        (point("a b,c=d"), "a\\ b\\,c=d v=1i 1700000000123456"),
        (point("m", (("k", "v"),)), "m,k=v v=1i 1700000000123456"),
        (point("m", (("a b", "c,d=e f"),)), "m,a\\ b=c\\,d\\=e\\ f v=1i 1700000000123456"),
        (point(fields={"a b,c=d": 1}), "m a\\ b\\,c\\=d=1i 1700000000123456"),
        (point("m", (("k", "a\\b"),)), "m,k=a\\b v=1i 1700000000123456"),
        (point("m", (("k", "#not a comment"),)), "m,k=#not\\ a\\ comment v=1i 1700000000123456"),
        (point(" lead"), "\\ lead v=1i 1700000000123456"),
        # empty tag values are left out; tags come out sorted by key
        (point("m", (("z", "1"), ("empty", ""), ("a", "2"))), "m,a=2,z=1 v=1i 1700000000123456"),
        (point(ts=0.0), "m v=1i 0"),
        (point(ts=-1.5), "m v=1i -1500000"),
        (point(ts=1.0000004), "m v=1i 1000000"),  # rounded to the nearest microsecond
        (point(ts=1.0000006), "m v=1i 1000001"),
        (point(ts=1_700_000_000), "m v=1i 1700000000000000"),
    ],
)
def test_encodes_exactly(given_point: Point, line: str) -> None:
    assert encode_point(given_point) == line


class FloatSubclass(float):
    def __repr__(self) -> str:
        return "FloatSubclass(...)"


@pytest.mark.parametrize(
    ("value", "text"),
    [(FloatSubclass(2.5), "2.5"), (True, "true")],
)
def test_subclasses_are_encoded_as_their_base_type(value: object, text: str) -> None:
    assert encode_point(point(fields={"x": value})) == f"m x={text} 1700000000123456"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (point(""), "empty measurement"),
        (point("#m"), "starts with '#'"),
        (point("\tm"), "starts with '\\t'"),
        (point("\0m"), "contains NUL"),
        (point("m", (("k", "a\0"),)), "contains NUL"),
        (point("m\n"), "line break"),
        (point("m\r"), "line break"),
        (point("m\\"), "backslash"),
        (point("m", (("", "v"),)), "empty tag key"),
        (point("m", (("k", "a\nb"),)), "line break"),
        (point("m", (("k", "ends\\"),)), "backslash"),
        (point("m", (("k", "a\\\\b"),)), "backslash"),
        (point("m", (("k", "a\\ b"),)), "backslash"),
        (point("m", (("k", "a\\,b"),)), "backslash"),
        (point("m", (("k", "a\\=b"),)), "backslash"),
        (point("m", (("k", 'a\\"b'),)), "backslash"),
        (point("m", (("k\\", "v"),)), "backslash"),
        (point("m", (("k", "v"), ("k", "w"))), "appears twice"),
        (point("m", (("time", "v"),)), '"time" cannot be a tag key'),
        (point("m", (("k", 1),)), "must be a string"),
        (point("m", ((1, "v"),)), "must be a string"),
        (point("m", (("k",),)), "not a (key, value) pair"),  # type: ignore[arg-type]
        (point(fields={}), "no fields"),
        (point(fields={"": 1}), "empty field key"),
        (point(fields={"time": 1}), '"time" cannot be a field key'),
        (point(fields={"x\\": 1}), "backslash"),
        (point(fields={"\tx": 1}), "starts with '\\t'"),
        (point(fields={"\0x": 1}), "contains NUL"),
        (point(fields={'q"uote': 1}), "double quote"),
        (point(fields={"x\ny": 1}), "line break"),
        (point(fields={1: 1}), "must be a string"),
        (point(fields={"x": math.nan}), "not a finite number"),
        (point(fields={"x": math.inf}), "not a finite number"),
        (point(fields={"x": -math.inf}), "not a finite number"),
        (point(fields={"x": 2**63}), "outside int64"),
        (point(fields={"x": -(2**63) - 1}), "outside int64"),
        (point(fields={"x": 10**5000}), "outside int64"),
        (point(fields={"x": "a\nb"}), "line break"),
        (point(fields={"x": "a\rb"}), "line break"),
        (point(fields={"x": "\ud800"}), "not valid UTF-8"),
        (point(fields={"x": None}), "unsupported type NoneType"),
        (point(fields={"x": [1]}), "unsupported type list"),
        (point("m", (("k", "\udfff"),)), "not valid UTF-8"),
        (point(ts=math.nan), "not a finite number"),
        (point(ts=math.inf), "not a finite number"),
        (point(ts=1e300), "outside the years"),
        (point(ts=-1e13), "outside the years"),
        (point("m", (("k", "x" * 65_600),)), "65535 bytes"),
        (point("m", (("k", "é" * 32_766),)), "65535 bytes"),
    ],
)
def test_refuses_with_a_reason(bad: Point, reason: str) -> None:
    with pytest.raises(LineProtocolError) as caught:
        encode_point(bad)
    assert reason in caught.value.reason
    assert isinstance(caught.value, ValueError)


def test_key_length_limit_counts_bytes_of_series_and_field_key() -> None:
    series = "m,k=" + "x" * 100
    budget = 65535 - 4 - len(series)
    fits = point("m", (("k", "x" * 100),), fields={"f" * budget: 1})
    too_long = point("m", (("k", "x" * 100),), fields={"f" * (budget + 1): 1})
    assert encode_point(fits).startswith(series)
    with pytest.raises(LineProtocolError, match="65535 bytes"):
        encode_point(too_long)


def test_long_reasons_are_shortened() -> None:
    with pytest.raises(LineProtocolError) as caught:
        encode_point(point("m", (("k", "x" * 1000 + "\n"),)))
    assert len(caught.value.reason) < 200


def test_batch_keeps_good_points_and_lists_the_rest_with_reasons() -> None:
    good = [point(fields={"v": n}) for n in range(3)]
    bad = point(fields={"v": math.nan})
    body, rejected = encode_batch([good[0], bad, good[1], good[2]])
    assert body == "\n".join(encode_point(p) for p in good).encode()
    assert rejected == [(bad, "field 'v' value nan is not a finite number")]
    batch = encode_lines([good[0], bad])
    assert batch.points == [good[0]] and batch.lines == [encode_point(good[0])]


def test_empty_batch_is_an_empty_body() -> None:
    assert encode_batch([]) == (b"", [])


def test_body_is_utf8() -> None:
    body, _ = encode_batch([point("m", (("k", "ünï"),), {"s": "😀"})])
    assert body.decode() == 'm,k=ünï s="😀" 1700000000123456'


def test_cache_stays_bounded_and_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lineprotocol, "_CACHE_MAX", 4)
    lineprotocol._series_cache.clear()
    for n in range(10):
        assert encode_point(point("m", (("d", f"dev{n}"),))) == f"m,d=dev{n} v=1i 1700000000123456"
        assert len(lineprotocol._series_cache) <= 4
    # a refused series is not cached: it is refused every time
    for _ in range(2):
        with pytest.raises(LineProtocolError):
            encode_point(point("m", (("d", "bad\\"),)))


# --- compared with influxdb-client on plain input ---------------------------------------------------

plain_names = st.text("abcxyz_0123456789", min_size=1, max_size=8).filter(lambda name: name != "time")
plain_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=10),
)


@given(
    measurement=plain_names,
    tags=st.dictionaries(plain_names, plain_names, max_size=3),
    fields=st.dictionaries(plain_names, plain_values, min_size=1, max_size=4),
    ts_us=st.integers(-(4 * 10**15), 4 * 10**15),  # float seconds keep microseconds until ~2096
)
def test_reads_like_influxdb_client_output(
    measurement: str, tags: dict[str, str], fields: dict[str, Any], ts_us: int
) -> None:
    ours = encode_point(Point(measurement, tuple(sorted(tags.items())), fields, ts_us / 1e6))
    theirs: Any = ClientPoint(measurement)  # type: ignore[no-untyped-call]
    for key, value in tags.items():
        theirs.tag(key, value)
    for key, value in fields.items():
        theirs.field(key, value)
    theirs.time(ts_us, WritePrecision.US)
    assert parse_line(ours) == parse_line(theirs.to_line_protocol())


# --- round trip through a naive reader, for any input -----------------------------------------------

awkward_text = st.text(
    st.one_of(st.sampled_from(list(" ,=\"'\\#\t\n\r\0aé😀")), st.characters()),
    max_size=8,
)
field_values = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.booleans(),
    awkward_text,
)


@given(
    measurement=awkward_text,
    tags=st.lists(st.tuples(awkward_text, awkward_text), max_size=3),
    fields=st.dictionaries(awkward_text, field_values, max_size=3),
    ts=st.one_of(st.floats(), st.integers(-(10**10), 10**10).map(lambda us: us / 1e6)),
)
@example(measurement="m", tags=[("k", "a\\b")], fields={"f": "x\\"}, ts=0.0)
@example(measurement="m", tags=[("k", "v\\")], fields={"f": 1}, ts=0.0)
def test_writes_exactly_what_it_accepts(
    measurement: str, tags: list[tuple[str, str]], fields: dict[str, Any], ts: float
) -> None:
    given_point = Point(measurement, tuple(tags), fields, ts)
    try:
        line = encode_point(given_point)
    except LineProtocolError:
        assert should_reject(given_point)
        return
    assert not should_reject(given_point)
    expected_tags = {key: value for key, value in tags if value}
    assert parse_line(line) == (measurement, expected_tags, fields, round(ts * 1e6))
