"""Measure what simulated devices cost: resident memory and CPU per 1,000 devices.

Starts a mosquitto of its own, runs `tidegate simulate` (quick form, multiplexed connections) as a
child process for each device count, and samples the child's /proc: peak RSS, and CPU time over
the steady part of the run (after the devices have connected). Linux only.

    python3 -m bench.simulator_scale                       # 1,000 and 10,000 devices at 0.1 msg/s
    python3 -m bench.simulator_scale --devices 1000,10000,20000 --rate 0.2 --seconds 60
    python3 -m bench.simulator_scale --fleet deploy/fleets/greenhouse.yaml --devices 0

`--devices 0` with `--fleet` runs the fleet file as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.broker import MosquittoBroker, find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    devices: int
    rate: float
    seconds: float
    sent: int
    peak_rss_mb: float
    steady_cpu_percent: float
    cpu_us_per_message: float
    start_stop_seconds: float  # wall time outside the run: start-up, connecting, the clean stop


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _rss_mb(pid: int) -> float:
    resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return resident * PAGE / 1e6


def measure(broker_url: str, devices: int, rate: float, seconds: float, fleet: str | None) -> Sample:
    """Run one simulation in a child process and sample it."""
    form = ["--fleet", fleet] if fleet and devices == 0 else ["--devices", str(devices), "--rate", str(rate)]
    command = [sys.executable, "-m", "gateway.cli", "simulate", "--broker", broker_url, *form,
               "--duration", f"{seconds}s", "--seed", "1", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    # Files, not pipes: the JSON summary (with every device's last seq) outgrows a pipe's buffer.
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        child = subprocess.Popen(command, stdout=out_file, stderr=err_file, text=True, env=env)
        peak, marks = 0.0, []
        while child.poll() is None:
            try:
                peak = max(peak, _rss_mb(child.pid))
                marks.append((time.monotonic() - started, _cpu_seconds(child.pid)))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                break
            time.sleep(0.25)
        child.wait()
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if child.returncode != 0:
        raise SystemExit(f"simulate failed ({child.returncode}): {err.strip()[-2000:]}")
    summary = json.loads(out)
    total = time.monotonic() - started
    # Steady state: from half to nine tenths of the wall time, after connecting and before stopping.
    steady = [(t, cpu) for t, cpu in marks if 0.5 * total <= t <= 0.9 * total]
    if len(steady) >= 2:
        (t0, c0), (t1, c1) = steady[0], steady[-1]
        cpu_percent = 100.0 * (c1 - c0) / (t1 - t0)
        messages = summary["sent"] / summary["elapsed"] * (t1 - t0)
        per_message = 1e6 * (c1 - c0) / messages if messages else 0.0
    else:
        cpu_percent = per_message = float("nan")
    connect = max(total - summary["elapsed"], 0.0)  # the run's clock starts once all are connected
    return Sample(
        devices=summary["devices"],
        rate=rate,
        seconds=round(summary["elapsed"], 1),
        sent=summary["sent"],
        peak_rss_mb=round(peak, 1),
        steady_cpu_percent=round(cpu_percent, 1),
        cpu_us_per_message=round(per_message, 1),
        start_stop_seconds=round(connect, 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default="1000,10000", help="comma-separated device counts")
    parser.add_argument("--rate", type=float, default=0.1, help="messages/s per device (default 0.1)")
    parser.add_argument("--seconds", type=float, default=40.0, help="seconds per run (default 40)")
    parser.add_argument("--fleet", help="a fleet file, run as is with --devices 0")
    parser.add_argument("--json", metavar="FILE", help="also write the samples to FILE")
    args = parser.parse_args(argv)
    executable = find_mosquitto()
    if executable is None:
        raise SystemExit("mosquitto is not installed")
    samples = []
    with (
        tempfile.TemporaryDirectory() as data,
        MosquittoBroker(executable=executable, data_dir=Path(data)) as broker,
    ):
        for count in (int(n) for n in args.devices.split(",")):
            sample = measure(broker.url, count, args.rate, args.seconds, args.fleet)
            samples.append(sample)
            print(
                f"{sample.devices:>7,} devices  {sample.rate:g} msg/s each  start+stop {sample.start_stop_seconds:5.1f}s  "
                f"peak RSS {sample.peak_rss_mb:7.1f} MB  steady CPU {sample.steady_cpu_percent:5.1f} %  "
                f"{sample.cpu_us_per_message:6.1f} µs/msg  ({sample.sent:,} sent)",
                flush=True,
            )
    if len(samples) >= 2 and samples[-1].devices > samples[0].devices:
        low, high = samples[0], samples[-1]
        thousands = (high.devices - low.devices) / 1000
        rss = (high.peak_rss_mb - low.peak_rss_mb) / thousands
        cpu = (high.steady_cpu_percent - low.steady_cpu_percent) / thousands
        print(
            f"per 1,000 more devices: {rss:.1f} MB resident, {cpu:.2f} % of one core at {args.rate:g} msg/s each"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps([asdict(s) for s in samples], indent=2) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
