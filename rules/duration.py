"""Durations as rule files write them (`30s`, `5m`, `250ms`, `2h`, `1d`, `1m30s`, or a number of seconds)."""

from __future__ import annotations

import math
import re

_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d)"
DURATION_RE = re.compile(rf"\s*(?:{_PART})+\s*\Z")
_PART_RE = re.compile(_PART)
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
EXPECTED_DURATION = "a duration like 30s, 5m, 1m30s, 2h or 250ms, or a number of seconds"
# A year is far beyond any sensible window or timer, and keeps arithmetic on epoch times exact enough.
MAX_DURATION = 366 * 86400.0


def parse_duration(value: object) -> float:
    """Return `value` (`5m`, `30s`, `90`, ...) in seconds, or raise `ValueError` saying what was expected."""
    if isinstance(value, bool):
        raise ValueError(f"expected {EXPECTED_DURATION}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = DURATION_RE.match(value)
        if match is None:
            raise ValueError(f"expected {EXPECTED_DURATION}")
        seconds = sum(float(n) * UNIT_SECONDS[unit] for n, unit in _PART_RE.findall(value))
    else:
        raise ValueError(f"expected {EXPECTED_DURATION}")
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_DURATION:
        raise ValueError(f"expected {EXPECTED_DURATION}, from 0 to 366d")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way rule files write them: `0s`, `90s` as `1m30s`, `2h`, `1.5s`."""
    sign = "-" if seconds < 0 else ""
    rest = abs(seconds)
    whole = math.floor(rest)
    fraction = round(rest - whole, 3)
    if fraction >= 1:
        whole, fraction = whole + 1, 0.0
    hours, minutes, secs = whole // 3600, whole % 3600 // 60, whole % 60
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs or fraction or not parts:
        parts.append(f"{secs + fraction:g}s" if fraction else f"{secs}s")
    return sign + "".join(parts)
