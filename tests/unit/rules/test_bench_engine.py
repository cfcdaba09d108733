"""The engine benchmark (`python3 -m bench.engine`) runs end to end with tiny numbers; no timing is checked."""

from __future__ import annotations

import re

import pytest

from bench import engine as bench


def test_a_tiny_run_prints_both_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--devices", "30", "--warmup", "3", "--seconds", "2", "--memory-warmup", "2"]) == 0
    out = capsys.readouterr().out
    assert "engine: 30 devices x 10 rules (3 windowed over 5m), 60 events in" in out
    assert re.search(r"events/s \(one core\): [\d,]+ ", out)
    assert re.search(r"rule state per device: [\d,]+ bytes traced .*; RSS growth -?[\d,]+ bytes", out)


def test_the_workload_has_ten_rules_three_of_them_windowed_and_it_raises_alarms() -> None:
    engine = bench.new_engine(bench.device_ids(100))
    rules = engine.rule_set.rules
    assert len(rules) == 10 and sum(bool(rule.when and rule.when.windows) for rule in rules) == 3
    _, events, actions = bench.replay(engine, bench.device_ids(100), range(3))
    assert events == 300 and actions > 0  # the trigger variant raises and clears `overheat`


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--devices", "0"])
