"""The rule state file: atomic writes, restore at start, bad files ignored, settings defaults."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from devices.dedupe import SeqTracker
from devices.event import TelemetryEvent
from gateway.checkpoint import (
    STATE_FORMAT,
    STATE_VERSION,
    RuleStateCheckpointer,
    read_state_file,
    write_state_file,
)
from gateway.config import RulesSettings, Settings, load_settings
from gateway.store.base import Point
from gateway.store.batcher import BatchWriter
from gateway.store.memory import MemoryStore
from rules.action import RecordAlert
from rules.checkpoint import CheckpointError
from rules.engine import RuleEngine
from rules.parse import build_rule_set

T0 = 1_764_000_000.0
RULES = "rules:\n  - id: hot\n    when: temperature > 30\n    for: 5s\n"


def engine() -> RuleEngine:
    return RuleEngine(build_rule_set({"r.yaml": RULES}))


def checkpointer(path: Path, rule_engine: RuleEngine, seqs: SeqTracker) -> RuleStateCheckpointer:
    writer = BatchWriter(MemoryStore())
    return RuleStateCheckpointer(path, engine=rule_engine, seqs=seqs, writer=writer, interval=10)


def test_the_state_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert read_state_file(path) is None
    write_state_file(path, {"a": 1})
    write_state_file(path, {"b": [1, 2.5, None]})
    assert read_state_file(path) == {"b": [1, 2.5, None]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_file_that_is_not_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"format": "tidegate-state", "vers')
    with pytest.raises(CheckpointError, match="not JSON"):
        read_state_file(path)


def test_state_and_seqs_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.json"

    async def first() -> None:
        rule_engine, seqs = engine(), SeqTracker()
        rule_engine.process(TelemetryEvent("d", T0, {"temperature": 31}), T0)
        assert seqs.first_time("d", 7)
        saver = checkpointer(path, rule_engine, seqs)
        assert await saver.checkpoint()
        assert await saver.close()
        assert (saver.written, saver.failures) == (2, 0)
        assert not await saver.checkpoint()  # closed: nothing more is written

    async def second() -> None:
        rule_engine, seqs = engine(), SeqTracker()
        saver = checkpointer(path, rule_engine, seqs)
        assert await saver.restore(T0 + 2) == []
        assert not seqs.first_time("d", 7)  # a redelivery after the restart
        assert seqs.first_time("d", 8)
        raised = rule_engine.advance(T0 + 5)
        assert [a.ts - T0 for a in raised if isinstance(a, RecordAlert)] == [
            5.0
        ]  # the `for` period kept running

    asyncio.run(first())
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == (STATE_FORMAT, STATE_VERSION)
    asyncio.run(second())


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        json.dumps({"format": STATE_FORMAT, "version": 99}).encode(),
        json.dumps({"format": "other"}).encode(),
        json.dumps(
            {"format": STATE_FORMAT, "version": STATE_VERSION, "seqs": {}, "rules": {"version": 3}}
        ).encode(),
        json.dumps(
            {"format": STATE_FORMAT, "version": STATE_VERSION, "seqs": {"d": [1]}, "rules": {}}
        ).encode(),
    ],
)
def test_a_bad_state_file_is_logged_moved_aside_and_ignored(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    rule_engine, seqs = engine(), SeqTracker()

    async def scenario() -> None:
        assert await checkpointer(path, rule_engine, seqs).restore(T0) == []

    with caplog.at_level(logging.ERROR, logger="gateway.checkpoint"):
        asyncio.run(scenario())
    assert "ignoring rule state file" in caplog.text
    assert not path.exists()
    assert (tmp_path / "state.json.corrupt").read_bytes() == content
    assert len(seqs) == 0 and rule_engine.active_alarms() == []


def test_a_checkpoint_waits_until_the_points_queued_before_it_are_written(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = MemoryStore()
    writer = BatchWriter(store, flush_interval=0.01)
    saver = RuleStateCheckpointer(path, engine=engine(), seqs=SeqTracker(), writer=writer, interval=10)

    async def scenario() -> None:
        writer.add([Point("alerts", (("rule", "hot"),), {"message": "m"}, T0)])
        pending = asyncio.ensure_future(saver.checkpoint())
        await asyncio.sleep(0.05)
        assert not pending.done() and not path.exists()  # the alert record is not written yet
        async with asyncio.TaskGroup() as group:
            group.create_task(writer.run())
            assert await pending
            assert len(store.points) == 1 and path.exists()
            await writer.close()

    asyncio.run(scenario())


def test_a_failed_write_is_counted_and_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "state.json"

    async def scenario() -> None:
        saver = checkpointer(path, engine(), SeqTracker())
        assert not await saver.checkpoint()
        assert (saver.written, saver.failures) == (0, 1)

    asyncio.run(scenario())


def test_seq_tracker_state_round_trips_and_refuses_nonsense() -> None:
    seqs = SeqTracker(window=8)
    for seq in (1, 2, 5, 3):
        seqs.first_time("d", seq)
    copy = SeqTracker(window=8)
    copy.restore_state(json.loads(json.dumps(seqs.export_state())))
    assert [copy.first_time("d", seq) for seq in (1, 2, 3, 4, 5, 6)] == [
        False,
        False,
        False,
        True,
        False,
        True,
    ]
    bad: object
    for bad in ([], {"d": [1]}, {"d": [1, "zz"]}, {"d": [1, "fff"]}, {"d": [True, "1"]}):
        with pytest.raises(ValueError):
            copy.restore_state(bad)


def test_the_state_file_defaults_next_to_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "tidegate.yaml"
    config.write_text("rules:\n  checkpoint_interval: 5\n")
    rules = load_settings(config, environ={}).rules
    assert (rules.checkpoint_file, rules.checkpoint_interval) == (tmp_path / "rules-state.json", 5)
    config.write_text("rules:\n  checkpoint_file: state/r.json\n")
    assert load_settings(config, environ={}).rules.checkpoint_file == tmp_path / "state" / "r.json"
    config.write_text("rules:\n  checkpoint_enabled: false\n")
    assert load_settings(config, environ={}).rules.checkpoint_file is None
    assert Settings().rules.checkpoint_file is None  # built in code: none unless set
    assert RulesSettings(checkpoint_file=Path("/x.json")).checkpoint_file == Path("/x.json")
