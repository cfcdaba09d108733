"""Where tidegate's CPU time goes, by pipeline stage: a sampling profiler, and a cProfile summary.

The sampler takes a stack sample every millisecond of CPU time (SIGPROF from ITIMER_PROF) and charges
the sample to the innermost frame that belongs to a known stage; stdlib frames (json, uuid, logging)
are transparent, so `json.loads` counts as decoding and `uuid4` as commands, and C calls count for the
Python function that made them. asyncio frames are a stage only when nothing inside them is. At ~1 %
overhead it runs during the measured drain itself. cProfile (`--cprofile`) instruments every call,
which inflates small, frequently called functions, so it runs as a separate drain and serves for the
function-level detail; its stage table charges a builtin's own time to its callers.
"""

from __future__ import annotations

import pstats
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any, Final

import gateway

_ROOT: Final = str(Path(gateway.__file__).resolve().parent.parent) + "/"
WEAK: Final = "event loop (asyncio)"
GC: Final = "garbage collector (gc)"
OTHER: Final = "other"

# In data-flow order; the report lists stages in this order.
STAGES: Final = (
    "mqtt read+parse",
    "mqtt dispatch",
    "ingest",
    "decode (JSON + validate)",
    "dedupe",
    "points (records)",
    "rules",
    "commands",
    "batcher",
    "mqtt acks/out",
    "line protocol",
    "store HTTP (httpx)",
    "store (null)",
    "bench timing wrapper",
    GC,
    WEAK,
    OTHER,
)

_PROJECT_FILES: Final = {
    "gateway/app.py": "mqtt dispatch",
    "gateway/ingest.py": "ingest",
    "devices/topic.py": "ingest",
    "devices/payload.py": "decode (JSON + validate)",
    "devices/event.py": "decode (JSON + validate)",
    "devices/dedupe.py": "dedupe",
    "gateway/records.py": "points (records)",
    "gateway/commands.py": "commands",
    "devices/command.py": "commands",
    "gateway/store/batcher.py": "batcher",
    "gateway/store/lineprotocol.py": "line protocol",
    "gateway/store/influx_v1.py": "store HTTP (httpx)",
    "gateway/store/memory.py": "store (null)",
}
_PAHO_OUT: Final = frozenset(
    {
        "ack",
        "publish",
        "_send_puback",
        "_send_pubcomp",
        "_send_publish",
        "_send_command_with_mid",
        "_send_simple_command",
        "_packet_queue",
        "loop_write",
        "_packet_write",
        "_sock_send",
        "want_write",
        "_call_socket_register_write",
        "_call_socket_unregister_write",
    }
)
_PAHO_DISPATCH: Final = frozenset({"_handle_on_message", "iter_match", "topic", "topic_matches_sub"})
_GATEWAY_MQTT_OUT: Final = frozenset({"ack", "publish", "_flush_acks", "write"})
_BENCH_HOT: Final = frozenset({"write", "first_message"})  # TimingStore.write, the window hook
_HTTP_PACKAGES: Final = ("/httpx/", "/httpcore/", "/h11/", "/anyio/", "/sniffio/", "/idna/")


def classify(filename: str, function: str) -> str | None:
    """Return the stage a function belongs to, `WEAK` for the event loop, None for transparent code."""
    path = filename.replace("\\", "/")
    if "/paho/mqtt/" in path:
        if function in _PAHO_OUT:
            return "mqtt acks/out"
        if function in _PAHO_DISPATCH or path.endswith("/matcher.py"):
            return "mqtt dispatch"
        return "mqtt read+parse"
    if path.startswith(_ROOT):
        relative = path[len(_ROOT) :]
        if relative.startswith("bench/"):
            if function == "_callback":
                # GcPauses' gc callback: a SIGPROF that lands during a collection is handled when the
                # collector's "stop" callback runs, so these samples are the collector's own time
                return GC
            # only the measuring code on the hot path; the harness around the loop is transparent
            return "bench timing wrapper" if function in _BENCH_HOT else None
        if relative == "gateway/mqttcodec.py":
            return "mqtt read+parse"
        if relative == "gateway/mqtt.py":
            return "mqtt acks/out" if function in _GATEWAY_MQTT_OUT else "mqtt dispatch"
        if relative.startswith("rules/"):
            return "rules"
        stage = _PROJECT_FILES.get(relative)
        if stage is not None:
            return stage
        if relative.startswith(("gateway/", "devices/")):
            return f"other: {relative}"  # a module added since this map was written shows by name
        return None
    if any(package in path for package in _HTTP_PACKAGES):
        return "store HTTP (httpx)"
    if "/asyncio/" in path or path.endswith("/selectors.py"):
        return WEAK
    return None


