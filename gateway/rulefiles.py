"""Read rule files from a directory (the I/O half of rules.parse)."""

from __future__ import annotations

import os
from pathlib import Path

from devices.errors import Problem, SourceFileError
from rules import RuleSet, build_rule_set

RULE_SUFFIXES = (".yaml", ".yml")
Fingerprint = frozenset[tuple[str, int, int, int]]


def read_rule_dir(path: Path) -> RuleSet:
    """Parse every rule file in `path` (or one file), reporting all problems of all files together."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in RULE_SUFFIXES and p.is_file())
    else:
        raise SourceFileError([Problem(str(path), None, None, "", "no such file or directory")])
    texts: dict[str, str] = {}
    for file in files:
        try:
            texts[str(file)] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceFileError([Problem(str(file), None, None, "", f"cannot read: {exc}")]) from None
    return build_rule_set(texts)


def rule_files_fingerprint(path: Path) -> Fingerprint:
    """Return what changes when a rule file is written, added or removed: name, inode, size, mtime.

    Cheap enough to poll (one `stat` per file, no reads). The inode catches editors that save by
    renaming a new file into place; the size catches two writes within one mtime tick. A missing
    directory gives an empty fingerprint, so its return is noticed too.
    """
    try:
        entries = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in RULE_SUFFIXES]
    except OSError:
        return frozenset()
    seen: list[tuple[str, int, int, int]] = []
    for entry in entries:
        try:
            stat = os.stat(entry)
        except OSError:  # removed between listing and stat: the next poll sees it gone
            continue
        seen.append((entry.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return frozenset(seen)
