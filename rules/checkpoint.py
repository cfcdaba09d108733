"""The checkpoint format of the rule engine: versioned plain data, and the errors of reading it back.

`RuleEngine.checkpoint()` returns a dict of plain values (dicts, lists, str, int, float, bool, None)
that `json.dumps` can write; `RuleEngine.restore(data, now)` takes it back. Floats may be infinite
(an empty window's min and max), which Python's `json` writes as `Infinity` and reads back.

Layout (version 2)::

    {"format": "tidegate-rules-state", "version": 2,
     "engine": {"start": ..., "newest": {device: ts}, "seen": {device: t},
                "timers": [[due, kind, rule_id, subject], ...]},
     "rules": {rule_id: {"fingerprint": "<sha256 of the definition>", "kind": "rule" | "derived",
                         "alerts": bool, "severity": ..., "alarms": {subject: ...},
                         "states": {subject: {"data": [...], "samples": [...]}}, ...}}}

A subject is a device id, or `<tag>=<value>` for a group. A rule's per-subject `data` is its state
array (`rules.window`): its own timers and N-of-M bits, then its windows. A derived metric keeps
its unfinished intervals instead.

Each rule's state carries a fingerprint of its definition. On restore, a rule whose fingerprint is
unchanged gets its state back; a changed or vanished rule is treated as by a hot reload (see
`rules.engine`). A version 1 file (before group rules and derived metrics) is read as if every
rule had changed: its raised alarms are closed with "rule changed" and the rules start fresh.

CheckpointError (TidegateInputError)   a checkpoint that cannot be restored: corrupt, another
                                       format, or another version; `reason` says which
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

from pydantic import BaseModel

from devices.errors import TidegateInputError
from devices.event import FieldValue
from rules.expression import Aggregate, Expression
from rules.model import ActionTemplate, DerivedMetric, MessageTemplate, Rule

CHECKPOINT_FORMAT: Final = "tidegate-rules-state"
CHECKPOINT_VERSION: Final = 2
# Read only to close the alarms it recorded (see the module docstring).
LEGACY_VERSIONS: Final = (1,)


class CheckpointError(TidegateInputError):
    """A checkpoint cannot be restored; the engine keeps the state it had (normally none)."""

    def __init__(self, reason: str, *, rule_id: str | None = None) -> None:
        super().__init__(reason if rule_id is None else f"rule {rule_id!r}: {reason}")
        self.reason = reason
        self.rule_id = rule_id


def _plain(value: object) -> object:
    """Return `value` as JSON-able data: models field by field, expressions and templates as text."""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Expression | MessageTemplate | ActionTemplate | Aggregate):
        return value.source
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"cannot fingerprint {type(value).__name__}")


def rule_fingerprint(rule: Rule | DerivedMetric) -> str:
    """Return a digest of everything that defines `rule`; equal rules give equal fingerprints."""
    text = json.dumps(_plain(rule), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_header(data: object) -> Mapping[str, Any]:
    """Return the checkpoint's rules section, or raise `CheckpointError` if it is not one we read."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a tidegate rule state file (format {data.get('format')!r})")
    version = data.get("version")
    if version != CHECKPOINT_VERSION and version not in LEGACY_VERSIONS:
        raise CheckpointError(f"version {version!r} is not the supported version {CHECKPOINT_VERSION}")
    rules = data.get("rules")
    if not isinstance(rules, Mapping) or not isinstance(data.get("engine"), Mapping):
        raise CheckpointError("missing the `engine` or `rules` section")
    return rules


def as_float(value: object) -> float:
    """Return a number from the checkpoint as a float, or raise `TypeError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def as_str(value: object) -> str:
    """Return text from the checkpoint, or raise `TypeError`."""
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {value!r}")
    return value


def as_fields(value: object) -> dict[str, FieldValue]:
    """Return a mapping of field values from the checkpoint, or raise `TypeError`."""
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object of fields, got {value!r}")
    fields: dict[str, FieldValue] = {}
    for name, field in value.items():
        if not isinstance(name, str) or not isinstance(field, int | float | str):
            raise TypeError(f"expected a field value, got {name!r}: {field!r}")
        fields[name] = field
    return fields


def times(value: object) -> dict[str, float]:
    """Return a mapping of device id to time from the checkpoint, or raise `TypeError`."""
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object of times, got {value!r}")
    return {as_str(key): as_float(t) for key, t in value.items()}
