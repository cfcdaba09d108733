"""The device registry: device types with their telemetry fields, and the devices that have them.

A registry file (YAML, `devices.file` in the config) looks like:

    types:
      greenhouse:
        fields:
          temperature: {type: number, unit: "°C", min: -40, max: 85}
          humidity:    {type: number, unit: "%RH", min: 0, max: 100}
          fan:         {type: bool}
        commands:                       # the allow-list: anything else is rejected before sending
          fan: {params: {on: {type: bool}}}
          mode: {params: {speed: {type: string, enum: ["off", low, high]}}}
    devices:
      - {id: gh-1, type: greenhouse, tags: {site: north}}

A payload from a registered device may carry only its type's fields, each of its declared kind and,
for numbers, within its range; a field may be left out (devices often send partial readings). This
module is pure: it parses text and checks values, and reads neither files nor clocks.

The file is read with YAML 1.2 booleans (only true/false), so a parameter named `on` or an enum
value `off` stays text instead of turning into a boolean as YAML 1.1 would have it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from devices.command import CommandAllowList, CommandName, CommandSpec
from devices.errors import PayloadError, SourceFileError
from devices.event import FieldValue, TelemetryEvent
from devices.payload import FIELD_NAME_RE, IDENTITY_KEYS, RESERVED_KEYS, PayloadFormat
from devices.topic import is_valid_device_id
from devices.yamlsource import LocatedDocument

FieldKind = Literal["number", "bool", "string"]
UnknownDevicePolicy = Literal["accept", "reject", "quarantine"]
TagText = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Strict):
    """One telemetry field of a device type: its kind, unit and (numbers only) allowed range."""

    type: FieldKind
    unit: str | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _range(self) -> FieldSpec:
        if self.type != "number" and (self.min is not None or self.max is not None):
            raise ValueError(f"min and max apply to number fields only, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self


class DeviceType(_Strict):
    """A kind of device: the telemetry fields its payloads may carry, and the commands it accepts."""

    fields: dict[str, FieldSpec] = Field(min_length=1)
    commands: dict[CommandName, CommandSpec] = {}
    format: PayloadFormat = "json"  # telemetry payloads: tidegate JSON, or SenML JSON (RFC 8428)

    @model_validator(mode="after")
    def _names(self) -> DeviceType:
        reserved = RESERVED_KEYS | IDENTITY_KEYS
        bad = [name for name in self.fields if FIELD_NAME_RE.match(name) is None or name in reserved]
        if bad:
            raise ValueError(
                f"field name {bad[0]!r} is not allowed (letters, digits, _ . -; not {', '.join(sorted(reserved))})"
            )
        return self


class DeviceEntry(_Strict):
    """One registered device."""

    id: str
    type: str
    tags: dict[TagText, TagText] = {}


class _RegistryFile(_Strict):
    types: dict[str, DeviceType] = {}
    devices: list[DeviceEntry] = []


@dataclass(frozen=True, slots=True)
class TypeValidator:
    """Check events against one device type's fields."""

    type_name: str
    fields: Mapping[str, FieldSpec]

    def check(self, event: TelemetryEvent) -> None:
        """Raise `PayloadError` naming every field of `event` the type does not allow, and why."""
        reasons = []
        for name, value in event.fields.items():
            spec = self.fields.get(name)
            if spec is None:
                reasons.append(f"field {name!r}: not a field of type {self.type_name!r}")
                continue
            reason = _field_problem(spec, value)
            if reason is not None:
                reasons.append(f"field {name!r}: {reason}")
        if reasons:
            raise PayloadError("; ".join(reasons), device_id=event.device_id)


def _field_problem(spec: FieldSpec, value: FieldValue) -> str | None:
    kind = spec.type
    if kind == "number":
        if type(value) is bool or not isinstance(value, int | float):
            return f"expected a number, got {_kind(value)} {value!r}"
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            low = "-inf" if spec.min is None else f"{spec.min:g}"
            high = "inf" if spec.max is None else f"{spec.max:g}"
            return f"{value!r} is outside the allowed range [{low}, {high}]"
        if isinstance(value, float) and math.isnan(value):
            return "NaN is not a number tidegate accepts"
        return None
    if kind == "bool":
        return None if type(value) is bool else f"expected a bool, got {_kind(value)} {value!r}"
    return None if isinstance(value, str) else f"expected a string, got {_kind(value)} {value!r}"


def _kind(value: FieldValue) -> str:
    if type(value) is bool:
        return "bool"
    return "string" if isinstance(value, str) else "number"


class DeviceRegistry:
    """Registered devices and their types; `validators` maps a device id to its type's checker."""

    def __init__(self, types: Mapping[str, DeviceType], devices: Iterable[DeviceEntry]) -> None:
        self.types = dict(types)
        self.devices = {device.id: device for device in devices}
        by_type = {name: TypeValidator(name, spec.fields) for name, spec in self.types.items()}
        self.validators = {device.id: by_type[device.type] for device in self.devices.values()}

    def __len__(self) -> int:
        return len(self.devices)

    def allow_list(self) -> CommandAllowList:
        """Return the commands each registered device accepts (its type's `commands`; none without)."""
        return CommandAllowList(
            {name: spec.commands for name, spec in self.types.items()},
            {device.id: device.type for device in self.devices.values()},
        )

    @classmethod
    def empty(cls) -> DeviceRegistry:
        """Return a registry that knows no device (every device is unknown)."""
        return cls({}, [])


class _Yaml12Loader(yaml.SafeLoader):
    """A SafeLoader with YAML 1.2 booleans: `on`, `off`, `yes`, `no` stay text."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_registry(text: str, file: str) -> DeviceRegistry:
    """Parse and validate a registry file, listing every problem with its file:line:column.

    Raises:
        SourceFileError: the file has problems; all are listed.
    """
    doc = LocatedDocument(text, file)
    # LocatedDocument (YAML 1.1) is kept for positions; the data is read again with YAML 1.2 booleans.
    data = yaml.load(text, Loader=_Yaml12Loader) if doc.data is not None else {}  # a SafeLoader
    if not isinstance(data, dict):
        raise SourceFileError([doc.problem([], "expected a mapping with `types` and `devices`")])
    try:
        parsed = _RegistryFile.model_validate(data)
    except ValidationError as exc:
        raise SourceFileError(doc.problems_from(exc)) from None
    problems = []
    seen: set[str] = set()
    for i, device in enumerate(parsed.devices):
        if not is_valid_device_id(device.id):
            problems.append(doc.problem(["devices", i, "id"], f"device id {device.id!r} is not allowed"))
        elif device.id in seen:
            problems.append(doc.problem(["devices", i, "id"], f"device id {device.id!r} is listed twice"))
        seen.add(device.id)
        if device.type not in parsed.types:
            known = ", ".join(sorted(parsed.types)) or "none declared"
            problems.append(
                doc.problem(["devices", i, "type"], f"unknown device type {device.type!r} (known: {known})")
            )
    if problems:
        raise SourceFileError(problems)
    return DeviceRegistry(parsed.types, parsed.devices)
