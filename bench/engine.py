"""Benchmark the rule engine alone: events replayed with explicit timestamps, no I/O.

    python3 -m bench.engine                       # 10,000 devices, 10 rules, 1 event/s per device
    python3 -m bench.engine --devices 100 --warmup 10 --seconds 5     # a smoke run
    python3 -m bench.engine --profile             # also print the top of a cProfile of the timed part

Issue 3's workload: every device has 10 rules, 3 of them windowed over 5 minutes, and sends one event
per second (`ts` spread over the second, so devices interleave). The engine is driven as the gateway
drives it: `process(event, now)` per event and `advance(now)` once a second. About 1 % of events
carry a trigger temperature, so one rule raises and clears (an alert and a command each time).

Two figures:
- events/s on one core: only the `process`/`advance` calls are timed; building events is not.
  The warm-up (`--warmup` simulated seconds) fills the 5-minute windows first.
- rule state bytes per device: a separate run under `tracemalloc` counts what the engine holds
  after `--memory-warmup` simulated seconds (default 60; the state is allocated whole when a
  device is first seen, so a longer run measures the same, only ~10x slower under tracemalloc),
  Python allocations only, device id strings excluded (the registry owns them), divided by the
  number of devices. RSS growth over that run is printed too; it includes tracemalloc's own
  bookkeeping and allocator slack.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import resource
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from devices.event import FieldValue, TelemetryEvent
from rules import RuleEngine, build_rule_set

T0: Final = 1_764_000_000.0
TARGET_EVENTS_PER_SECOND: Final = 200_000
TARGET_BYTES_PER_DEVICE: Final = 2_048
TRIGGER_TEMPERATURE: Final = 99.5
# Field values cycle through this many variants per device; prime, so devices drift apart.
_VARIANTS: Final = 97

# Seven threshold rules (evaluated on every event, quiet but for `overheat`) and three rules over
# 5-minute sliding windows, each on a different field so no window is shared.
RULES: Final = """\
rules:
  - id: overheat
    when: temperature > 99
    clear: temperature < 90
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
  - id: pressure-low
    when: pressure < 950
  - id: battery-low
    devices: ["dev-0*", "dev-1*"]
    when: battery < 3.3
    clear: battery > 3.5
  - id: weak-signal
    when: rssi < -110
  - id: door-open-hot
    when: door and temperature > 35
  - id: temperature-trend
    when: avg(temperature, 5m) > 60
  - id: humidity-swing
    when: max(humidity, 5m) - min(humidity, 5m) > 50
  - id: co2-rising
    when: delta(co2, 5m) > 1500
