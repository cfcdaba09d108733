"""The benchmark's quick mode, end to end: it completes, writes its results, and tidegate loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.broker import find_mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs_and_tidegate_loses_nothing(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert "Saturation" in run.stdout and "Targets" in run.stdout
    assert (tmp_path / "latest.png").exists() or "matplotlib is not installed" in run.stdout

    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["config"]["quick"] is True
    published = results["load"]["published"]
    assert published == results["config"]["messages"]

    saturation = {(row["name"], row["qos"]): row for row in results["saturation"]}
    assert ("paho-mqtt", 1) in saturation and ("tidegate null", 1) in saturation
    for row in results["saturation"]:
        assert not row.get("error"), row
        assert row["received"] >= published, row["name"]
        assert row["lost"] == 0 and row["duplicates"] == 0, row["name"]

    tidegate = [row for row in results["saturation"] + results["paced"] if row["name"].startswith("tidegate")]
    assert {row["name"] for row in results["paced"]} >= {"tidegate null"}
    for row in tidegate:
        assert not row.get("error"), row
        assert row["stored"] == row["distinct"] == row["messages"], row["name"]
        assert row["lost"] == 0 and row["duplicates"] == 0, row["name"]
        assert row["commands"]["triggers"] > 0 and row["commands"]["missing"] == 0, row["name"]
        assert row["cpu_s"] > 0 and row["rss_peak_kb"] > 0
    influx = saturation.get(("tidegate influxdb", 1))
    if influx is not None:
        assert influx["stored_in_influxdb"] == published  # counted by InfluxDB itself, not by the bench
    for row in results["paced"]:
        assert row["stored_latency_ms"]["count"] == row["messages"]
        assert row["commands"]["publish_to_command_ms"]["count"] == row["commands"]["triggers"]
    null_profile = saturation[("tidegate null", 1)]["profile"]
    assert null_profile["samples"] > 0 and null_profile["stages"]
