"""The fixed workload: device ids, payloads, which messages trigger a command, and the rule set.

Message `i` of a run (0-based) goes to device `i % devices` with `seq = i // devices + 1`, so every
device counts 1, 2, 3, ... and a (device, seq) pair names one message: that is how the benchmark
counts what was lost or duplicated. A fraction of messages (1 % by default) carry
`temperature: 99.5`, which raises the `overheat` rule, which sends a `fan` command to the device.
The next message of that device is normal again and clears the alarm, so every trigger produces
exactly one command (see `is_trigger`). Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Final

DEVICE_PREFIX: Final = "dev-"
TELEMETRY_TOPIC: Final = "devices/{device_id}/telemetry"
TELEMETRY_FILTER: Final = "devices/+/telemetry"
COMMAND_FILTER: Final = "devices/+/commands"
COMMAND_ACK_TOPIC: Final = "devices/{device_id}/commands/ack"
TRIGGER_TEMPERATURE: Final = 99.5
_GOLDEN: Final = 2654435761  # Knuth's multiplicative hash: spreads triggers evenly over the run

# ~150 bytes with a 10-digit epoch and microseconds; metric names and value ranges of a small
# environmental sensor. Formatted with %, which is several times cheaper than json.dumps here.
_PAYLOAD: Final = (
    b'{"ts": %.6f, "seq": %d, "temperature": %.2f, "humidity": %.1f, "pressure": %.1f, '
    b'"battery": %.3f, "co2": %d, "rssi": %d, "door": false}'
)

# Ten threshold rules; only `overheat` fires (on trigger messages), the others are evaluated on every
# message and stay quiet, as most rules do most of the time. `battery-low` is limited to a glob of
# devices so device matching is exercised too.
THRESHOLD_RULES: Final = """\
rules:
  - id: overheat
    when: temperature > 99
    severity: critical
    message: "temperature {temperature:.1f} above 99"
    on_raise:
      - alert
      - command: {name: fan, params: {on: true}}
  - id: freezing
    when: temperature < -20
  - id: humid
    when: humidity > 95
    clear: humidity < 90
  - id: dry
    when: humidity < 5
  - id: pressure-low
    when: pressure < 950
  - id: battery-low
    devices: ["dev-0*", "dev-1*"]
    when: battery < 3.3
    clear: battery > 3.5
  - id: co2-high
    when: co2 > 2000
  - id: weak-signal
    when: rssi < -110
  - id: door-open-hot
    when: door and temperature > 35
  - id: heat-index
    when: temperature + humidity / 10 > 120
"""

# The workload has 3 of the 10 rules windowed: the default run swaps these in for three
# threshold rules (see `rule_files`); `--threshold-only` keeps the ten threshold rules the first
# figures used. They must stay quiet on the workload, like the threshold rules they replace.
WINDOWED_RULES: Final = """\
rules:
  - id: temperature-trend
    when: avg(temperature, 1m) > 60
  - id: humidity-swing
    when: max(humidity, 10 events) - min(humidity, 10 events) > 50
  - id: co2-rising
    when: delta(co2, 5m) > 1500
"""
WINDOWED_REPLACES: Final = ("dry", "co2-high", "heat-index")


def device_id(index: int) -> str:
    """Return the id of device number `index`."""
    return f"{DEVICE_PREFIX}{index:05d}"


def device_index(device: str) -> int:
    """Return the number of a device id made by `device_id`."""
    return int(device[len(DEVICE_PREFIX) :])


def message_key(device: int, seq: int) -> int:
    """Pack (device number, seq) into one int, for compact loss and duplicate counting."""
    return (device << 32) | seq


def _hashed(i: int) -> float:
    return ((i * _GOLDEN) & 0xFFFFFFFF) / 2**32


def is_trigger(i: int, devices: int, fraction: float) -> bool:
    """Tell whether message `i` carries the trigger temperature.

    About `fraction` of messages do, and never two in a row of one device: the message before (same
    device, previous seq) clears the alarm the previous trigger raised, so each trigger raises it
    again and sends exactly one command.
    """
    if _hashed(i) >= fraction:
        return False
    return i < devices or _hashed(i - devices) >= fraction


def payload(i: int, devices: int, ts: float, trigger: bool) -> bytes:
    """Build message `i`'s payload, stamped with its publish time `ts`."""
    device = i % devices
    seq = i // devices + 1
    wobble = (i * 7919) % 1000 / 1000.0  # deterministic variety without a random generator
    temperature = TRIGGER_TEMPERATURE if trigger else 18.0 + (device % 10) + wobble * 4.0
    return _PAYLOAD % (
        ts,
        seq,
        temperature,
        35.0 + wobble * 30.0,
        990.0 + wobble * 40.0,
        3.6 + wobble * 0.5,
        400 + int(wobble * 500),
        -40 - int(wobble * 50),
    )


def rule_files(windowed: bool = False) -> dict[str, str]:
    """Return the rule files (name -> YAML text) for `rules.build_rule_set`."""
    if not windowed:
        return {"bench.yaml": THRESHOLD_RULES}
    kept = []
    skipping = False
    for line in THRESHOLD_RULES.splitlines(keepends=True):
        if line.startswith("  - id: "):
            skipping = line.split(":", 1)[1].strip() in WINDOWED_REPLACES
        if not skipping:
            kept.append(line)
    return {"bench.yaml": "".join(kept), "bench-windowed.yaml": WINDOWED_RULES}
