"""The `tidegate` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from devices.errors import SourceFileError
from gateway.store.base import StoreError

log = logging.getLogger("tidegate")
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?\Z")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Parse `30`, `30s`, `5m`, `2h`, `1d`, `250ms` into seconds."""
    match = DURATION_RE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected e.g. 30s, 5m, 2h")
    return float(match.group(1)) * UNITS[match.group(2)]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )


async def _until_signalled(work: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> Any:
    """Run `work(stop)`; SIGINT and SIGTERM set `stop` so the work can drain and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await work(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_problems(error: SourceFileError) -> int:
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{len(error.problems)} problem(s) found", file=sys.stderr)
    return 1


# -- subcommands --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.config import load_settings

    settings = load_settings(args.config)
    _setup_logging(settings.log_level)
    gateway = Gateway(settings)
    # Start-up objects (modules, compiled rules) never die; moving them out of the collector's reach
    # cut full-collection pauses from ~47 ms to ~11 ms in the benchmark (bench/README.md). Raising the
    # gen0 threshold to 2,000 or 5,000 (bench --gc-threshold) saved only ~0.2-0.5 of ~37 us of CPU
    # per message and made the longest pauses no shorter, so the thresholds stay Python's.
    gc.freeze()
    log.info("tidegate %s: broker %s, store %s", _version(), settings.mqtt.url, settings.store.kind)

    async def run(stop: asyncio.Event) -> None:
        # SIGHUP re-reads the rule files; only `run` has rules to reload, so the handler lives here.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
        try:
            await gateway.run(stop)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    asyncio.run(_until_signalled(run))
    log.info("stopped: %s", json.dumps(gateway.snapshot()))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from gateway.config import load_settings, redacted

    settings = load_settings(args.file)
    if settings.devices.file is not None:
        from gateway.devicefile import read_device_file

        registry = read_device_file(settings.devices.file)
        print(f"{settings.devices.file}: ok, {len(registry)} device(s) of {len(registry.types)} type(s)")
    print(f"{args.file}: ok")
    if args.show:
        print(json.dumps(redacted(settings), indent=2))
    return 0


def cmd_rules_check(args: argparse.Namespace) -> int:
    from gateway.rulefiles import read_rule_dir

    rule_set = read_rule_dir(Path(args.dir))
    if not rule_set.rules and not rule_set.derived:
        print(
            f"error: {args.dir}: no rules or derived metrics found (rule files end in .yaml or .yml)",
            file=sys.stderr,
        )
        return 1
    if args.devices is not None:  # command actions against the device types' allow-lists
        from gateway.commands import check_rule_commands
        from gateway.devicefile import read_device_file

        problems = check_rule_commands(rule_set, read_device_file(args.devices))
        for problem in problems:
            print(f"{'error' if problem.error else 'warning'}: {problem}", file=sys.stderr)
        if any(problem.error for problem in problems):
            print(
                f"{sum(p.error for p in problems)} command action(s) no targeted device accepts",
                file=sys.stderr,
            )
            return 1
    print(f"{args.dir}: {len(rule_set.rules)} rule(s), {len(rule_set.derived)} derived metric(s) ok")
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    from gateway.rulefiles import read_rule_dir
    from rules.testing import run_rule_tests

    results = run_rule_tests(read_rule_dir(Path(args.dir)))
    if not results:
        print(
            f"error: {args.dir}: no test cases found (a rule file lists them under `tests:`)", file=sys.stderr
        )
        return 1
    for result in results:
        print(f"{'PASS' if result.passed else 'FAIL'}  {result.file}: {result.name}")
        if not result.passed:
            print("\n".join(f"    {line}" for line in result.diff.splitlines()))
    failed = sum(not result.passed for result in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _endpoint(args: argparse.Namespace) -> str | None:
    """Return the running gateway's HTTP endpoint from --url or the config, or print why there is none."""
    url: str | None = getattr(args, "url", None)
    if url is not None:
        return url.rstrip("/")
    from gateway.config import load_settings

    address = load_settings(getattr(args, "config", None), check_files=False).http.address
    if address is None:
        print("error: no http.listen in the config: the gateway serves no status endpoint", file=sys.stderr)
        return None
    return f"http://{address[0]}:{address[1]}"


def _get_from_gateway(args: argparse.Namespace, route: str) -> tuple[bool, Any]:
    """GET `route` from the running gateway's endpoint; on failure print why and return (False, None)."""
    import httpx

    url = _endpoint(args)
    if url is None:
        return False, None
    try:
        response = httpx.get(f"{url}{route}", timeout=5.0)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"error: cannot read {url}{route}: {exc}", file=sys.stderr)
        return False, None
    return True, response.json()


