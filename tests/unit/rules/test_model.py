"""Message templates: event fields only, never attribute access, never an exception at render time."""

from __future__ import annotations

import pytest

from devices.event import FieldValue
from rules.model import MessageTemplate


@pytest.mark.parametrize(
    ("template", "fields", "expected"),
    [
        ("temperature {temperature} above 30", {"temperature": 31.5}, "temperature 31.5 above 30"),
        ("{temperature:.1f} °C", {"temperature": 31.25}, "31.2 °C"),
        ("{temperature:>6.1f}|", {"temperature": 3}, "   3.0|"),
        ("{status!r} at {t}", {"status": "fault", "t": 1}, "'fault' at 1"),
        ("{t} and {humidity}", {"t": 1}, "1 and ?"),  # a missing field
        ("{t:.1f}", {"t": "hot"}, "hot"),  # a spec that does not fit the value's type
        ("{battery.level}%", {"battery.level": 80}, "80%"),  # the whole name is the field name
        ("{t.__class__}", {"t": 1}, "?"),  # ...so no attribute is ever looked up
        ("{{literal}} {t}", {"t": 2}, "{literal} 2"),
        ("no fields", {}, "no fields"),
    ],
)
def test_render(template: str, fields: dict[str, FieldValue], expected: str) -> None:
    assert MessageTemplate(template).render(fields) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{t", "expected '}' before end of string"),
        ("t}", "Single '}' encountered"),
        ("{}", "{} is not a field name"),
        ("{0}", "{0} is not a field name"),
        ("{t[0]}", "{t[0]} is not a field name"),
        ("{t!a}", "{t!a}: expected no conversion, !r or !s"),
        ("{t:{width}}", "{t:{width}}: expected a format spec"),
        ("{t:99999999}", "{t:99999999}: expected a format spec"),  # no gigabyte of padding
    ],
)
def test_invalid(template: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        MessageTemplate(template)
    assert message in str(caught.value)


def test_fields_and_equality() -> None:
    template = MessageTemplate("{a} {b:.1f} {a}")
    assert template.fields == ("a", "b")
    assert template == MessageTemplate("{a} {b:.1f} {a}") != MessageTemplate("{a}")
