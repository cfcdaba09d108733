"""Simulated devices: a pure sensor-and-fan model, and a runner that puts many of them on MQTT."""

from simulator.model import SimulatedDevice, ThermalProfile
from simulator.runner import (
    BrokerUnavailableError,
    SimulationSummary,
    SimulatorError,
    device_ids,
    run_simulation,
)

__all__ = [
    "BrokerUnavailableError",
    "SimulatedDevice",
    "SimulationSummary",
    "SimulatorError",
    "ThermalProfile",
    "device_ids",
    "run_simulation",
]
