"""A naive line protocol reader and acceptance rule, written independently of the encoder for tests."""

from __future__ import annotations

import math
from typing import Any

from gateway.store.base import Point

FieldValue = Any


def _read(text: str, pos: int, stops: str, escapable: str) -> tuple[str, int]:
    out = []
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text) and text[pos + 1] in escapable:
            out.append(text[pos + 1])
            pos += 2
            continue
        if char in stops:
            break
        out.append(char)
        pos += 1
    return "".join(out), pos


def _read_value(text: str, pos: int) -> tuple[FieldValue, int]:
    if text[pos] == '"':
        out = []
        pos += 1
        while text[pos] != '"':
            if text[pos] == "\\" and text[pos + 1] in '"\\':
                pos += 1
            out.append(text[pos])
            pos += 1
        return "".join(out), pos + 1
    raw, pos = _read(text, pos, ", ", "")
    if raw in ("true", "false"):
        return raw == "true", pos
    if raw.endswith("i"):
        return int(raw[:-1]), pos
    return float(raw), pos


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, FieldValue], int]:
    """Return (measurement, tags, fields, timestamp) of one line of line protocol."""
    assert "\n" not in line and "\r" not in line
    measurement, pos = _read(line, 0, ", ", ", ")
    tags: dict[str, str] = {}
    while line[pos] == ",":
        key, pos = _read(line, pos + 1, "=", ",= ")
        value, pos = _read(line, pos + 1, ", ", ",= ")
        assert key not in tags
        tags[key] = value
    assert line[pos] == " "
    fields: dict[str, FieldValue] = {}
    pos += 1
    while True:
        key, pos = _read(line, pos, "=", ",= ")
        fields[key], pos = _read_value(line, pos + 1)
        if line[pos] == " ":
            break
        assert line[pos] == ","
        pos += 1
    timestamp = line[pos + 1 :]
    assert timestamp.lstrip("-").isdigit(), timestamp
    return measurement, tags, fields, int(timestamp)


def _bad_name(name: object) -> bool:
    if not isinstance(name, str) or name == "" or "\n" in name or "\r" in name or "\0" in name:
        return True
    if any(0xD800 <= ord(char) <= 0xDFFF for char in name):
        return True
    return any(
        char == "\\" and (i + 1 == len(name) or name[i + 1] in '\\,= "') for i, char in enumerate(name)
    )


def _bad_value(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**63
    if isinstance(value, float):
        return math.isnan(value) or math.isinf(value)
    if isinstance(value, str):
        return "\n" in value or "\r" in value or any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    return True


def should_reject(point: Point) -> bool:
    """Say whether a point cannot be written unchanged, by the rules documented in lineprotocol.py."""
    if _bad_name(point.measurement) or point.measurement[0] in "#\t":
        return True
    tags = [(key, value) for key, value in point.tags if value != ""]
    keys = [key for key, _ in tags]
    if len(set(keys)) != len(keys) or "time" in keys:
        return True
    if any(_bad_name(key) or _bad_name(value) for key, value in tags):
        return True
    if not point.fields or "time" in point.fields:
        return True
    if any(
        _bad_name(key) or key[0] == "\t" or '"' in key or _bad_value(value)
        for key, value in point.fields.items()
    ):
        return True
    ts_us = point.ts * 1e6
    if math.isnan(ts_us) or math.isinf(ts_us):
        return True
    return not -9_223_372_036_854_775 <= round(ts_us) <= 9_223_372_036_854_775
