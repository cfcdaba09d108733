"""Broken payloads, made on purpose: pure functions of a reading and a seeded rng.

Every kind but `empty` and `not_utf8` keeps `"seq":N` readable in the bytes, so a checker can tell
which reading was sent broken. What the gateway does with each (README "For device developers"):

    bad_json     the reading's JSON cut off after its seq         -> rejected: invalid JSON
    nan          a number replaced by NaN                         -> rejected: NaN is not a number
    wrong_type   a value wrapped in an object {"value": v}        -> rejected: not a number/bool/string
    oversize     padded past the 64 KiB payload limit             -> rejected before parsing
    not_utf8     the bytes of a text value replaced by \\xff      -> rejected: not UTF-8
    empty        a zero-byte payload                              -> rejected: empty payload
"""

from __future__ import annotations

import json
import random
from typing import Any

from simulator.fleet import MalformedKind

OVERSIZE_BYTES = 65_536 + 512  # just past the gateway's default payload limit (64 KiB)


def encode(doc: dict[str, Any]) -> bytes:
    """Serialise a reading the way devices send it (compact JSON)."""
    return json.dumps(doc, separators=(",", ":")).encode()


def malformed_payload(kind: MalformedKind, doc: dict[str, Any], rng: random.Random) -> bytes:
    """Return `doc` (a reading with ts and seq first) broken in the way `kind` names."""
    if kind == "empty":
        return b""
    if kind == "bad_json":
        whole = encode(doc)
        seq_end = whole.index(b'"seq":') + len(b'"seq":') + len(str(doc["seq"]))
        # Cut somewhere after the seq and before the end, so the text stops mid-object.
        cut = rng.randint(seq_end, max(seq_end, len(whole) - 2))
        return whole[:cut]
    broken = dict(doc)
    metrics = [key for key in doc if key not in ("ts", "seq")]
    if kind == "nan":
        numbers = [key for key in metrics if type(doc[key]) is float or type(doc[key]) is int]
        broken[rng.choice(numbers) if numbers else "ts"] = float("nan")  # json.dumps writes NaN
        return encode(broken)
    if kind == "wrong_type":
        key = rng.choice(metrics) if metrics else "seq"
        broken[key] = {"value": doc[key]}
        return encode(broken)
    if kind == "not_utf8":
        return encode(broken)[:-1] + b',"note":"\xff\xfe"}'
    # oversize
    body = encode(broken)
    padding = OVERSIZE_BYTES - len(body)
    return body[:-1] + b',"padding":"' + b"x" * max(padding, 16) + b'"}'