def cmd_status(args: argparse.Namespace) -> int:
    ok, snapshot = _get_from_gateway(args, "/status")
    if not ok:
        return 1
    if args.json:
        print(json.dumps(snapshot))
    else:
        width = max(map(len, snapshot))
        for key, value in snapshot.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    return _show_listing(
        args,
        "/alarms",
        empty="no active alarms",
        header=("RULE", "DEVICE", "SEVERITY", "SINCE", "ACK", "VALUES"),
        row=lambda alarm: (
            alarm["rule"],
            alarm["device"],
            alarm["severity"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alarm["since"])),
            "yes" if alarm["acknowledged"] else "no",
            ", ".join(f"{name}={_cell(value)}" for name, value in alarm["values"].items()),
        ),
        footer=lambda alarms: (
            f"{len(alarms)} active alarm(s), {sum(bool(a['acknowledged']) for a in alarms)} acknowledged"
        ),
    )


def _show_listing(
    args: argparse.Namespace,
    route: str,
    *,
    empty: str,
    header: Sequence[str],
    row: Callable[[Any], Sequence[str]],
    footer: Callable[[list[Any]], str],
) -> int:
    """Fetch a list from the running gateway; print it as JSON (`--json`) or as a table and a summary line."""
    ok, items = _get_from_gateway(args, route)
    if not ok:
        return 1
    if args.json:
        print(json.dumps(items))
        return 0
    if not items:
        print(empty)
        return 0
    _print_table(header, [row(item) for item in items])
    print(footer(items))
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print aligned columns; the last column is left unpadded (it may be long)."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    seconds = max(now - ts, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_devices(args: argparse.Namespace) -> int:
    now = time.time()
    return _show_listing(
        args,
        "/devices",
        empty="no devices registered or heard from",
        header=("DEVICE", "TYPE", "STATUS", "LAST SEEN", "MSG/S", "ALARMS"),
        row=lambda device: (
            device["device"],
            device["type"] or ("(quarantined)" if device["quarantined"] else "(unregistered)"),
            device["status"],
            _ago(device["last_seen"], now),
            f"{device['rate']:.2f}",
            str(device["alarms"]),
        ),
        footer=lambda devices: (
            f"{len(devices)} device(s), {sum(d['status'] == 'online' for d in devices)} online"
        ),
    )


