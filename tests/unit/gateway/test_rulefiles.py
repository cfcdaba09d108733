"""The rule directory's fingerprint: what the gateway polls to notice a changed rule file."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.rulefiles import rule_files_fingerprint


def test_fingerprint_changes_with_rule_files_only(tmp_path: Path) -> None:
    rule_file = tmp_path / "a.yaml"
    rule_file.write_text("rules: []\n")
    first = rule_files_fingerprint(tmp_path)
    assert rule_files_fingerprint(tmp_path) == first
    (tmp_path / "notes.txt").write_text("not a rule file")
    assert rule_files_fingerprint(tmp_path) == first
    rule_file.write_text("rules: [ ]\n")  # one byte longer, even within one mtime tick
    second = rule_files_fingerprint(tmp_path)
    assert second != first
    os.utime(rule_file, ns=(1, 1))  # same size, another time
    assert rule_files_fingerprint(tmp_path) != second
    (tmp_path / "b.yml").write_text("")
    assert len(rule_files_fingerprint(tmp_path)) == 2
    rule_file.unlink()
    assert [name for name, *_ in rule_files_fingerprint(tmp_path)] == ["b.yml"]


def test_a_missing_directory_has_an_empty_fingerprint(tmp_path: Path) -> None:
    assert rule_files_fingerprint(tmp_path / "gone") == frozenset()


def test_a_single_rule_file_can_be_watched(tmp_path: Path) -> None:
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text("x")
    assert [name for name, *_ in rule_files_fingerprint(rule_file)] == ["rules.yaml"]
