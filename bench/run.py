"""Run the benchmark: `python3 -m bench.run [--quick] [options]` (see bench/README.md).

One run starts its own Mosquitto (and influxd), creates a persistent session per subscriber, publishes
one burst that the broker queues for all of them, then lets each subscriber drain its backlog in
turn: mosquitto_sub, a bare paho-mqtt subscriber, tidegate into the null store and tidegate into
InfluxDB (QoS 1; QoS 0 for the two references). Then tidegate runs again while publishers send at a
fraction of its saturation rate, for latency. Results go to the terminal, `bench-results/latest.json`
and `bench-results/latest.png`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Event
from typing import Any, Literal

import paho.mqtt

from bench.gateway_run import GatewayJob, Profile, gateway_main, profile_path
from bench.load import PublishJob, publisher_main
from bench.report import check_targets, command_latencies, plot, primary_rate, render, write_json
from bench.servers import InfluxServer, bench_broker, find_influxd, process_cpu
from bench.subscribers import (
    CountJob,
    ListenJob,
    command_listener_main,
    create_session,
    find_mosquitto_sub,
    paho_counter_main,
    remove_session,
    run_mosquitto_sub,
)
from bench.workload import COMMAND_ACK_TOPIC, TELEMETRY_FILTER, is_trigger, payload
from gateway.broker import MosquittoBroker

ACK_FILTER = COMMAND_ACK_TOPIC.replace("{device_id}", "+")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Everything that defines a run; stored in the results."""

    messages: int = 200_000
    devices: int = 10_000
    publishers: int = 2
    trigger_fraction: float = 0.01
    protocol: str = "5"
    paced: tuple[float, ...] = (0.5,)
    paced_rates: tuple[float, ...] = ()  # absolute offered loads (msg/s), the same whatever the saturation
    paced_seconds: float = 15.0
    influx: bool = True
    qos0: bool = True
    cprofile: bool = False
    windowed: bool = True
    gc_freeze: bool = True
    gc_threshold: tuple[int, ...] = ()
    batch_size: int = 5_000
    flush_interval: float = 1.0
    max_pending: int = 50_000
    idle_timeout: float = 15.0
    quick: bool = False


@dataclass(frozen=True, slots=True)
class Drain:
    """One subscriber that drains the burst from its own session."""

    name: str
    kind: Literal["mosquitto_sub", "paho", "tidegate"]
    qos: int
    client_id: str
    store: Literal["null", "influx"] = "null"
    profile: Profile = "sample"


