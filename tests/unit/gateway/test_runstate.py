"""The run state file: where it lives, and that it reads back what was written or nothing at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.runstate import RunState, read_run_state, run_state_path, write_run_state

STATE = RunState(
    "tidegate", "127.0.0.1:1883", session=True, connected_until=1_764_000_000.5, clean_stop=False
)


def test_it_lives_next_to_the_checkpoint_else_next_to_the_spool(tmp_path: Path) -> None:
    assert run_state_path(tmp_path / "rules-state.json", tmp_path / "spool") == tmp_path / "tidegate-run.json"
    assert run_state_path(None, tmp_path / "data" / "spool") == tmp_path / "data" / "tidegate-run.json"
    assert run_state_path(None, None) is None


def test_what_is_written_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "tidegate-run.json"
    assert read_run_state(path) is None
    assert write_run_state(path, STATE)
    assert read_run_state(path) == STATE
    never_connected = RunState("t", "b:1", session=False, connected_until=None, clean_stop=True)
    assert write_run_state(path, never_connected)
    assert read_run_state(path) == never_connected
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"format": "other", "version": 1}',
        '{"format": "tidegate-run", "version": 2}',
        '{"format": "tidegate-run", "version": 1, "client_id": "t"}',
        '{"format": "tidegate-run", "version": 1, "client_id": "t", "broker": "b", "session": "yes",'
        ' "connected_until": null, "clean_stop": false}',
        '{"format": "tidegate-run", "version": 1, "client_id": "t", "broker": "b", "session": true,'
        ' "connected_until": "soon", "clean_stop": false}',
    ],
)
def test_an_unusable_file_is_logged_and_ignored(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tidegate-run.json"
    path.write_text(text)
    assert read_run_state(path) is None
    assert f"ignoring run state file {path}" in caplog.text


def test_a_failed_write_is_logged_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not write_run_state(tmp_path / "missing-dir" / "tidegate-run.json", STATE)
    assert "could not write run state file" in caplog.text


def test_the_file_is_plain_json_an_operator_can_read(tmp_path: Path) -> None:
    path = tmp_path / "tidegate-run.json"
    write_run_state(path, STATE)
    assert json.loads(path.read_text()) == {
        "format": "tidegate-run",
        "version": 1,
        "client_id": "tidegate",
        "broker": "127.0.0.1:1883",
        "session": True,
        "connected_until": 1_764_000_000.5,
        "clean_stop": False,
    }
