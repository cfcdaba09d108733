"""Selectors by device id, registry type and tags; what the engine learns from the registry."""

from __future__ import annotations

from textwrap import dedent

import pytest

from devices.errors import SourceFileError
from devices.event import TelemetryEvent
from devices.registry import parse_registry
from rules.action import RecordAlert
from rules.engine import RuleEngine
from rules.model import DeviceSelector
from rules.parse import build_rule_set
from rules.selector import KnownDevice, device_matcher

T0 = 1_764_000_000.0


def selector(**given: object) -> DeviceSelector:
    return DeviceSelector.model_validate(given)


GH_NORTH = KnownDevice("greenhouse", {"site": "north", "zone": "a"})
GH_SOUTH = KnownDevice("greenhouse", {"site": "south"})
FREEZER = KnownDevice("freezer", {"site": "north"})


@pytest.mark.parametrize(
    ("given", "device", "info", "expected"),
    [
        ({"ids": ["gh-*"]}, "gh-1", None, True),  # ids match devices outside the registry too
        ({"ids": ["gh-*"]}, "fz-1", None, False),
        ({"type": "greenhouse"}, "gh-1", GH_NORTH, True),
        ({"type": "greenhouse"}, "fz-1", FREEZER, False),
        ({"type": ["greenhouse", "freezer"]}, "fz-1", FREEZER, True),
        ({"type": "greenhouse"}, "gh-1", None, False),  # unknown device: no type
        ({"tags": {"site": "north"}}, "fz-1", FREEZER, True),
        ({"tags": {"site": "north"}}, "gh-2", GH_SOUTH, False),
        ({"tags": {"site": ["north", "south"]}}, "gh-2", GH_SOUTH, True),
        ({"tags": {"site": "north", "zone": "a"}}, "gh-1", GH_NORTH, True),  # every tag must match
        ({"tags": {"site": "north", "zone": "a"}}, "fz-1", FREEZER, False),  # no zone tag
        ({"tags": {"site": "north"}}, "gh-1", None, False),  # unknown device: no tags
        ({"ids": ["gh-*"], "type": "greenhouse"}, "gh-1", GH_NORTH, True),
        ({"ids": ["gh-*"], "type": "greenhouse"}, "x-1", GH_NORTH, False),  # all criteria hold
        ({"ids": ["gh-1"], "tags": {"site": "south"}}, "gh-1", GH_NORTH, False),
    ],
)
def test_matching(given: dict[str, object], device: str, info: KnownDevice | None, expected: bool) -> None:
    assert device_matcher(selector(**given))(device, info) is expected


def test_no_selector_matches_every_device() -> None:
    assert device_matcher(None)("anything", None)


RULES = dedent(
    """\
    rules:
      - id: warm-greenhouse
        devices: {type: greenhouse}
        when: temperature > 30
      - id: warm-north
        devices: {tags: {site: north}}
        when: temperature > 30
      - id: warm-any
        devices: [gh-*, fz-*]
        when: temperature > 30
    """
)


def raised(engine: RuleEngine, device: str, t: float = 0.0) -> list[str]:
    actions = engine.process(TelemetryEvent(device, T0 + t, {"temperature": 31}), T0 + t)
    return sorted(a.rule_id for a in actions if isinstance(a, RecordAlert) and a.state == "raised")


def test_the_engine_learns_types_and_tags_from_known_devices() -> None:
    engine = RuleEngine(build_rule_set({"r.yaml": RULES}), known_devices={"gh-1": GH_NORTH, "fz-1": FREEZER})
    assert raised(engine, "gh-1") == ["warm-any", "warm-greenhouse", "warm-north"]
    assert raised(engine, "fz-1") == ["warm-any", "warm-north"]
    assert raised(engine, "gh-9") == ["warm-any"]  # not in the registry: only id selectors match


def test_registry_entries_are_device_info() -> None:
    registry = parse_registry(
        dedent(
            """\
            types:
              greenhouse:
                fields: {temperature: {type: number}}
            devices:
              - {id: gh-1, type: greenhouse, tags: {site: north}}
            """
        ),
        "devices.yaml",
    )
    engine = RuleEngine(build_rule_set({"r.yaml": RULES}))
    engine.add_known_devices(registry.devices, T0)  # what the gateway passes
    assert raised(engine, "gh-1") == ["warm-any", "warm-greenhouse", "warm-north"]


def test_devices_learnt_later_get_a_new_plan() -> None:
    engine = RuleEngine(build_rule_set({"r.yaml": RULES}))
    assert raised(engine, "gh-1") == ["warm-any"]
    engine.process(TelemetryEvent("gh-1", T0 + 1, {"temperature": 20}), T0 + 1)  # clears it
    engine.add_known_devices({"gh-1": GH_NORTH}, T0 + 2)
    assert raised(engine, "gh-1", 3) == ["warm-any", "warm-greenhouse", "warm-north"]


def test_ids_only_keep_working() -> None:
    engine = RuleEngine(build_rule_set({"r.yaml": RULES}), known_devices=["gh-1"])
    assert raised(engine, "gh-1") == ["warm-any"]


@pytest.mark.parametrize(
    ("devices", "where", "message"),
    [
        (
            "{kind: greenhouse}",
            "rules[0].devices.kind",
            "unknown key 'kind'; expected one of: ids, type, tags",
        ),
        ("{}", "rules[0].devices", "expected at least one of `ids`, `type` and `tags`"),
        ("{tags: {'site x': north}}", "rules[0].devices.tags.site x.[key]", "expected a tag name"),
        ("[gh/1]", "rules[0].devices[0]", "expected a device id or glob"),
        ("{ids: [gh/1]}", "rules[0].devices.ids[0]", "expected a device id or glob"),
        ("{type: ''}", "rules[0].devices.type", "expected text (1 to 256 characters) or a list"),
        ("{tags: {site: []}}", "rules[0].devices.tags.site", "expected text (1 to 256 characters) or a list"),
    ],
)
def test_selector_errors_are_located(devices: str, where: str, message: str) -> None:
    text = f"rules:\n  - id: r\n    devices: {devices}\n    when: t > 1\n"
    with pytest.raises(SourceFileError) as caught:
        build_rule_set({"a.yaml": text})
    found = [(p.where, p.message) for p in caught.value.problems]
    assert any(w == where and message in m for w, m in found), found
    assert all(p.line == 3 for p in caught.value.problems)
