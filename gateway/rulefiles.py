"""Read rule files from a directory (the I/O half of rules.parse)."""

from __future__ import annotations

from pathlib import Path

from devices.errors import Problem, SourceFileError
from rules import RuleSet, build_rule_set

RULE_SUFFIXES = (".yaml", ".yml")


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