"""


@dataclass(frozen=True, slots=True)
class Result:
    """What one timed run measured."""

    devices: int
    events: int
    seconds: float
    actions: int

    @property
    def events_per_second(self) -> float:
        """Return events processed per second of engine time."""
        return self.events / self.seconds if self.seconds else 0.0


def device_ids(devices: int) -> list[str]:
    """Return the device ids of the run: `dev-00000`, `dev-00001`, ..."""
    return [f"dev-{index:05d}" for index in range(devices)]


def _variants() -> list[dict[str, FieldValue]]:
    variants: list[dict[str, FieldValue]] = []
    for i in range(_VARIANTS):
        wobble = (i * 7919) % 1000 / 1000.0
        variants.append(
            {
                # one variant in a hundred-odd is a trigger: `overheat` raises, the next event clears
                "temperature": TRIGGER_TEMPERATURE if i == 0 else 18.0 + wobble * 12.0,
                "humidity": 35.0 + wobble * 30.0,
                "pressure": 990.0 + wobble * 40.0,
                "battery": 3.6 + wobble * 0.5,
                "co2": 400.0 + wobble * 500.0,
                "rssi": -40.0 - wobble * 50.0,
                "door": False,
            }
        )
    return variants


def second_of_events(
    ids: Sequence[str], second: int, variants: Sequence[dict[str, FieldValue]]
) -> list[TelemetryEvent]:
    """Return one simulated second of events: one per device, spread over the second."""
    count = len(ids)
    base = T0 + second
    return [
        TelemetryEvent(device_id, base + index / count, variants[(index + second) % _VARIANTS], second + 1)
        for index, device_id in enumerate(ids)
    ]


def replay(
    engine: RuleEngine, ids: Sequence[str], seconds: range, *, timer: Callable[[], float] = time.perf_counter
) -> tuple[float, int, int]:
    """Feed `seconds` of events to `engine`; return engine time, events and actions."""
    variants = _variants()
    spent = 0.0
    events = actions = 0
    process, advance = engine.process, engine.advance
    for second in seconds:
        batch = second_of_events(ids, second, variants)
        start = timer()
        for event in batch:
            actions += len(process(event, event.ts))
        actions += len(advance(T0 + second + 1))
        spent += timer() - start
        events += len(batch)
    return spent, events, actions


def new_engine(ids: Sequence[str]) -> RuleEngine:
    """Build the engine of the benchmark, with every device known (as from the registry)."""
    engine = RuleEngine(build_rule_set({"bench.yaml": RULES}))
    engine.add_known_devices(ids, T0)
    return engine


def measure_speed(devices: int, warmup: int, seconds: int, *, profile: bool = False) -> tuple[Result, str]:
    """Warm up, then time `seconds` simulated seconds; return the result and an optional profile."""
    ids = device_ids(devices)
    engine = new_engine(ids)
    replay(engine, ids, range(warmup))
    gc.collect()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    spent, events, actions = replay(engine, ids, range(warmup, warmup + seconds))
    report = ""
    if profiler is not None:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        report = out.getvalue()
    return Result(devices, events, spent, actions), report


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure_memory(devices: int, warmup: int) -> tuple[float, float]:
    """Return (traced bytes per device, RSS growth per device) of the engine's state after `warmup`."""
    ids = device_ids(devices)
    gc.collect()
    tracemalloc.start()
    rss_before = _rss_bytes()
    before = tracemalloc.get_traced_memory()[0]
    engine = new_engine(ids)
    replay(engine, ids, range(warmup))
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - before
    rss = _rss_bytes() - rss_before
    tracemalloc.stop()
    del engine
    return traced / devices, rss / devices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.engine",
        description="Benchmark the rule engine alone (issue 3): events/s on one core and rule state "
        "bytes per device, for N devices with 10 rules each (3 over 5-minute windows) at 1 event/s "
        "per device, replayed with explicit timestamps.",
    )
    parser.add_argument("--devices", type=int, default=10_000, help="devices (default 10000)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=300,
        help="simulated seconds replayed before measuring, to fill the 5m windows (default 300)",
    )
    parser.add_argument("--seconds", type=int, default=60, help="simulated seconds timed (default 60)")
    parser.add_argument(
        "--memory-warmup",
        type=int,
        default=60,
        help="simulated seconds replayed under tracemalloc before the state is counted (default 60)",
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the timed part")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
    return parser


def _lines(result: Result, traced: float | None, rss: float | None) -> Iterator[str]:
    rate = result.events_per_second
    yield (
        f"engine: {result.devices:,} devices x 10 rules (3 windowed over 5m), "
        f"{result.events:,} events in {result.seconds:.2f} s of engine time, {result.actions:,} actions"
    )
    verdict = "meets" if rate >= TARGET_EVENTS_PER_SECOND else "misses"
    yield f"events/s (one core): {rate:,.0f}  ({verdict} the target of {TARGET_EVENTS_PER_SECOND:,})"
    if traced is not None and rss is not None:
        verdict = "meets" if traced <= TARGET_BYTES_PER_DEVICE else "misses"
        yield (
            f"rule state per device: {traced:,.0f} bytes traced ({verdict} the target of "
            f"{TARGET_BYTES_PER_DEVICE:,}); RSS growth {rss:,.0f} bytes"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    args = _parser().parse_args(argv)
    if args.devices < 1 or args.warmup < 0 or args.seconds < 1 or args.memory_warmup < 1:
        _parser().error("--devices, --seconds and --memory-warmup must be at least 1, --warmup at least 0")
    result, report = measure_speed(args.devices, args.warmup, args.seconds, profile=args.profile)
    traced = rss = None
    if not args.no_memory:
        traced, rss = measure_memory(args.devices, args.memory_warmup)
    for line in _lines(result, traced, rss):
        print(line)
    if report:
        print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