def cmd_alerts_ack(args: argparse.Namespace) -> int:
    import httpx

    url = _endpoint(args)
    if url is None:
        return 1
    try:
        response = httpx.post(
            f"{url}/alarms/ack", json={"rule": args.rule, "device": args.device}, timeout=5.0
        )
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {url}/alarms/ack: {exc}", file=sys.stderr)
        return 1
    if response.status_code == 404 and response.headers.get("content-type") == "application/json":
        print(f"error: no active alarm for rule {args.rule!r} on device {args.device!r}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(
            f"error: {url}/alarms/ack answered {response.status_code}: {response.text.strip()}",
            file=sys.stderr,
        )
        return 1
    print(f"acknowledged: rule {args.rule}, device {args.device}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    _setup_logging("WARNING" if not args.verbose else "INFO")
    live = sys.stdout.isatty() and not args.json
    Path(args.dir).mkdir(parents=True, exist_ok=True)

    async def demo(stop: asyncio.Event) -> dict[str, Any]:
        return await run_demo(
            duration=args.duration,
            devices=args.devices,
            rate=args.rate,
            workdir=Path(args.dir),
            live_view=live,
            stop=stop,
            seed=args.seed,
            broker=args.broker,
        )

    if not live and not args.json:
        print(f"running the demo{f' for {args.duration:g}s' if args.duration else ''} (Ctrl-C stops it) ...")
    summary = asyncio.run(_until_signalled(demo))
    if args.json:
        print(json.dumps(summary))
    else:
        print()
        for key in ("received", "stored", "rejected", "alerts", "commands_sent", "commands_acked"):
            print(f"  {key:<16} {summary[key]}")
        print(f"\nData is in {summary['store']}. Read it back with, for example:")
        print(f"  tidegate query --sqlite {summary['store']} --field temperature --every 10s --agg mean")
        print(f"  tidegate query --sqlite {summary['store']} --measurement alerts")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulator import SimulationSummary, SimulatorError, read_fleet_file, run_simulation
    from simulator.progress import ProgressDisplay, summary_text

    _setup_logging("INFO" if args.verbose else "WARNING")
    fleet = None
    if args.fleet is not None:
        if args.devices is not None or args.rate is not None:
            print("error: --fleet describes the devices; leave out --devices and --rate", file=sys.stderr)
            return 2
        fleet = read_fleet_file(args.fleet)  # a SourceFileError lists every problem (see main)
    password = os.environ.get("TIDEGATE_SIM_PASSWORD")
    if args.password_file is not None:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: --password-file {args.password_file}: cannot read it ({exc})", file=sys.stderr)
            return 1
    display = ProgressDisplay(live=False if args.json and not sys.stderr.isatty() else None)

    async def simulate(stop: asyncio.Event) -> SimulationSummary:
        return await run_simulation(
            args.broker,
            fleet=fleet,
            devices=None if fleet is not None else (args.devices or 10),
            rate=None if fleet is not None else (args.rate or 1.0),
            duration=args.duration,
            seed=args.seed,
            connections=args.connections,
            connection_per_device=args.connection_per_device,
            username=args.username,
            password=password,
            ca_file=args.ca_file,
            cert_file=args.cert,
            key_file=args.key,
            on_progress=display.update,
            stop=stop,
        )

    try:
        with display:
            summary = asyncio.run(_until_signalled(simulate))
    except (SimulatorError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict()) if args.json else summary_text(summary))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from gateway.app import open_store
    from gateway.config import SqliteSettings, load_settings
    from gateway.store.base import Query

    store_settings = (
        SqliteSettings(kind="sqlite", path=Path(args.sqlite))
        if args.sqlite
        else load_settings(args.config, check_files=False).store
    )
    if args.sqlite and not Path(args.sqlite).exists():
        print(f"error: {args.sqlite}: no such file", file=sys.stderr)
        return 1
    now = time.time()
    query = Query(
        measurement=args.measurement,
        device_id=args.device,
        fields=tuple(args.field or ()),
        start=now - args.since if args.since else None,
        end=now - args.until if args.until else None,
        every=args.every,
        aggregate=args.agg if args.every else None,
        limit=args.limit,
    )

    async def read() -> list[Any]:
        store = open_store(store_settings)
        try:
            return await store.query(query)
        finally:
            await store.close()

    rows = asyncio.run(read())
    if args.json:
        for row in rows:
            print(json.dumps({"ts": row.ts, **row.tags, **row.fields}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.measurement}: {len(rows)} row(s)")
    tag_names = sorted({k for r in rows for k in r.tags})
    field_names = sorted({k for r in rows for k in r.fields})
    for column in ["time", *tag_names, *field_names]:
        table.add_column(column)
    for row in rows:
        stamp = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.ts)) + f".{int(row.ts * 1000) % 1000:03d}"
        )
        values = [_cell(row.fields.get(f)) for f in field_names]
        table.add_row(stamp, *[row.tags.get(t, "") for t in tag_names], *values)
    Console().print(table)
    return 0


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return "" if value is None else str(value)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tidegate")
    except PackageNotFoundError:
        return "dev"


# -- command --------------------------------------------------------------------------------------------

# `tidegate command send` exit codes
EXIT_OK, EXIT_FAILED, EXIT_PENDING = 0, 1, 3


