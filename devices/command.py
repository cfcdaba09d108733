"""The command protocol between tidegate and devices, and the allow-list of commands a device accepts.

Gateway -> device on `devices/{device_id}/commands` (QoS 1):
    {"id": "<hex>", "name": "fan", "params": {"on": true}, "ts": <epoch seconds>, "expires": <epoch seconds>}
Device -> gateway on `devices/{device_id}/commands/ack` (QoS 1):
    {"id": "<same id>", "status": "ok" | "error", "detail": <optional string>}

`id` is the command's identity: a command re-published after a lost ack (a retry) carries the same
id, so a device must treat a repeated id as the same command (answer it again, do not run it twice).
A device that receives a command after `expires` does not run it and acks `error` with detail
`expired`. With MQTT 5 the same facts also travel as publish properties (Message Expiry Interval,
Correlation Data = the id, Response Topic = the ack topic; see gateway/commands.py).

Each device type in the registry declares the commands it accepts (`CommandSpec`), and
`CommandAllowList.problems` says why a command is not among them. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator

from devices.errors import PayloadError

AckStatus = Literal["ok", "error"]
ParamKind = Literal["number", "integer", "bool", "string"]
MAX_ACK_BYTES = 4_096
EXPIRED_DETAIL = "expired"  # the ack detail of a device that received a command after `expires`
COMMAND_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
PARAM_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_.-]{0,63}"
COMMAND_NAME_RE = re.compile(COMMAND_NAME_PATTERN + r"\Z")

CommandName = Annotated[str, StringConstraints(pattern=f"^{COMMAND_NAME_PATTERN}$")]
ParamName = Annotated[str, StringConstraints(pattern=f"^{PARAM_NAME_PATTERN}$")]
Scalar = bool | int | float | str


@dataclass(frozen=True, slots=True)
class Command:
    """A command addressed to one device; `expires` (epoch seconds) is when it must no longer run."""

    id: str
    device_id: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0
    expires: float | None = None

    def encode(self) -> bytes:
        """Serialise the wire form a device receives."""
        doc: dict[str, Any] = {"id": self.id, "name": self.name, "params": self.params, "ts": self.ts}
        if self.expires is not None:
            doc["expires"] = self.expires
        return json.dumps(doc, separators=(",", ":")).encode()

    def is_expired(self, now: float) -> bool:
        """Tell whether the command must no longer be run (or sent) at `now`."""
        return self.expires is not None and now >= self.expires

    @classmethod
    def decode(cls, device_id: str, payload: bytes) -> Command:
        """Parse the wire form (used by devices and the simulator)."""
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            raise PayloadError("command is not valid JSON", device_id=device_id) from None
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("id"), str)
            or not isinstance(doc.get("name"), str)
        ):
            raise PayloadError("command needs string 'id' and 'name'", device_id=device_id)
        params = doc.get("params", {})
        if not isinstance(params, dict):
            raise PayloadError("command 'params' must be an object", device_id=device_id)
        ts, expires = doc.get("ts", 0.0), doc.get("expires")
        return cls(
            doc["id"],
            device_id,
            doc["name"],
            params,
            float(ts) if _is_number(ts) else 0.0,
            float(expires) if _is_number(expires) else None,
        )


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class CommandAck:
    """A device's answer to a command."""

    id: str
    device_id: str
    status: AckStatus
    detail: str = ""

    def encode(self) -> bytes:
        """Serialise the wire form a device sends."""
        doc: dict[str, str] = {"id": self.id, "status": self.status}
        if self.detail:
            doc["detail"] = self.detail
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, device_id: str, payload: bytes, *, correlation_id: str | None = None) -> CommandAck:
        """Parse and validate an ack payload, or raise `PayloadError`.

        `correlation_id` is the MQTT 5 Correlation Data of the ack, when it carried one: an MQTT 5
        device may answer with it instead of an `id` in the body; if both are there they must agree.
        """
        if len(payload) > MAX_ACK_BYTES:
            raise PayloadError(f"ack of {len(payload)} bytes exceeds {MAX_ACK_BYTES}", device_id=device_id)
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            raise PayloadError("ack is not valid JSON", device_id=device_id) from None
        if not isinstance(doc, dict):
            raise PayloadError("ack must be a JSON object", device_id=device_id)
        ack_id, status = doc.get("id", correlation_id), doc.get("status")
        if not isinstance(ack_id, str) or not ack_id:
            raise PayloadError("ack needs a string 'id'", device_id=device_id)
        if correlation_id is not None and ack_id != correlation_id:
            raise PayloadError(
                f"ack id {ack_id[:64]!r} differs from its correlation data {correlation_id[:64]!r}",
                device_id=device_id,
            )
        if status not in ("ok", "error"):
            raise PayloadError(f"ack status must be 'ok' or 'error', got {status!r}", device_id=device_id)
        detail = doc.get("detail", "")
        return cls(ack_id, device_id, status, detail if isinstance(detail, str) else json.dumps(detail))


