"""Device registry: parsing with located errors, and per-type payload validation."""

from __future__ import annotations

import pytest

from devices.errors import PayloadError, SourceFileError
from devices.event import FieldValue, TelemetryEvent
from devices.registry import DeviceRegistry, parse_registry

GOOD = """\
types:
  greenhouse:
    fields:
      temperature: {type: number, unit: "°C", min: -40, max: 85}
      humidity: {type: number, unit: "%RH", min: 0, max: 100}
      fan: {type: bool}
      mode: {type: string}
devices:
  - {id: gh-1, type: greenhouse, tags: {site: north}}
  - id: gh-2
    type: greenhouse
"""


def registry() -> DeviceRegistry:
    return parse_registry(GOOD, "devices.yaml")


def test_a_good_file_parses() -> None:
    reg = registry()
    assert sorted(reg.devices) == ["gh-1", "gh-2"]
    assert reg.devices["gh-1"].tags == {"site": "north"}
    assert reg.validators["gh-2"].type_name == "greenhouse"
    assert reg.types["greenhouse"].fields["temperature"].unit == "°C"


def test_an_empty_file_is_an_empty_registry() -> None:
    assert len(parse_registry("", "devices.yaml")) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "types: {t: {fields: {x: {type: number}}}}\ndevices:\n  - {id: a, type: nope}\n",
            "devices.yaml:3:19: devices[0].type: unknown device type 'nope' (known: t)",
            id="unknown-type",
        ),
        pytest.param(
            "types: {t: {fields: {x: {type: number}}}}\ndevices:\n  - {id: a, type: t}\n  - {id: a, type: t}\n",
            "devices.yaml:4:10: devices[1].id: device id 'a' is listed twice",
            id="duplicate-id",
        ),
        pytest.param(
            "types: {t: {fields: {x: {type: number}}}}\ndevices:\n  - {id: 'a/b', type: t}\n",
            "devices.yaml:3:10: devices[0].id: device id 'a/b' is not allowed",
            id="bad-id",
        ),
        pytest.param(
            "types:\n  t:\n    fields:\n      x: {type: integer}\n",
            "devices.yaml:4:17: types.t.fields.x.type: Input should be 'number', 'bool' or 'string'",
            id="bad-field-type",
        ),
        pytest.param(
            "types:\n  t:\n    fields:\n      x: {type: number, min: 5, max: 1}\n",
            "devices.yaml:4:10: types.t.fields.x: Value error, min 5 is above max 1",
            id="min-above-max",
        ),
        pytest.param(
            "types:\n  t:\n    fields:\n      x: {type: bool, max: 1}\n",
            "min and max apply to number fields only",
            id="range-on-bool",
        ),
        pytest.param(
            "types:\n  t:\n    fields:\n      x: {type: number, unti: C}\n",
            "devices.yaml:4:31: types.t.fields.x.unti: Extra inputs are not permitted",
            id="typo-is-an-error",
        ),
        pytest.param(
            "types:\n  t:\n    fields:\n      ts: {type: number}\n",
            "field name 'ts' is not allowed",
            id="reserved-field",
        ),
        pytest.param("- a\n- b\n", "devices.yaml:1:1: expected a mapping", id="not-a-mapping"),
        pytest.param("types: [\n", "devices.yaml:2:1: invalid YAML", id="bad-yaml"),
    ],
)
def test_problems_are_located(text: str, expected: str) -> None:
    with pytest.raises(SourceFileError) as raised:
        parse_registry(text, "devices.yaml")
    shown = str(raised.value)
    assert expected in shown, shown


def test_every_problem_is_listed() -> None:
    text = "types: {t: {fields: {x: {type: number}}}}\ndevices:\n  - {id: a, type: u}\n  - {id: b, type: v}\n"
    with pytest.raises(SourceFileError) as raised:
        parse_registry(text, "devices.yaml")
    assert len(raised.value.problems) == 2


def event(**fields: FieldValue) -> TelemetryEvent:
    return TelemetryEvent(device_id="gh-1", ts=1.0, fields=fields)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        pytest.param({"temperature": 21.5, "humidity": 40, "fan": True, "mode": "auto"}, None, id="all-good"),
        pytest.param({"temperature": 21.5}, None, id="partial-reading"),
        pytest.param({"temperature": -40}, None, id="at-min"),
        pytest.param({"humidity": 100.0}, None, id="at-max"),
        pytest.param(
            {"temperature": 90.0},
            "field 'temperature': 90.0 is outside the allowed range [-40, 85]",
            id="above-max",
        ),
        pytest.param(
            {"humidity": -1}, "field 'humidity': -1 is outside the allowed range [0, 100]", id="below-min"
        ),
        pytest.param(
            {"pressure": 1013.0}, "field 'pressure': not a field of type 'greenhouse'", id="unknown-field"
        ),
        pytest.param({"fan": 1}, "field 'fan': expected a bool, got number 1", id="number-for-bool"),
        pytest.param(
            {"temperature": True},
            "field 'temperature': expected a number, got bool True",
            id="bool-for-number",
        ),
        pytest.param(
            {"temperature": "hot"},
            "field 'temperature': expected a number, got string 'hot'",
            id="str-for-number",
        ),
        pytest.param({"mode": 3}, "field 'mode': expected a string, got number 3", id="number-for-string"),
        pytest.param(
            {"temperature": 99.0, "fan": "on"},
            "field 'temperature': 99.0 is outside the allowed range [-40, 85]; field 'fan': expected a bool",
            id="every-field-named",
        ),
    ],
)
def test_per_type_validation(fields: dict[str, FieldValue], reason: str | None) -> None:
    validator = registry().validators["gh-1"]
    if reason is None:
        validator.check(event(**fields))
        return
    with pytest.raises(PayloadError) as raised:
        validator.check(event(**fields))
    assert reason in raised.value.reason
    assert raised.value.device_id == "gh-1"


def test_open_ranges() -> None:
    reg = parse_registry(
        "types: {t: {fields: {x: {type: number, min: 0}}}}\ndevices: [{id: a, type: t}]\n", "f"
    )
    reg.validators["a"].check(TelemetryEvent("a", 1.0, {"x": 1e300}))
    with pytest.raises(PayloadError, match=r"\[0, inf\]"):
        reg.validators["a"].check(TelemetryEvent("a", 1.0, {"x": -0.5}))