def cmd_command_send(args: argparse.Namespace) -> int:
    from gateway.commandclient import CommandClientError, parse_params, send_direct, send_through_gateway
    from gateway.config import load_settings

    try:
        params = parse_params(args.params)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    wait = args.timeout if args.wait else 0.0
    try:
        if args.direct:
            registry = None
            if settings.devices.file is not None:
                from gateway.devicefile import read_device_file

                registry = read_device_file(settings.devices.file)
            ttl = args.ttl if args.ttl is not None else settings.commands.ttl
            view = send_direct(settings, registry, args.device, args.name, params, ttl=ttl, wait=wait)
        else:
            url = args.url.rstrip("/") if args.url is not None else None
            if url is None and settings.http.address is not None:
                url = f"http://{settings.http.address[0]}:{settings.http.address[1]}"
            if url is None:
                print(
                    "error: no gateway endpoint: give --url, or -c with the running gateway's config "
                    "(http.listen); without a running gateway, --direct publishes straight to the broker",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            token = (
                settings.commands.token.get_secret_value() if settings.commands.token is not None else None
            )
            _code, view = send_through_gateway(
                url, args.device, args.name, params, ttl=args.ttl, wait=wait, token=token
            )
    except CommandClientError as exc:
        hint = "" if args.direct else " (is `tidegate run` up? --direct publishes straight to the broker)"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILED
    return _report_command(view, waited=args.wait, timeout=args.timeout, as_json=args.json)


def _report_command(view: dict[str, Any], *, waited: bool, timeout: float, as_json: bool) -> int:
    status, detail = view.get("status"), view.get("detail") or ""
    what = f"command {view.get('id')} {view.get('name')} to {view.get('device')}"
    if as_json:
        print(json.dumps(view))
    if status == "ok":
        latency = view.get("latency_ms")
        took = f" in {latency:.0f} ms" if isinstance(latency, int | float) else ""
        if not as_json:
            print(f"{what}: ok, acked{took}" + (f": {detail}" if detail else ""))
        return EXIT_OK
    if status in ("queued", "sent"):
        if not waited:
            if not as_json:
                print(f"{what}: {status}" + (f" ({detail})" if detail else ""))
            return EXIT_OK
        print(
            f"error: {what}: no outcome within {timeout:g}s, it is still {status}"
            + (f" ({detail})" if detail else "")
            + "; `tidegate command list` shows how it ends",
            file=sys.stderr,
        )
        return EXIT_PENDING
    meaning = {
        "error": "the device answered error",
        "timed_out": "no ack from the device",
        "expired": "not sent before it expired",
        "rejected": "rejected, not sent",
    }.get(str(status), str(status))
    print(f"error: {what}: {meaning}" + (f": {detail}" if detail else ""), file=sys.stderr)
    return EXIT_FAILED


def cmd_command_list(args: argparse.Namespace) -> int:
    now = time.time()
    return _show_listing(
        args,
        "/commands",
        empty="no pending or recent commands",
        header=("ID", "DEVICE", "NAME", "STATUS", "TRIES", "CREATED", "DETAIL"),
        row=lambda c: (
            str(c["id"])[:12],
            str(c["device"]),
            str(c["name"]),
            str(c["status"]),
            str(c["attempts"]),
            _ago(c["created"], now),
            str(c["detail"] or "")[:80],
        ),
        footer=lambda commands: (
            f"{len(commands)} command(s), {sum(c['status'] in ('queued', 'sent') for c in commands)} pending"
        ),
    )


# -- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="tidegate",
        description="IoT telemetry gateway: MQTT in, rules, InfluxDB out, commands back to devices.",
        epilog="Start with `tidegate demo`. Each subcommand has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the gateway", description="Run the gateway until SIGINT or SIGTERM."
    )
    run.add_argument("-c", "--config", metavar="FILE", help="YAML config (default: built-in defaults + env)")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser(
        "config", help="work with configuration files", description="Validate tidegate configuration files."
    )
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate a config file",
        description="Validate a config file (plus TIDEGATE_* environment overrides) and list every problem.",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--show", action="store_true", help="print the resulting settings (secrets masked)")
    check.set_defaults(func=cmd_config_check)

    rules = sub.add_parser("rules", help="work with rule files", description="Validate rule files.")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    rcheck = rules_sub.add_parser(
        "check",
        help="validate rule files",
        description="Validate every rule file in DIR; exit 1 on any error.",
    )
    rcheck.add_argument("dir", metavar="DIR", help="a directory of *.yaml rule files, or one file")
    rcheck.add_argument(
        "--devices",
        metavar="FILE",
        help="a device registry: also check each rule's command actions against the allow-lists of the "
        "device types it targets (warning: some types refuse it; error: none accepts it)",
    )
    rcheck.set_defaults(func=cmd_rules_check)
    rtest = rules_sub.add_parser(
        "test",
        help="run the test cases in rule files",
        description="Run the `tests:` cases of every rule file in DIR offline with a fake clock; print each "
        "case and a diff of expected against actual alerts and commands; exit 1 on any failure.",
    )
    rtest.add_argument("dir", metavar="DIR", help="a directory of *.yaml rule files, or one file")
    rtest.set_defaults(func=cmd_rules_test)

    status = sub.add_parser(
        "status",
        help="show a running gateway's counters",
        description="Read the counters of a running gateway from its HTTP endpoint (config key http.listen).",
    )
    status_source = status.add_mutually_exclusive_group()
    status_source.add_argument("-c", "--config", metavar="FILE", help="the running gateway's config file")
    status_source.add_argument("--url", help="the endpoint, e.g. http://127.0.0.1:9464")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_status)

    alerts = sub.add_parser(
        "alerts",
        help="list or acknowledge a running gateway's active alarms",
        description="List the active alarms of a running gateway (rule, device, severity, since, values, "
        "acknowledged) from its HTTP endpoint (config key http.listen); `alerts ack` acknowledges one.",
    )
    _endpoint_arguments(alerts, argparse.SUPPRESS)  # SUPPRESS: `alerts -c F ack ...` keeps F
    alerts.add_argument("--json", action="store_true", help="print the alarms as one JSON list")
    alerts.set_defaults(func=cmd_alerts)
    alerts_sub = alerts.add_subparsers(dest="alerts_command", metavar="ACTION")
    ack = alerts_sub.add_parser(
        "ack",
        help="acknowledge an active alarm",
        description="Acknowledge the active alarm of RULE on DEVICE; the gateway records it in the store "
        "(measurement alerts, state acknowledged). Exit 1 if there is no such alarm.",
    )
    ack.add_argument("rule", metavar="RULE", help="the rule id")
    ack.add_argument("device", metavar="DEVICE", help="the device id")
    _endpoint_arguments(ack, argparse.SUPPRESS)
    ack.set_defaults(func=cmd_alerts_ack)

    devices = sub.add_parser(
        "devices",
        help="list a running gateway's devices",
        description="List the devices a running gateway knows (registered, heard from, quarantined) with "
        "type, status (online/offline from birth and last-will messages), last seen, message rate over "
        "the last minute and active alarms, from its HTTP endpoint (config key http.listen).",
    )
    _endpoint_arguments(devices, None)
    devices.add_argument("--json", action="store_true", help="print the devices as one JSON list")
    devices.set_defaults(func=cmd_devices)

    demo = sub.add_parser(
        "demo",
        help="run broker, gateway, store and simulated devices on this machine",
        description=(
            "Run everything on one machine: an embedded MQTT broker (mosquitto if on PATH, else amqtt), "
            "the gateway writing to a local SQLite store, a sample rule file, and simulated greenhouses "
            "that the rule cools with fan commands. Prints a summary at the end."
        ),
    )
    demo.add_argument("--duration", type=parse_duration, default=None, help="stop after this long, e.g. 30s")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.add_argument("--devices", type=_positive_int, default=5, help="simulated devices (default 5)")
    demo.add_argument("--rate", type=_positive_float, default=2.0, help="messages/s per device (default 2)")
    demo.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    demo.add_argument(
        "--dir", default="tidegate-demo", help="where the SQLite store goes (default ./tidegate-demo)"
    )
    demo.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="embedded broker: mosquitto when found on PATH (auto), or the pure-Python amqtt",
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="log gateway activity to stderr")
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser(
        "simulate",
        help="run simulated devices against a broker",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run simulated devices that publish telemetry (with ts and seq), status (birth, last will) and\n"
            "command acks, speaking the protocol in README 'For device developers'. Either a fleet file\n"
            "(--fleet: device types, id patterns, signals, faults, command behaviour; see README\n"
            "'Simulator' and deploy/fleets/) or the quick form: --devices N greenhouses at --rate R that\n"
            "heat up until a `fan` command with params {on: true} cools them.\n\n"
            "Devices share a few MQTT connections (one per 500 by default); --connection-per-device gives\n"
            "each its own connection and last will. Shows progress on stderr while running and prints a\n"
            "summary at the end; Ctrl-C or SIGTERM stops cleanly (devices publish their offline status)."
        ),
        epilog=(
            "examples:\n"
            "  tidegate simulate --devices 5 --rate 2 --duration 30s\n"
            "  tidegate simulate --fleet deploy/fleets/greenhouse.yaml --seed 7 --duration 10m\n"
            "  tidegate simulate --fleet big.yaml --connections 8 --broker mqtts://broker:8883 \\\n"
            "      --ca-file ca.pem --username sim --password-file sim.pass"
        ),
    )
    sim.add_argument(
        "--fleet", metavar="FILE", help="fleet file (YAML) describing the devices; replaces --devices/--rate"
    )
    sim.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        metavar="N",
        help="quick form: number of devices (default 10)",
    )
    sim.add_argument(
        "--rate",
        type=_positive_float,
        default=None,
        metavar="R",
        help="quick form: messages/s per device (default 1)",
    )
    sim.add_argument(
        "--duration",
        type=parse_duration,
        default=None,
        help="stop after this long, e.g. 90s, 10m (default: until Ctrl-C)",
    )
    sim.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed: the same seed sends the same values, faults and timings (default: the fleet file's, "
        "else random; the summary shows it)",
    )
    sim.add_argument(
        "--connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="MQTT connections to spread the devices over (default: one per 500 devices)",
    )
    sim.add_argument(
        "--connection-per-device",
        action="store_true",
        help="one connection per device, each with its own client id (the device id) and last will; "
        "simulated disconnects then drop the TCP connection so the broker publishes the will",
    )
    sim.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        metavar="URL",
        help="mqtt://HOST:PORT (default mqtt://127.0.0.1:1883), or mqtts://HOST:PORT for TLS",
    )
    sim.add_argument("--username", help="MQTT user name")
    sim.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the MQTT password (default: the TIDEGATE_SIM_PASSWORD environment variable)",
    )
    sim.add_argument("--ca-file", metavar="FILE", help="CA certificate(s) to verify the broker (mqtts://)")
    sim.add_argument("--cert", metavar="FILE", help="client certificate (PEM), for brokers that require one")
    sim.add_argument("--key", metavar="FILE", help="client private key (PEM) for --cert")
    sim.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    sim.add_argument("-v", "--verbose", action="store_true", help="log connection activity to stderr")
    sim.set_defaults(func=cmd_simulate)

    query = sub.add_parser(
        "query",
        help="read telemetry, alerts or commands back from the store",
        description="Read points back from the configured store (InfluxDB or the local SQLite file).",
    )
    source = query.add_mutually_exclusive_group()
    source.add_argument("-c", "--config", metavar="FILE", help="YAML config naming the store")
    source.add_argument("--sqlite", metavar="PATH", help="read a local SQLite store directly")
    query.add_argument(
        "--measurement",
        default="telemetry",
        choices=["telemetry", "alerts", "commands"],
        help="what to read (default telemetry)",
    )
    query.add_argument("--device", help="one device id")
    query.add_argument("--field", action="append", help="a field to read (repeatable; default all)")
    query.add_argument("--since", type=parse_duration, default=None, help="how far back, e.g. 1h")
    query.add_argument("--until", type=parse_duration, default=None, help="end this long ago")
    query.add_argument("--every", type=parse_duration, default=None, help="aggregate per interval, e.g. 1m")
    query.add_argument(
        "--agg", default="mean", choices=["mean", "min", "max", "sum", "count", "first", "last"]
    )
    query.add_argument("--limit", type=_positive_int, default=1000, help="most rows to print (default 1000)")
    query.add_argument("--json", action="store_true", help="one JSON object per row")
    query.set_defaults(func=cmd_query)

    command = sub.add_parser(
        "command",
        help="send a command to a device, or list recent commands",
        description="Send commands to devices through a running gateway (its HTTP endpoint, config key "
        "http.listen), which checks them against the device type's allow-list, publishes, retries and "
        "records every step in the store (measurement commands).",
    )
    command_sub = command.add_subparsers(dest="command_action", required=True, metavar="ACTION")
    csend = command_sub.add_parser(
        "send",
        help="send one command",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send command NAME with parameters KEY=VALUE to DEVICE.\n\n"
        "A VALUE is read as JSON when it is JSON, else as text: speed=3 is the number 3, on=true the\n"
        'boolean, mode=high the text "high", mode=\'"3"\' the text "3".\n\n'
        "Without --wait, the command's id and state (sent, queued, rejected) are printed.\n"
        "With --wait, the outcome is awaited for up to --timeout seconds and printed.",
        epilog="exit status: 0 the device acked ok (without --wait: the gateway accepted the command);\n"
        "1 the device answered error, no ack came (timed_out), the command expired or was rejected\n"
        "  (e.g. not on the allow-list), or the gateway/broker could not be reached;\n"
        "2 bad arguments; 3 --wait ran out with the command still queued or sent.\n\n"
        "examples:\n"
        "  tidegate command send -c config.yaml sim-0001 fan on=true --wait\n"
        "  tidegate command send --url http://127.0.0.1:9464 gh-1 mode speed=high --wait --timeout 10\n"
        "  tidegate command send -c config.yaml --direct gh-1 fan on=false --wait",
    )
    csend.add_argument("device", metavar="DEVICE", help="the device id")
    csend.add_argument("name", metavar="NAME", help="the command name, e.g. fan")
    csend.add_argument("params", metavar="KEY=VALUE", nargs="*", help="command parameters")
    csend.add_argument("--wait", action="store_true", help="wait for the device's ack and print the outcome")
    csend.add_argument(
        "--timeout",
        type=parse_duration,
        default=60.0,
        metavar="S",
        help="with --wait: how long to wait for the outcome, e.g. 30s or 2m (default 60s)",
    )
    csend.add_argument(
        "--ttl",
        type=parse_duration,
        default=None,
        metavar="S",
        help="how long the command may wait to be sent, e.g. 5m (default: commands.ttl of the gateway)",
    )
    csend.add_argument(
        "--direct",
        action="store_true",
        help="no gateway: publish straight to the broker of -c's config (mqtt.url) and wait for the ack "
        "here; the allow-list of its devices.file still applies, but nothing is recorded in the store",
    )
    csend.add_argument("--json", action="store_true", help="print the command and its state as JSON")
    _endpoint_arguments(csend, None)
    csend.set_defaults(func=cmd_command_send)
    clist = command_sub.add_parser(
        "list",
        help="list pending and recent commands",
        description="List the commands a running gateway is working on or finished recently (the last "
        "1,000): id, device, name, status, publish attempts, age and detail.",
    )
    clist.add_argument("--json", action="store_true", help="print the commands as one JSON list")
    _endpoint_arguments(clist, None)
    clist.set_defaults(func=cmd_command_list)
    return parser


def _endpoint_arguments(parser: argparse.ArgumentParser, default: Any) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-c", "--config", metavar="FILE", default=default, help="the running gateway's config file"
    )
    group.add_argument("--url", default=default, help="the endpoint, e.g. http://127.0.0.1:9464")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tidegate` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SourceFileError as exc:
        return _print_problems(exc)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # output piped into `head` and the like: stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
