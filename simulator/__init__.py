"""Simulated devices: a fleet file model, pure signals and faults, and a runner that puts them on MQTT."""

from simulator.fleet import Fleet, parse_fleet, quick_fleet
from simulator.model import Outgoing, SimulatedDevice
from simulator.runner import (
    BrokerUnavailableError,
    SimulationSummary,
    SimulatorError,
    device_ids,
    read_fleet_file,
    run_simulation,
)

__all__ = [
    "BrokerUnavailableError",
    "Fleet",
    "Outgoing",
    "SimulatedDevice",
    "SimulationSummary",
    "SimulatorError",
    "device_ids",
    "parse_fleet",
    "quick_fleet",
    "read_fleet_file",
    "run_simulation",
]