class _Child:
    """A spawned child process that sends one result dict back through a pipe."""

    def __init__(
        self, ctx: SpawnContext, name: str, target: Callable[..., None], args: tuple[Any, ...]
    ) -> None:
        self.name = name
        self.conn, child = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
        self.process.start()
        child.close()

    def result(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        try:
            while not self.conn.poll(0.2):
                if time.monotonic() > deadline:
                    self.process.terminate()
                    return {"error": f"{self.name} sent no result within {timeout:.0f}s"}
            result: dict[str, Any] = self.conn.recv()
            return result
        except EOFError:
            return {"error": f"{self.name} exited ({self.process.exitcode}) without a result"}
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
            self.conn.close()


class Bench:
    """One benchmark run against its own broker (and influxd)."""

    def __init__(
        self, config: BenchConfig, broker: MosquittoBroker, influx: InfluxServer | None, work: Path, out: Path
    ) -> None:
        self.config = config
        self.broker = broker
        self.influx = influx
        self.work = work
        self.out = out
        self.ctx = multiprocessing.get_context("spawn")
        self.run_id = uuid.uuid4().hex[:6]
        self.notes: list[str] = []

    # -- load ----------------------------------------------------------------------------------------

    def publish(self, label: str, messages: int, rate: float = 0.0) -> dict[str, Any]:
        """Publish `messages` at `rate` (0 = a burst) from the publisher processes; wait for all PUBACKs."""
        config = self.config
        go = self.ctx.Event()
        children, readies = [], []
        for index in range(config.publishers):
            ready = self.ctx.Event()
            job = PublishJob(
                host=self.broker.host,
                port=self.broker.port,
                client_id=f"bench-pub-{self.run_id}-{label}-{index}",
                index=index,
                publishers=config.publishers,
                devices=config.devices,
                messages=messages,
                trigger_fraction=config.trigger_fraction,
                rate=rate,
            )
            children.append(_Child(self.ctx, f"publisher {index}", publisher_main, (job, ready, go)))
            readies.append(ready)
        for ready in readies:
            ready.wait(60)
        go.set()
        timeout = 120 + (messages / rate if rate else messages / 2000)
        parts = [child.result(timeout) for child in children]
        errors = [part["error"] for part in parts if part.get("error")]
        if errors:
            raise RuntimeError(f"publishing failed: {'; '.join(errors)}")
        first = min(part["first_ts"] for part in parts)
        last = max(part["last_ts"] for part in parts)
        published = sum(part["published"] for part in parts)
        return {
            "published": published,
            "acked": sum(part["acked"] for part in parts),
            "seconds": last - first,
            "rate": published / (last - first) if last > first else 0.0,
            "offered_rate": rate,
            "cpu_s": sum(part["cpu_s"] for part in parts),
            "last_ts": last,
            "triggers": [trigger for part in parts for trigger in part["triggers"]],
        }

    # -- subscribers ---------------------------------------------------------------------------------

    def make_sessions(self, drains: list[Drain]) -> None:
        for drain in drains:
            subscriptions = [(TELEMETRY_FILTER, drain.qos)]
            if drain.kind == "tidegate":
                subscriptions.append((ACK_FILTER, 1))
            create_session(
                self.broker.host, self.broker.port, drain.client_id, self.config.protocol, subscriptions
            )

    def drain(self, drain: Drain, load: dict[str, Any]) -> dict[str, Any]:
        """Let one subscriber drain the backlog; return its row of the saturation table."""
        config = self.config
        expected = load["published"]
        timeout = config.idle_timeout * 2 + expected / 1000 + 60
        broker_cpu = process_cpu(self.broker.pid)
        influx_cpu = process_cpu(self.influx.pid) if self.influx is not None else 0.0
        row: dict[str, Any] = {"name": drain.name, "qos": drain.qos, "messages": expected}
        if drain.kind == "mosquitto_sub":
            executable = find_mosquitto_sub()
            assert executable is not None
            row.update(
                run_mosquitto_sub(
                    executable=executable,
                    host=self.broker.host,
                    port=self.broker.port,
                    client_id=drain.client_id,
                    protocol=config.protocol,
                    qos=drain.qos,
                    expected=expected,
                    timeout=timeout,
                    out_dir=self.work,
                )
            )
        elif drain.kind == "paho":
            job = CountJob(
                self.broker.host,
                self.broker.port,
                drain.client_id,
                config.protocol,
                expected,
                config.idle_timeout,
            )
            row.update(_Child(self.ctx, drain.name, paho_counter_main, (job,)).result(timeout))
        else:
            database = f"bench_{self.run_id}_{drain.client_id.rsplit('-', 1)[-1]}"
            listener = self.start_listener(drain.client_id)
            gateway, _ = self.start_gateway(
                drain.client_id,
                drain.store,
                expected,
                database=database,
                profile=drain.profile,
                profile_file=self._profile_file() if drain.profile == "cprofile" else "",
            )
            row.update(gateway.result(timeout))
            commands = self.stop_listener(listener)
            summary = command_latencies(load["triggers"], commands)
            row["commands"] = {key: summary[key] for key in ("triggers", "received", "missing", "unexpected")}
            if drain.store == "influx" and self.influx is not None and not row.get("error"):
                row["database"] = database
                row["stored_in_influxdb"] = self.influx.count(database)
        row["broker_cpu_s"] = process_cpu(self.broker.pid) - broker_cpu
        self.forget(drain.client_id)
        if drain.store == "influx" and self.influx is not None:
            row["influxd_cpu_s"] = process_cpu(self.influx.pid) - influx_cpu
        if "cpu_s" in row and row.get("distinct"):
            row["cpu_us_per_msg"] = row["cpu_s"] / row["distinct"] * 1e6
        return row

    def _profile_file(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        return profile_path(self.out.resolve(), "tidegate-cprofile")

    def forget(self, client_id: str) -> None:
        """Drop a finished subscriber's session so later runs do not pay for queueing to it."""
        remove_session(self.broker.host, self.broker.port, client_id, self.config.protocol)

    def start_listener(self, name: str) -> tuple[_Child, Event]:
        ready, stop = self.ctx.Event(), self.ctx.Event()
        job = ListenJob(self.broker.host, self.broker.port, f"bench-devices-{name}")
        child = _Child(self.ctx, "command listener", command_listener_main, (job, ready, stop))
        if not ready.wait(30):
            raise RuntimeError("the command listener did not subscribe within 30s")
        return child, stop

    def stop_listener(self, listener: tuple[_Child, Event]) -> list[tuple[int, float, float]]:
        child, stop = listener
        stop.set()
        result = child.result(30)
        if result.get("error"):
            raise RuntimeError(f"command listener: {result['error']}")
        commands: list[tuple[int, float, float]] = result["commands"]
        return commands

    def start_gateway(
        self,
        client_id: str,
        store: Literal["null", "influx"],
        expected: int,
        *,
        database: str = "",
        profile: Profile = "none",
        profile_file: str = "",
        latency: bool = False,
    ) -> tuple[_Child, Event]:
        config = self.config
        ready = self.ctx.Event()
        job = GatewayJob(
            host=self.broker.host,
            port=self.broker.port,
            client_id=client_id,
            protocol=config.protocol,
            store=store,
            expected=expected,
            idle_timeout=config.idle_timeout,
            batch_size=config.batch_size,
            flush_interval=config.flush_interval,
            max_pending=config.max_pending,
            influx_url=self.influx.url if self.influx is not None else "",
            database=database,
            profile=profile,
            profile_path=profile_file,
            windowed=config.windowed,
            latency=latency,
            gc_freeze=config.gc_freeze,
            gc_threshold=config.gc_threshold,
        )
        return _Child(self.ctx, f"tidegate ({store})", gateway_main, (job, ready)), ready

    # -- paced ---------------------------------------------------------------------------------------

    def paced(
        self, name: str, store: Literal["null", "influx"], fraction: float, saturation: float
    ) -> dict[str, Any]:
        """Run tidegate while publishers offer `fraction` of its saturation rate; return latencies."""
        config = self.config
        rate = saturation * fraction
        messages = max(config.publishers, int(rate * config.paced_seconds))
        label = f"paced{store}{round(fraction * 100)}-{round(rate)}"
        client_id = f"tidegate-{self.run_id}-{label}"
        create_session(
            self.broker.host,
            self.broker.port,
            client_id,
            config.protocol,
            [(TELEMETRY_FILTER, 1), (ACK_FILTER, 1)],
        )
        listener = self.start_listener(client_id)
        gateway, ready = self.start_gateway(
            client_id, store, messages, database=f"bench_{self.run_id}_{label}", latency=True
        )
        row: dict[str, Any] = {"name": name, "fraction": fraction, "offered_rate": rate, "messages": messages}
        if not ready.wait(60):
            row.update(gateway.result(5))
            self.stop_listener(listener)
            row.setdefault("error", "tidegate did not connect")
            return row
        load = self.publish(label, messages, rate)
        row["publish_rate"] = load["rate"]
        row["publishers_cpu_s"] = load["cpu_s"]
        if load["rate"] < rate * 0.95:
            self.notes.append(
                f"{name} at {fraction:.2f}: publishers reached only {load['rate']:,.0f} of {rate:,.0f} msg/s"
            )
        row.update(gateway.result(config.idle_timeout * 2 + 60))
        if row.get("last_at"):
            row["behind_at_end_s"] = row["last_at"] - load["last_ts"]  # last stored - last published
        commands = self.stop_listener(listener)
        self.forget(client_id)
        row["commands"] = command_latencies(load["triggers"], commands)
        if "cpu_s" in row and row.get("distinct"):
            row["cpu_us_per_msg"] = row["cpu_s"] / row["distinct"] * 1e6
        return row


def _drains(config: BenchConfig, run_id: str, influx: bool) -> list[Drain]:
    def cid(name: str) -> str:
        return f"bench-{run_id}-{name}"

    drains: list[Drain] = []
    mosquitto_sub = find_mosquitto_sub() is not None
    if mosquitto_sub:
        drains.append(Drain("mosquitto_sub", "mosquitto_sub", 1, cid("mosq1")))
    drains.append(Drain("paho-mqtt", "paho", 1, cid("paho1")))
    drains.append(Drain("tidegate null", "tidegate", 1, cid("null")))
    if influx:
        drains.append(Drain("tidegate influxdb", "tidegate", 1, cid("influx"), store="influx"))
    if config.qos0:
        if mosquitto_sub:
            drains.append(Drain("mosquitto_sub", "mosquitto_sub", 0, cid("mosq0")))
        drains.append(Drain("paho-mqtt", "paho", 0, cid("paho0")))
    if config.cprofile:
        drains.append(Drain("tidegate null (cProfile)", "tidegate", 1, cid("cprofile"), profile="cprofile"))
    return drains


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def run(config: BenchConfig, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark and return the results (see `render` for what they hold)."""
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python3 -m bench.run", *sys.argv[1:]]),
        "config": asdict(config)
        | {
            "rules": "10 rules, 7 threshold + 3 windowed"
            if config.windowed
            else "10 threshold rules (none windowed)"
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "paho_mqtt": paho.mqtt.__version__,
            "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        },
        "saturation": [],
        "paced": [],
        "phase_seconds": {},
    }
    phases: dict[str, float] = results["phase_seconds"]
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[name] = round(phases.get(name, 0.0) + now - clock, 2)
        clock = now

    sample = [
        payload(i, config.devices, time.time(), is_trigger(i, config.devices, 0.0)) for i in range(1000)
    ]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tidegate-bench-")))
        broker = bench_broker(max_queued_messages=max(1_000_000, config.messages * 2))
        stack.callback(broker.close)
        broker.start()
        influx: InfluxServer | None = None
        notes: list[str] = []
        if config.influx:
            executable = find_influxd()
            if executable is None:
                notes.append("influxd not found (apt-get install influxdb): InfluxDB runs skipped")
            else:
                influx = stack.enter_context(InfluxServer(executable))
                results["machine"]["influxd"] = _version([executable, "version"])
        if find_mosquitto_sub() is None:
            notes.append("mosquitto_sub not found (apt-get install mosquitto-clients): its runs skipped")
        results["machine"]["mosquitto"] = _version([broker.executable, "-h"])
        bench = Bench(config, broker, influx, work, out)
        bench.notes.extend(notes)
        drains = _drains(config, bench.run_id, influx is not None)
        bench.make_sessions(drains)
        phase("servers and sessions")
        log(f"publishing a burst of {config.messages:,} messages, queued for {len(drains)} sessions ...")
        load = bench.publish("burst", config.messages)
        results["load"] = {k: v for k, v in load.items() if k != "triggers"} | {
            "payload_bytes": sum(map(len, sample)) / len(sample),
            "triggers": len(load["triggers"]),
        }
        phase("burst")
        for drain in drains:
            log(f"draining: {drain.name} QoS {drain.qos} ...")
            results["saturation"].append(bench.drain(drain, load))
            phase(f"drain {drain.name} QoS {drain.qos}")
        rows = {r["name"]: r for r in results["saturation"] if r["qos"] == 1 and not r.get("error")}
        for name, store in (("tidegate null", "null"), ("tidegate influxdb", "influx")):
            if name not in rows:
                continue
            saturation = primary_rate(rows[name])
            fractions = [*config.paced, *(rate / saturation for rate in config.paced_rates if saturation > 0)]
            for fraction in fractions:
                log(f"paced: {name} at {fraction:.2f} of {saturation:,.0f} msg/s ...")
                results["paced"].append(bench.paced(name, store, fraction, saturation))  # type: ignore[arg-type]
                phase(f"paced {name} {fraction:.2f}")
        results["notes"] = bench.notes
    phase("shutdown")
    results["machine"]["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results["targets"] = check_targets(results)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.run",
        description="Benchmark tidegate against mosquitto_sub and a bare paho-mqtt subscriber on a real Mosquitto.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run (4,000 messages, 1,000 devices)"
    )
    parser.add_argument("--messages", type=int, help="burst size (default 200,000; quick 4,000)")
    parser.add_argument("--devices", type=int, help="device ids (default 10,000; quick 1,000)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument(
        "--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version of the subscribers"
    )
    parser.add_argument(
        "--paced", default="0.5", help="paced loads as fractions of saturation, comma-separated (default 0.5)"
    )
    parser.add_argument(
        "--paced-rates",
        default="",
        help="paced loads in msg/s, comma-separated, run after the --paced fractions: the same load for "
        "every variant being compared, where a fraction of a faster gateway's saturation is more load",
    )
    parser.add_argument("--paced-seconds", type=float, help="length of each paced run (default 15; quick 2)")
    parser.add_argument("--trigger-fraction", type=float, default=0.01, help="messages that fire a command")
    parser.add_argument("--no-influx", action="store_true", help="skip the InfluxDB runs")
    parser.add_argument("--no-qos0", action="store_true", help="skip the QoS 0 reference runs")
    parser.add_argument(
        "--cprofile", action="store_true", help="add a tidegate drain under cProfile (slower)"
    )
    parser.add_argument(
        "--threshold-only",
        dest="windowed",
        action="store_false",
        help="ten threshold rules instead of the issue's workload (7 threshold + 3 windowed)",
    )
    parser.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="what-if: leave out the gc.freeze() that `tidegate run` makes once the gateway is built",
    )
    parser.add_argument(
        "--gc-threshold",
        metavar="N[,N1[,N2]]",
        default="",
        help="what-if: gc.set_threshold(N, ...) in tidegate (the collector's generation thresholds)",
    )
    parser.add_argument("--batch-size", type=int, default=5_000, help="tidegate batch.size")
    parser.add_argument("--flush-interval", type=float, default=1.0, help="tidegate batch.flush_interval (s)")
    parser.add_argument("--max-pending", type=int, default=50_000, help="tidegate batch.max_pending")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    return BenchConfig(
        messages=args.messages or (4_000 if quick else 200_000),
        devices=args.devices or (1_000 if quick else 10_000),
        publishers=args.publishers,
        trigger_fraction=args.trigger_fraction,
        protocol=args.protocol,
        paced=tuple(float(part) for part in args.paced.split(",") if part.strip()),
        paced_rates=tuple(float(part) for part in args.paced_rates.split(",") if part.strip()),
        paced_seconds=args.paced_seconds or (2.0 if quick else 15.0),
        influx=not args.no_influx,
        qos0=not args.no_qos0,
        cprofile=args.cprofile,
        windowed=args.windowed,
        gc_freeze=args.gc_freeze,
        gc_threshold=tuple(int(part) for part in args.gc_threshold.split(",") if part.strip()),
        batch_size=args.batch_size,
        flush_interval=args.flush_interval,
        max_pending=args.max_pending,
        idle_timeout=5.0 if quick else 15.0,
        quick=quick,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line; exit 1 when a run failed outright."""
    args = parse_args(argv)
    config = config_from(args)
    results = run(config, args.out, log=lambda text: print(text, file=sys.stderr, flush=True))
    print(render(results))
    path = args.out / "latest.json"
    write_json(results, path)
    print(f"\nresults: {path}")
    if not args.no_plot:
        print(plot(results, args.out / "latest.png"))
    failed = [r for r in results["saturation"] + results["paced"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
