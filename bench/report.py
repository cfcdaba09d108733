"""Turn a run's raw figures into the terminal tables, the targets check, the JSON file and the PNG plot."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gateway_run import percentiles_ms


def primary_rate(row: dict[str, Any]) -> float:
    """The saturation figure: the steady (10-90 %) rate, or the whole window's when too few points."""
    steady: float = row.get("steady_rate", 0.0)
    whole: float = row.get("rate", 0.0)
    return steady or whole


def command_latencies(
    triggers: Sequence[Sequence[float]], commands: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """Match commands to the messages that triggered them and return publish → command latencies.

    `triggers` are (device, seq, publish time) and `commands` (device, arrival time, command ts). The
    command's own payload cannot name its trigger, so matching is by order: per device, triggers
    are never consecutive (the message in between clears the alarm), so each raises it once and sends
    exactly one command, and MQTT keeps one publisher's messages to a topic in order. The k-th command
    a device receives therefore answers its k-th trigger.
    """
    sent: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for device, seq, ts in triggers:
        sent[int(device)].append((int(seq), ts))
    got: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for device, arrival, command_ts in commands:
        got[int(device)].append((arrival, command_ts))
    end_to_end: list[float] = []
    to_send: list[float] = []
    missing = unexpected = 0
    for device, device_triggers in sent.items():
        device_triggers.sort()
        received = got.get(device, [])
        for (_, ts), (arrival, command_ts) in zip(device_triggers, received, strict=False):
            end_to_end.append(arrival - ts)
            to_send.append(command_ts - ts)
        missing += max(0, len(device_triggers) - len(received))
        unexpected += max(0, len(received) - len(device_triggers))
    unexpected += sum(len(cmds) for device, cmds in got.items() if device not in sent)
    return {
        "triggers": len(triggers),
        "received": len(commands),
        "missing": missing,
        "unexpected": unexpected,
        "publish_to_command_ms": percentiles_ms(end_to_end),
        "publish_to_gateway_send_ms": percentiles_ms(to_send),
    }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare with the targets of issue 6 (only those this run measured)."""
    rows = {(r["name"], r["qos"]): r for r in results["saturation"] if not r.get("error")}
    checks: list[dict[str, Any]] = []
    reference = rows.get(("mosquitto_sub", 1))
    for name, factor in (("tidegate null", 0.7), ("tidegate influxdb", 0.5)):
        row = rows.get((name, 1))
        if row is None:
            continue
        if reference is not None and primary_rate(reference) > 0:
            ratio = primary_rate(row) / primary_rate(reference)
            checks.append(
                {
                    "target": f"{name} QoS 1 >= {factor} x mosquitto_sub QoS 1",
                    "value": f"{ratio:.2f} x",
                    "ok": ratio >= factor,
                }
            )
        checks.append(
            {
                "target": f"{name}: nothing lost at saturation",
                "value": f"{row['lost']} lost, {row['duplicates']} duplicates",
                "ok": row["lost"] == 0,
            }
        )
    limit = results["config"]["flush_interval"] * 1000 + 250
    for row in results["paced"]:
        if row.get("error") or abs(row["fraction"] - 0.5) > 1e-9:
            continue
        command = row["commands"]["publish_to_command_ms"]
        if command:
            checks.append(
                {
                    "target": f"{row['name']} at 50 %: p99 publish -> command < 20 ms",
                    "value": f"{command['p99']:.1f} ms",
                    "ok": command["p99"] < 20,
                }
            )
        stored = row.get("stored_latency_ms") or {}
        if stored:
            checks.append(
                {
                    "target": f"{row['name']} at 50 %: p99 publish -> stored < flush interval + 250 ms ({limit:.0f} ms)",
                    "value": f"{stored['p99']:.0f} ms",
                    "ok": stored["p99"] < limit,
                }
            )
        checks.append(
            {
                "target": f"{row['name']} at 50 %: nothing lost",
                "value": f"{row['lost']} lost, {row['duplicates']} duplicates",
                "ok": row["lost"] == 0,
            }
        )
    return checks


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    out = [line, "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(out)


def _mb(kb: float) -> str:
    return f"{kb / 1024:.0f}" if kb else "-"


def _ms(stats: dict[str, float] | None, key: str) -> str:
    if not stats:
        return "-"
    value = stats[key]
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def render(results: dict[str, Any]) -> str:
    """Return the whole terminal report."""
    config = results["config"]
    out: list[str] = []
    load = results.get("load", {})
    out.append(
        f"workload: {config['messages']:,} messages ({load.get('payload_bytes', 0):.0f} B JSON avg) from "
        f"{config['devices']:,} devices, {config['rules']}, {config['publishers']} publisher processes, "
        f"MQTT {config['protocol']}; burst published at {load.get('rate', 0):,.0f} msg/s"
    )
    gc_notes = [] if config.get("gc_freeze", True) else ["no gc.freeze()"]
    if config.get("gc_threshold"):
        gc_notes.append(f"gc.set_threshold{tuple(config['gc_threshold'])}")
    if gc_notes:
        out.append(
            f"what-if: tidegate ran with {', '.join(gc_notes)} (tidegate run: gc.freeze(), default thresholds)"
        )
    out.append(
        f"machine: {results['machine']['cpus']} CPUs, load average {results['machine']['loadavg_start']} at start, {results['machine'].get('loadavg_end', '?')} at end"
    )
    out.append("")
    out.append("Saturation: draining a backlog of the whole burst (msg/s between 10 % and 90 % of it)")
    reference = next(
        (
            primary_rate(r)
            for r in results["saturation"]
            if r["name"] == "mosquitto_sub" and r["qos"] == 1 and not r.get("error")
        ),
        0.0,
    )
    rows = []
    for r in results["saturation"]:
        if r.get("error"):
            rows.append([r["name"], str(r["qos"]), "error: " + r["error"][:60], *[""] * 11])
            continue
        rate = primary_rate(r)
        messages = r.get("distinct", 0) or 1
        commands = r.get("commands")
        rows.append(
            [
                r["name"],
                str(r["qos"]),
                f"{rate:,.0f}",
                f"{rate / reference:.2f}" if reference else "-",
                f"{r['seconds']:.2f}",
                f"{r['cpu_s']:.2f}",
                f"{r['cpu_s'] / r['seconds'] * 100:.0f}" if r["seconds"] else "-",
                f"{r['cpu_s'] / messages * 1e6:.1f}",
                _mb(r.get("rss_peak_kb", 0)),
                f"{r['lost']}",
                f"{r['duplicates']}",
                f"{commands['received']}/{commands['triggers']}" if commands else "-",
                f"{r.get('broker_cpu_s', 0):.2f}",
                f"{r['influxd_cpu_s']:.2f}" if "influxd_cpu_s" in r else "-",
            ]
        )
    out.append(
        _table(
            [
                "subscriber",
                "qos",
                "msg/s",
                "x mosq",
                "first->last s",
                "cpu s",
                "cpu %",
                "cpu us/msg",
                "peak RSS MB",
                "lost",
                "dup",
                "commands",
                "broker cpu s",
                "influxd cpu s",
            ],
            rows,
        )
    )
    out.append(
        "  cpu % is CPU time over the first->last window: well under 100 % for a Python subscriber means it"
        " waited for a core (see load average)"
    )
    if results["paced"]:
        out.append("")
        out.append(
            "Paced: offered load as a fraction of that store's saturation rate; latencies from the payload's publish"
            " time; behind at end = last point stored - last message published (about the flush interval when it"
            " keeps up)"
        )
        rows = []
        for r in results["paced"]:
            if r.get("error"):
                rows.append([r["name"], f"{r['fraction']:.2f}", "error: " + r["error"][:60], *[""] * 13])
                continue
            stored = r.get("stored_latency_ms")
            command = r["commands"]["publish_to_command_ms"]
            rows.append(
                [
                    r["name"],
                    f"{r['fraction']:.2f}",
                    f"{r['offered_rate']:,.0f}",
                    f"{r['publish_rate']:,.0f}",
                    f"{r.get('behind_at_end_s', 0):.2f}",
                    _ms(stored, "p50"),
                    _ms(stored, "p99"),
                    _ms(stored, "max"),
                    _ms(command, "p50"),
                    _ms(command, "p99"),
                    _ms(r["commands"]["publish_to_gateway_send_ms"], "p99"),
                    f"{r['commands']['received']}/{r['commands']['triggers']}",
                    f"{r['cpu_s'] / max(r['distinct'], 1) * 1e6:.1f}",
                    _mb(r.get("rss_peak_kb", 0)),
                    f"{r['lost']}",
                    f"{r['duplicates']}",
                ]
            )
        out.append(
            _table(
                [
                    "tidegate",
                    "load",
                    "offered/s",
                    "published/s",
                    "behind at end s",
                    "stored p50 ms",
                    "p99",
                    "max",
                    "command p50 ms",
                    "p99",
                    "to gateway p99",
                    "commands",
                    "cpu us/msg",
                    "peak RSS MB",
                    "lost",
                    "dup",
                ],
                rows,
            )
        )
        for r in results["paced"]:
            if r.get("error"):
                continue
            lag = r.get("loop_lag_ms") or {}
            after = r.get("after_write_ms_per_batch") or {}
            record = r.get("bench_record_ms_per_batch") or {}
            send = r["commands"]["publish_to_gateway_send_ms"]
            publishers = r.get("publishers_cpu_s", 0.0) / max(r["seconds"], 1e-9) * 100
            gc_worst = max((g["max"] for g in (r.get("gc_pauses_ms") or {}).values()), default=0.0)
            out.append(
                f"  {r['name']} {r['fraction']:.2f}: publishers used {publishers:.0f} % of a core; event loop late by p99 {lag.get('p99', 0):.1f} / max "
                f"{lag.get('max', 0):.1f} ms; per batch, the writer holds the loop after the write (its callbacks: acks) for mean "
                f"{after.get('mean', 0):.1f} / max {after.get('max', 0):.1f} ms and this bench's bookkeeping "
                f"{record.get('mean', 0):.1f} / {record.get('max', 0):.1f} ms; publish -> gateway sends the "
                f"command p50 {_ms(send, 'p50')} / p99 {_ms(send, 'p99')} ms; longest GC pause {gc_worst:.1f} ms"
            )
    for r in results["saturation"]:
        profile = r.get("profile")
        if not profile:
            continue
        out.append("")
        cpu = r["cpu_s"]
        messages = max(r.get("distinct", 0), 1)
        how = (
            f"{profile['samples']} CPU samples every {profile['interval_ms']:.0f} ms; the collector's share"
            f" is its time measured by gc.callbacks ({profile.get('gc_share_sampled', 0) * 100:.1f} % sampled)"
            if profile["method"] == "sampling"
            else f"cProfile, {profile['seconds']:.1f} s of work profiled besides {profile['idle_seconds']:.1f} s idle; instrumented, so slower than the run"
        )
        out.append(
            f"Where {r['name']} QoS {r['qos']} spends its CPU ({cpu:.2f} s, {cpu / messages * 1e6:.1f} us/msg; {how}):"
        )
        stage_rows = [
            [stage, f"{share * 100:.1f} %", f"{share * cpu / messages * 1e6:.2f}"]
            for stage, share in profile["stages"].items()
            if share >= 0.001
        ]
        out.append(_table(["stage", "share", "us/msg"], stage_rows))
        out.append("  busiest functions (own time, C calls charged to the Python function making them):")
        for item in profile["top_functions"][:10]:
            out.append(f"    {item['share'] * 100:5.1f} %  {item['function']}  [{item['stage']}]")
    if results.get("targets"):
        out.append("")
        out.append("Targets (issue 6):")
        for check in results["targets"]:
            out.append(f"  [{'ok' if check['ok'] else 'MISSED'}] {check['target']}: {check['value']}")
    for note in results.get("notes", []):
        out.append(f"note: {note}")
    return "\n".join(out)


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write the results as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def plot(results: dict[str, Any], path: Path) -> str:
    """Draw saturation throughput and paced latency; return what was done (matplotlib is optional)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib; the gateway does not need it)"
    figure, (bars, through, lines) = plt.subplots(1, 3, figsize=(17, 5))
    # the cProfile drain is instrumented: its rate is not a throughput figure
    saturation = [r for r in results["saturation"] if not r.get("error") and "cProfile" not in r["name"]]
    labels = [f"{r['name'].replace(' ', chr(10))}\nQoS {r['qos']}" for r in saturation]
    rates = [primary_rate(r) for r in saturation]
    colours = ["#4c72b0" if r["name"].startswith("tidegate") else "#999999" for r in saturation]
    bars.bar(range(len(rates)), rates, color=colours)
    bars.set_xticks(range(len(rates)), labels, fontsize=7)
    bars.set_ylabel("messages/s (10-90 % of the backlog)")
    bars.set_title("Saturation: draining a backlog")
    reference = next(
        (primary_rate(r) for r in saturation if r["name"] == "mosquitto_sub" and r["qos"] == 1), 0.0
    )
    for factor in (0.7, 0.5):
        if reference:
            bars.axhline(reference * factor, linestyle=":", color="#c44e52", linewidth=1)
            bars.annotate(
                f"{factor} x mosquitto_sub QoS 1",
                (len(rates) - 0.5, reference * factor),
                fontsize=7,
                ha="right",
                va="bottom",
                color="#c44e52",
            )
    for x, rate in enumerate(rates):
        bars.annotate(f"{rate:,.0f}", (x, rate), ha="center", va="bottom", fontsize=7)
    for name, marker in (("tidegate null", "o"), ("tidegate influxdb", "s")):
        saturated = next((primary_rate(r) for r in saturation if r["name"] == name and r["qos"] == 1), 0.0)
        paced = sorted(
            (r for r in results["paced"] if r["name"] == name and not r.get("error")),
            key=lambda r: r["offered_rate"],
        )
        if saturated:
            through.axhline(
                saturated, linestyle=":", linewidth=1, color="#4c72b0" if marker == "o" else "#dd8452"
            )
            through.annotate(f"{name} saturation", (0, saturated), fontsize=7, va="bottom")
        if paced:
            through.plot(
                [r["offered_rate"] for r in paced],
                [r["rate"] for r in paced],
                marker=marker,
                label=f"{name}: stored/s",
            )
    through.set_xlabel("offered load (messages/s)")
    through.set_ylabel("stored messages/s")
    through.set_title("Throughput against offered load")
    through.set_xlim(left=0)
    through.set_ylim(bottom=0)
    through.grid(True, alpha=0.3)
    if through.get_legend_handles_labels()[0]:
        through.legend(fontsize=7)
    for name, marker in (("tidegate null", "o"), ("tidegate influxdb", "s")):
        paced = sorted(
            (r for r in results["paced"] if r["name"] == name and not r.get("error")),
            key=lambda r: r["offered_rate"],
        )
        if not paced:
            continue
        offered = [r["offered_rate"] for r in paced]
        stored_colour, command_colour = ("#4c72b0", "#55a868") if marker == "o" else ("#dd8452", "#c44e52")
        for key, style in (("p50", "--"), ("p99", "-")):
            stored = [(r.get("stored_latency_ms") or {}).get(key) for r in paced]
            lines.plot(
                offered,
                stored,
                style,
                marker=marker,
                color=stored_colour,
                label=f"{name}: publish->stored {key}",
            )
            command = [r["commands"]["publish_to_command_ms"].get(key) for r in paced]
            lines.plot(
                offered,
                command,
                style,
                marker=marker,
                color=command_colour,
                label=f"{name}: publish->command {key}",
            )
    lines.set_xlabel("offered load (messages/s)")
    lines.set_ylabel("latency (ms, log scale)")
    lines.set_yscale("log")
    lines.set_title("Latency against offered load")
    lines.grid(True, which="both", alpha=0.3)
    if lines.get_legend_handles_labels()[0]:
        lines.legend(fontsize=7)
    else:
        lines.text(0.5, 0.5, "no paced runs", ha="center", transform=lines.transAxes)
    figure.suptitle(
        f"tidegate benchmark: {results['config']['messages']:,} msgs, {results['config']['devices']:,} devices, "
        f"{results['started']}",
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot: {path}"