# -- the allow-list -------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Strict):
    """One parameter of a command: its type, and optionally allowed values or (numbers) a range."""

    type: ParamKind
    enum: list[Scalar] | None = None
    min: float | None = None
    max: float | None = None
    required: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        numeric = self.type in ("number", "integer")
        if not numeric and (self.min is not None or self.max is not None):
            raise ValueError(f"min and max apply to number and integer params only, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        if self.enum is not None:
            if self.type == "bool" or not self.enum:
                raise ValueError("enum needs at least one value, and applies to string, number and integer")
            for value in self.enum:
                problem = _type_problem(self.type, value)
                if problem is not None:
                    raise ValueError(f"enum value {value!r}: {problem}")
        return self

    def problem(self, value: Any) -> str | None:
        """Return why `value` is not acceptable for this parameter, or None."""
        problem = _type_problem(self.type, value)
        if problem is not None:
            return problem
        if self.enum is not None and not any(_same(value, allowed) for allowed in self.enum):
            return f"{value!r} is not one of {', '.join(str(v) for v in self.enum)}"
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            low = "-inf" if self.min is None else f"{self.min:g}"
            high = "inf" if self.max is None else f"{self.max:g}"
            return f"{value!r} is outside the allowed range [{low}, {high}]"
        return None


class CommandSpec(_Strict):
    """A command a device type accepts: its parameters (none by default) and what it does."""

    description: str = ""
    params: dict[ParamName, ParamSpec] = {}

    def problems(self, name: str, params: Mapping[str, Any]) -> list[str]:
        """Return every reason why `params` do not fit this command (empty: they fit)."""
        reasons = []
        for key, value in params.items():
            spec = self.params.get(key)
            if spec is None:
                known = ", ".join(self.params) or "none"
                reasons.append(f"param {key!r} is not a parameter of {name!r} (parameters: {known})")
                continue
            problem = spec.problem(value)
            if problem is not None:
                reasons.append(f"param {key!r}: {problem}")
        for key, spec in self.params.items():
            if spec.required and key not in params:
                reasons.append(f"param {key!r} is missing")
        return reasons


def _type_problem(kind: ParamKind, value: Any) -> str | None:
    if kind == "bool":
        return None if isinstance(value, bool) else f"expected a bool, got {_kind(value)} {_short(value)}"
    if kind == "string":
        return None if isinstance(value, str) else f"expected a string, got {_kind(value)} {_short(value)}"
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {_kind(value)} {_short(value)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, got {_kind(value)} {_short(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    return None


def _same(value: Any, allowed: Scalar) -> bool:
    # 1 == True in Python; an enum of numbers must not accept a bool, nor an enum of strings a number.
    return (type(value) is type(allowed) and value == allowed) or (
        _is_number(value) and _is_number(allowed) and value == allowed
    )


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


def _short(value: object) -> str:
    text = json.dumps(value, default=str) if isinstance(value, dict | list) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class CommandAllowList:
    """The commands each registered device accepts, from its type's `commands` in the registry.

    Args:
        commands_by_type: device type -> command name -> spec (a type without `commands` accepts none).
        device_types: device id -> its type name.
    """

    def __init__(
        self, commands_by_type: Mapping[str, Mapping[str, CommandSpec]], device_types: Mapping[str, str]
    ) -> None:
        self._by_type = {name: dict(commands) for name, commands in commands_by_type.items()}
        self._device_types = dict(device_types)

    def type_of(self, device_id: str) -> str | None:
        """Return the registered type of `device_id`, or None when it is not registered."""
        return self._device_types.get(device_id)

    def commands_of_type(self, type_name: str) -> Mapping[str, CommandSpec]:
        """Return the commands a device type accepts."""
        return self._by_type.get(type_name, {})

    def problems(self, device_id: str, name: str, params: Mapping[str, Any]) -> list[str]:
        """Return every reason why `device_id` does not accept command `name` with `params` (empty: it does)."""
        type_name = self._device_types.get(device_id)
        if type_name is None:
            return [f"device {device_id!r} is not in the registry"]
        return self.type_problems(type_name, name, params)

    def type_problems(self, type_name: str, name: str, params: Mapping[str, Any]) -> list[str]:
        """Return every reason why devices of `type_name` do not accept command `name` with `params`."""
        commands = self._by_type.get(type_name, {})
        spec = commands.get(name)
        if spec is None:
            accepted = f"it accepts: {', '.join(sorted(commands))}" if commands else "it accepts no commands"
            return [f"command {name!r} is not on the allow-list of type {type_name!r} ({accepted})"]
        return spec.problems(name, params)