class StageSampler:
    """Sample the main thread's stack on CPU time and count samples per stage and per leaf function."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.samples = 0
        self.stages: Counter[str] = Counter()
        self.leaves: Counter[tuple[CodeType, str]] = Counter()  # (leaf function, stage charged)
        self._cache: dict[CodeType, str | None] = {}
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def start(self) -> None:
        """Start sampling (call from the main thread)."""
        self._previous = signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        """Stop sampling and restore the previous SIGPROF handler."""
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        previous = self._previous if self._previous is not None else signal.SIG_IGN
        signal.signal(signal.SIGPROF, previous)

    def _stage(self, code: CodeType) -> str | None:
        try:
            return self._cache[code]
        except KeyError:
            stage = self._cache[code] = classify(code.co_filename, code.co_name)
            return stage

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        if frame is None:
            return
        self.samples += 1
        charged = self._charge(frame)
        self.stages[charged] += 1
        self.leaves[frame.f_code, charged] += 1

    def _charge(self, frame: FrameType) -> str:
        weak = False
        current: FrameType | None = frame
        while current is not None:
            stage = self._stage(current.f_code)
            if stage is not None:
                if stage != WEAK:
                    return stage
                weak = True
            current = current.f_back
        return WEAK if weak else OTHER

    def summary(self, top: int = 15) -> dict[str, Any]:
        """Return stage shares and the busiest leaf functions as plain data."""
        total = self.samples or 1
        return {
            "method": "sampling",
            "interval_ms": self.interval * 1000,
            "samples": self.samples,
            "stages": _ordered({stage: count / total for stage, count in self.stages.items()}),
            "top_functions": [
                {
                    "function": _describe(code.co_filename, code.co_firstlineno, code.co_name),
                    "stage": stage,
                    "share": count / total,
                }
                for (code, stage), count in self.leaves.most_common(top)
            ],
        }


def _ordered(shares: dict[str, float]) -> dict[str, float]:
    known = {stage: shares[stage] for stage in STAGES if stage in shares}
    extra = {stage: share for stage, share in sorted(shares.items()) if stage not in known}
    return known | extra


def _describe(filename: str, line: int, function: str) -> str:
    path = filename.replace("\\", "/")
    if path.startswith(_ROOT):
        path = path[len(_ROOT) :]
    elif "/site-packages/" in path:
        path = path.split("/site-packages/", 1)[1]
    elif "/lib/python" in path:
        path = "stdlib/" + path.split("/lib/python", 1)[1].split("/", 1)[-1]
    elif path == "<string>":
        path = "<generated: dataclass or namedtuple>"
    return f"{path}:{line} {function}" if path != "~" else function


def _is_idle(func: tuple[str, int, str]) -> bool:
    return func[0] == "~" and func[2] in (
        "<method 'poll' of 'select.epoll' objects>",
        "<built-in method time.sleep>",
    )


def cprofile_summary(path: str | Path, top: int = 20) -> dict[str, Any]:
    """Summarise a cProfile dump: own time per stage (builtins charged to callers) and top functions."""
    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}

    def charge(func: tuple[str, int, str], seconds: float, depth: int) -> None:
        stage = classify(func[0], func[2])
        if stage is not None or depth > 8:
            key = stage or OTHER
            totals[key] = totals.get(key, 0.0) + seconds
            return
        entry = raw.get(func)
        callers: dict[tuple[str, int, str], tuple[int, int, float, float]] = entry[4] if entry else {}
        # a caller's share is the own time spent in this function on calls from it
        weights = {caller: edge[2] for caller, edge in callers.items()}
        whole = sum(weights.values())
        if whole <= 0:
            totals[OTHER] = totals.get(OTHER, 0.0) + seconds
            return
        for caller, weight in weights.items():
            charge(caller, seconds * weight / whole, depth + 1)

    # cProfile times by the wall clock: time blocked in epoll is idle, not work, and is left out
    idle = sum(values[2] for func, values in raw.items() if _is_idle(func))
    for func, (_, _, own, _, _) in raw.items():
        if own > 0 and not _is_idle(func):
            charge(func, own, 0)
    whole = sum(totals.values()) or 1.0
    ranked = sorted(
        ((func, values) for func, values in raw.items() if not _is_idle(func)),
        key=lambda item: item[1][2],
        reverse=True,
    )[:top]
    return {
        "method": "cProfile",
        "seconds": whole,
        "idle_seconds": idle,
        "stages": _ordered({stage: seconds / whole for stage, seconds in totals.items()}),
        "top_functions": [
            {
                "function": _describe(func[0], func[1], func[2]),
                "stage": classify(func[0], func[2]) or "(builtin/stdlib, charged to callers)",
                "share": values[2] / whole,
                "calls": values[1],
            }
            for func, values in ranked
        ],
    }
