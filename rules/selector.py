"""Which devices a rule applies to: device ids and globs, registry device types, registry tags."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from rules.model import DeviceSelector

_GLOB_CHARS = re.compile(r"[*?\[]")


class DeviceInfo(Protocol):
    """What the engine knows of a registry device (`devices.registry.DeviceEntry` is one)."""

    @property
    def type(self) -> str | None:
        """The device type, if the registry gives one."""
        ...

    @property
    def tags(self) -> Mapping[str, str]:
        """The device's tags."""
        ...


@dataclass(frozen=True, slots=True)
class KnownDevice:
    """A device's type and tags, for engines fed without a registry (rule-file tests, benchmarks)."""

    type: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


DeviceMatcher = Callable[[str, "DeviceInfo | None"], bool]


def _any(device_id: str, info: DeviceInfo | None) -> bool:
    return True


def device_matcher(selector: DeviceSelector | None) -> DeviceMatcher:
    """Return a test of (device id, registry info or None) against `selector` (None: every device).

    Every criterion the selector gives must hold. A device without registry info has no type and
    no tags, so a selector naming a type or tags never matches it.
    """
    if selector is None:
        return _any
    id_match = _id_matcher(selector.ids)
    types = frozenset(selector.types) if selector.types is not None else None
    tags = tuple((name, frozenset(values)) for name, values in selector.tag_values.items())
    if types is None and not tags:
        return lambda device_id, info: id_match(device_id)

    def matches(device_id: str, info: DeviceInfo | None) -> bool:
        if info is None or not id_match(device_id):
            return False
        if types is not None and info.type not in types:
            return False
        device_tags = info.tags
        return all(device_tags.get(name) in values for name, values in tags)

    return matches


def _id_matcher(patterns: list[str] | None) -> Callable[[str], bool]:
    if patterns is None:
        return lambda device_id: True
    exact = frozenset(p for p in patterns if _GLOB_CHARS.search(p) is None)
    globs = [p for p in patterns if _GLOB_CHARS.search(p) is not None]
    if not globs:
        return exact.__contains__
    # fnmatch.translate gives `(?s:...)\Z`; one alternation means one regex call per device id.
    glob_match = re.compile("|".join(fnmatch.translate(g) for g in globs)).match
    return lambda device_id: device_id in exact or glob_match(device_id) is not None
