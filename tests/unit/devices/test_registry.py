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


# -- commands: the allow-list each device type declares ------------------------------------------------

COMMANDS = """\
types:
  greenhouse:
    fields:
      temperature: {type: number}
    commands:
      fan: {params: {on: {type: bool}}}
      mode: {params: {speed: {type: string, enum: [off, low, high]}}}
      setpoint: {params: {celsius: {type: number, min: 5, max: 35}, hold: {type: integer, required: false}}}
      reboot: {}
  meter:
    fields:
      kwh: {type: number}
devices:
  - {id: gh-1, type: greenhouse}
  - {id: m-1, type: meter}
"""


def test_commands_parse_with_yaml_1_2_booleans() -> None:
    reg = parse_registry(COMMANDS, "devices.yaml")
    commands = reg.types["greenhouse"].commands
    assert sorted(commands) == ["fan", "mode", "reboot", "setpoint"]
    assert list(commands["fan"].params) == ["on"]  # YAML 1.1 would have made the key True
    assert commands["mode"].params["speed"].enum == ["off", "low", "high"]  # and "off" False
    assert reg.types["meter"].commands == {}


@pytest.mark.parametrize(
    ("device", "name", "params", "reasons"),
    [
        pytest.param("gh-1", "fan", {"on": True}, [], id="ok"),
        pytest.param("gh-1", "mode", {"speed": "off"}, [], id="enum-ok"),
        pytest.param("gh-1", "setpoint", {"celsius": 21}, [], id="optional-left-out"),
        pytest.param("gh-1", "setpoint", {"celsius": 21.5, "hold": 60}, [], id="optional-given"),
        pytest.param("gh-1", "reboot", {}, [], id="no-params"),
        pytest.param(
            "gh-1",
            "self_destruct",
            {},
            [
                "command 'self_destruct' is not on the allow-list of type 'greenhouse' "
                "(it accepts: fan, mode, reboot, setpoint)"
            ],
            id="unknown-name",
        ),
        pytest.param(
            "m-1",
            "fan",
            {"on": True},
            ["command 'fan' is not on the allow-list of type 'meter' (it accepts no commands)"],
            id="type-without-commands",
        ),
        pytest.param(
            "stranger", "fan", {"on": True}, ["device 'stranger' is not in the registry"], id="unregistered"
        ),
        pytest.param("gh-1", "fan", {}, ["param 'on' is missing"], id="missing"),
        pytest.param(
            "gh-1",
            "fan",
            {"on": True, "speed": 3},
            ["param 'speed' is not a parameter of 'fan' (parameters: on)"],
            id="extra",
        ),
        pytest.param(
            "gh-1", "fan", {"on": 1}, ["param 'on': expected a bool, got number 1"], id="number-for-bool"
        ),
        pytest.param(
            "gh-1",
            "fan",
            {"on": "true"},
            ["param 'on': expected a bool, got string 'true'"],
            id="text-for-bool",
        ),
        pytest.param(
            "gh-1",
            "mode",
            {"speed": "turbo"},
            ["param 'speed': 'turbo' is not one of off, low, high"],
            id="not-in-enum",
        ),
        pytest.param(
            "gh-1",
            "setpoint",
            {"celsius": 40},
            ["param 'celsius': 40 is outside the allowed range [5, 35]"],
            id="out-of-range",
        ),
        pytest.param(
            "gh-1",
            "setpoint",
            {"celsius": True},
            ["param 'celsius': expected a number, got bool True"],
            id="bool-for-number",
        ),
        pytest.param(
            "gh-1",
            "setpoint",
            {"celsius": float("nan")},
            ["param 'celsius': expected a finite number, got nan"],
            id="nan",
        ),
        pytest.param(
            "gh-1",
            "setpoint",
            {"celsius": 20, "hold": 1.5},
            ["param 'hold': expected an integer, got number 1.5"],
            id="float-for-integer",
        ),
        pytest.param(
            "gh-1",
            "mode",
            {"speed": {"x": 1}, "extra": [1]},
            [
                "param 'speed': expected a string, got object {\"x\": 1}",
                "param 'extra' is not a parameter of 'mode' (parameters: speed)",
            ],
            id="every-problem-named",
        ),
    ],
)
def test_the_allow_list(device: str, name: str, params: dict[str, object], reasons: list[str]) -> None:
    allow = parse_registry(COMMANDS, "devices.yaml").allow_list()
    assert allow.problems(device, name, params) == reasons


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        pytest.param(
            "fan: {params: {on: {type: boolean}}}",
            "devices.yaml:6:33: types.t.commands.fan.params.on.type: "
            "Input should be 'number', 'integer', 'bool' or 'string'",
            id="bad-param-type",
        ),
        pytest.param(
            "fan: {parms: {}}",
            "devices.yaml:6:20: types.t.commands.fan.parms: Extra inputs are not permitted",
            id="typo",
        ),
        pytest.param(
            "fan: {params: {speed: {type: string, enum: [yes, 2]}}}",
            "enum value 2: expected a string, got number 2",
            id="enum-of-wrong-type",
        ),
        pytest.param(
            "fan: {params: {on: {type: bool, min: 0}}}",
            "min and max apply to number and integer params only, not bool",
            id="range-on-bool",
        ),
        pytest.param(
            "'bad name!': {}",
            "types.t.commands.bad name!",
            id="bad-command-name",
        ),
        pytest.param(
            "fan: {params: {'1x': {type: bool}}}",
            "types.t.commands.fan.params.1x",
            id="bad-param-name",
        ),
    ],
)
def test_command_declaration_problems_are_located(commands: str, expected: str) -> None:
    text = f"types:\n  t:\n    fields:\n      x: {{type: number}}\n    commands:\n      {commands}\n"
    with pytest.raises(SourceFileError) as raised:
        parse_registry(text, "devices.yaml")
    shown = str(raised.value)
    assert expected in shown, shown


def test_the_example_registry_declares_the_simulator_fan_command() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[3] / "deploy" / "devices.example.yaml").read_text(encoding="utf-8")
    allow = parse_registry(text, "devices.example.yaml").allow_list()
    assert allow.problems("sim-0001", "fan", {"on": True}) == []
    assert allow.problems("cold-1", "defrost", {"enable": False}) == []
