"""The example fleets make the example rules fire where they should, and only there.

Each fleet runs against its rule file offline: simulated devices stepped at their due times, their
telemetry decoded as the gateway decodes it, the rule engine ticked every second, and the engine's
commands handed back to the devices, all on a fake clock. Seeds are the fleet files' own, so what
happens is the same on every run.
"""

from __future__ import annotations

import heapq
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devices.command import Command, CommandAck
from devices.errors import PayloadError
from devices.payload import PayloadDecoder
from devices.registry import parse_registry
from rules import build_rule_set
from rules.action import RecordAlert, SendCommand
from rules.engine import RuleEngine
from simulator.fleet import parse_fleet
from simulator.model import SimulatedDevice

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_764_000_000.0  # 2025-11-24T16:00:00Z


@dataclass
class Outcome:
    # (seconds since the start when the engine said so, rule, device, state); an alert's own ts is
    # its event's, which carries the device's clock skew and, for a replayed batch, is minutes old
    alerts: list[tuple[float, str, str, str]] = field(default_factory=list)
    commands: list[tuple[float, str, str]] = field(default_factory=list)  # (elapsed, device, name)
    acks: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)  # by device: payloads the gateway refuses
    readings: int = 0

    def raised(self, rule: str) -> set[str]:
        return {device for _, r, device, state in self.alerts if r == rule and state == "raised"}

    def cleared(self, rule: str) -> set[str]:
        return {device for _, r, device, state in self.alerts if r == rule and state == "cleared"}

    def first(self, rule: str, device: str, state: str = "raised") -> float:
        return min(t for t, r, d, s in self.alerts if (r, d, s) == (rule, device, state))


def drive(fleet_name: str, rule_name: str, minutes: float) -> Outcome:
    fleet = parse_fleet((ROOT / "deploy/fleets" / fleet_name).read_text(encoding="utf-8"), fleet_name)
    rules = build_rule_set({rule_name: (ROOT / "deploy/rules" / rule_name).read_text(encoding="utf-8")})
    registry = parse_registry((ROOT / "deploy/devices.example.yaml").read_text(encoding="utf-8"), "registry")
    assert fleet.seed is not None
    devices = {
        device_id: SimulatedDevice(device_id, group.spec, seed=fleet.seed, start=T0)
        for device_id, group in fleet.devices()
    }
    engine = RuleEngine(rules)
    decoder = PayloadDecoder()
    outcome = Outcome()
    due = [(device.next_due, device_id) for device_id, device in devices.items()]
    heapq.heapify(due)

    def act(actions: Sequence[object], now: float) -> None:
        for action in actions:
            if isinstance(action, RecordAlert):
                outcome.alerts.append((now - T0, action.rule_id, action.device_id, action.state))
            elif isinstance(action, SendCommand):
                outcome.commands.append((now - T0, action.device_id, action.name))
                command = Command(uuid.uuid4().hex, action.device_id, action.name, dict(action.params), now)
                for ack in devices[action.device_id].handle(command, now + 0.05):
                    outcome.acks[CommandAck.decode(action.device_id, ack.payload).status] += 1

    for second in range(int(minutes * 60) + 1):
        now = T0 + second
        act(engine.advance(now), now)
        while due[0][0] <= now:
            at, device_id = heapq.heappop(due)
            device = devices[device_id]
            for message in device.step(at):
                if message.channel != "telemetry":
                    continue
                try:
                    events = decoder.decode(device_id, message.payload, now)
                    validator = registry.validators.get(device_id)
                    for event in events:
                        if validator is not None:
                            validator.check(event)  # what the registry allows its devices to send
                except PayloadError:
                    outcome.rejected[device_id] += 1
                    continue
                for event in events:
                    outcome.readings += 1
                    act(engine.process(event, now), now)
            heapq.heappush(due, (device.next_due, device_id))
    return outcome


def test_greenhouses_overheat_dry_out_and_stick_only_where_the_fleet_says() -> None:
    outcome = drive("greenhouse.yaml", "greenhouse.yaml", minutes=15)
    vents = {"greenhouse-019", "greenhouse-020"}
    assert outcome.raised("greenhouse-overheat") == vents
    assert outcome.cleared("greenhouse-overheat") == vents  # the fan cooled them below 26 °C
    for device in vents:
        assert (
            30 <= outcome.first("greenhouse-overheat", device) <= 40
        )  # the step is at 30 s, readings 10 s apart
    fans = Counter(device for _, device, name in outcome.commands if name == "fan")
    assert set(fans) == vents and min(fans.values()) >= 2  # on, then off
    assert outcome.acks["ok"] >= 3 and sum(outcome.acks.values()) == len(outcome.commands)

    misting = {"greenhouse-017", "greenhouse-018"}
    assert outcome.raised("greenhouse-dry-air") == misting == outcome.cleared("greenhouse-dry-air")
    for device in misting:
        assert 80 <= outcome.first("greenhouse-dry-air", device) <= 90  # from 60 s, the 3rd dry reading

    assert outcome.raised("greenhouse-soil-probe-stuck") == {"greenhouse-004-soil"}
    assert 9 * 60 <= outcome.first("greenhouse-soil-probe-stuck", "greenhouse-004-soil") <= 10 * 60

    # Every device sends a little rubbish, and only the registered ones are checked against their type.
    assert outcome.readings > 2000 and 0 < sum(outcome.rejected.values()) < outcome.readings * 0.02


def test_freezers_warm_up_leave_the_door_open_and_fall_silent_only_where_the_fleet_says() -> None:
    outcome = drive("cold-storage.yaml", "cold-storage.yaml", minutes=20)
    assert outcome.raised("freezer-warm") == {"freezer-11"}
    assert 6 * 60 <= outcome.first("freezer-warm", "freezer-11") <= 8 * 60  # average warm, then 5m
    assert [(device, name) for _, device, name in outcome.commands] == [("freezer-11", "defrost")]

    assert outcome.raised("freezer-door-open") == {"freezer-12"} == outcome.cleared("freezer-door-open")
    # open from 2 min to 6 min, read every 30 s: the 4th open reading, and the first shut one
    assert 3.5 * 60 <= outcome.first("freezer-door-open", "freezer-12") <= 4 * 60
    assert 6 * 60 <= outcome.first("freezer-door-open", "freezer-12", "cleared") <= 6.5 * 60

    assert outcome.raised("freezer-silent") == {"freezer-10"} == outcome.cleared("freezer-silent")
    # offline from 3 min to 11 min: silent 5 min after its last reading, clear when its batch arrives
    assert 7.5 * 60 <= outcome.first("freezer-silent", "freezer-10") <= 8.5 * 60
    assert 11 * 60 <= outcome.first("freezer-silent", "freezer-10", "cleared") <= 11.5 * 60
    assert outcome.readings > 400
