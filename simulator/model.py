"""One simulated device: readings, faults and commands. Pure: time passed in, randomness seeded.

`SimulatedDevice(device_id, spec, seed=..., start=...)` is built from its group's merged
`DeviceTypeSpec` (simulator/fleet.py). The runner calls `step(now)` at `next_due` and publishes
what it returns; `handle(command, now)` answers a command. Both return `Outgoing` messages:

    telemetry  {"ts": <epoch s, with the device's clock skew>, "seq": <1, 2, ...>, "<field>": value, ...}
               or, replaying after a disconnect with `replay: batch`, a JSON array of such objects
    status     {"status": "online" | "offline", "ts": ...}  (retained; see devices/status.py)
    ack        {"id": <the command's>, "status": "ok" | "error", "detail"?}

Every reading takes the next seq, also one sent broken (malformed), held back (late, out of order)
or dropped (offline buffer full, `replay: drop`); so a subscriber sees each seq at most once per
send, and a gap only where the summary counts a drop. What a device does per `step(now)`:

1. back online when its disconnect is over: status online, then the buffered readings, then the
   commands that arrived meanwhile (as a broker delivers a persistent session's queue);
2. a scheduled disconnect that has begun, or one drawn with `probability`: status offline;
3. the reading (fields in file order), then per fault one draw: malformed, else late, else out of
   order; then the held readings that are due;
4. while offline, everything goes to the buffer instead of out;
5. `next_due = now + interval * uniform(1 - jitter, 1 + jitter)`.

Commands: a repeated id gets the same ack again and is not re-applied; one past its `expires`
is acked error "expired"; the fault `commands: {error, ignore}` acks error or stays silent; then
the first behaviour whose `params` the command's params include applies its effects and acks.
Commands draw from their own rng, so they never change the telemetry a seed produces.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Literal

from devices.command import EXPIRED_DETAIL, Command, CommandAck
from devices.status import encode_status
from simulator.faults import encode, malformed_payload
from simulator.fleet import CommandCase, DeviceTypeSpec, MalformedKind
from simulator.signal import Effect, FieldSignal

Channel = Literal["telemetry", "status", "ack"]
REMEMBERED_COMMANDS = 256  # acks kept per device to answer a repeated command id without re-running it
PENDING_COMMANDS = 100  # commands held for a device while it is offline
MAX_BATCH_ITEMS = 1_000  # the gateway's limit per array payload
MAX_BATCH_BYTES = 60_000  # under the gateway's 64 KiB payload limit, with room to spare
FAILURE_DETAIL = "simulated failure"


@dataclass(slots=True)
class Outgoing:
    """One message a device sends.

    Attributes:
        device_id: whose topic it goes to.
        channel: telemetry, status or ack.
        kind: what it is, for the summary: reading, late, out_of_order, malformed, burst, batch
            (telemetry); online, offline (status); ack (ok), ack_error, ack_expired, ack_repeat (ack).
        payload: the bytes.
        seqs: the seq numbers it carries (telemetry; a batch carries several).
    """

    device_id: str
    channel: Channel
    kind: str
    payload: bytes
    seqs: tuple[int, ...] = ()

    @property
    def retain(self) -> bool:
        """Status messages are retained (devices/status.py)."""
        return self.channel == "status"


@dataclass(slots=True)
class _Held:
    out: Outgoing
    release_at: float  # epoch seconds (late), or readings still to pass (out of order)


@dataclass(frozen=True, slots=True)
class _Behaviour:
    params: dict[str, Any]
    effects: tuple[tuple[int, Effect], ...]  # (field index, effect)
    ack: Literal["ok", "error"]
    detail: str


class SimulatedDevice:
    """One simulated device. See the module docstring for what `step` and `handle` do.

    Args:
        device_id: the id in its topics.
        spec: the behaviour of its group (type merged with the group's overrides).
        seed: the run's seed; with the device id it seeds this device's own rng.
        start: epoch seconds at which the run started (t = 0 for `at` times).
    """

    __slots__ = (
        "_behaviours",
        "_buffer",
        "_command_rng",
        "_fields",
        "_first",
        "_held_late",
        "_held_order",
        "_jitter",
        "_pending",
        "_remembered",
        "_rng",
        "_seed",
        "_windows",
        "device_id",
        "disconnects",
        "dropped",
        "ignored",
        "interval",
        "next_due",
        "offline_until",
        "online",
        "seq",
        "skew",
        "spec",
        "start",
    )

    def __init__(self, device_id: str, spec: DeviceTypeSpec, *, seed: int, start: float) -> None:
        self.device_id = device_id
        self.spec = spec
        self.start = start
        self._seed = seed
        rng = self._rng = random.Random(f"{seed}/{device_id}")  # str seeds hash the same in every process
        self.interval = spec.interval
        self._jitter = spec.jitter
        self.skew = spec.clock_skew.draw(rng)
        self._fields = [FieldSignal.build(name, field, rng, start) for name, field in spec.fields.items()]
        index = {name: i for i, name in enumerate(spec.fields)}
        self._behaviours = {
            name: [self._behaviour(case, index, rng) for case in cases]
            for name, cases in spec.commands.items()
        }
        disconnect = spec.faults.disconnect
        # scheduled disconnects: [next start (elapsed s), every or None, duration spread]
        self._windows: list[list[Any]] = [
            [w.at, w.every, w.for_] for w in (disconnect.schedule if disconnect is not None else [])
        ]
        self.seq = 0
        self.online = True
        self.offline_until = 0.0
        self.disconnects = 0
        self.dropped = 0  # readings lost: offline buffer overflow, or replay: drop
        self.ignored = 0  # commands left unanswered (fault `commands.ignore`)
        self._buffer: deque[Outgoing] = deque()
        self._held_late: list[_Held] = []
        self._held_order: list[_Held] = []
        self._pending: deque[Command] = deque()
        self._remembered: OrderedDict[str, bytes] = OrderedDict()
        self._command_rng: random.Random | None = None  # made on the first command: 2.5 KB per device
        self._first = rng.uniform(0.0, self.interval)  # spread the first readings over one interval
        self.next_due = start + self._first

    def __repr__(self) -> str:
        state = "online" if self.online else f"offline until {self.offline_until:.1f}"
        return f"SimulatedDevice({self.device_id!r}, seq {self.seq}, {state})"

    def begin(self, start: float) -> None:
        """Move the run's start (t = 0 of `at` times) to `start`, before the first `step`.

        The runner builds its devices, connects them, and only then starts the clock.
        """
        self.start = start
        for signal in self._fields:
            signal.start = start
        self.next_due = start + self._first

    @staticmethod
    def _behaviour(case: CommandCase, index: dict[str, int], rng: random.Random) -> _Behaviour:
        effects = tuple((index[name], Effect.resolve(effect, rng)) for name, effect in case.effects.items())
        return _Behaviour(dict(case.params), effects, case.ack, case.detail)

    @property
    def field_names(self) -> list[str]:
        """The telemetry fields, in the order they appear in payloads."""
        return [signal.name for signal in self._fields]

    def clock(self, now: float) -> float:
        """The device's own clock at true time `now` (its skew added), rounded to the millisecond."""
        return round(now + self.skew, 3)

    # -- telemetry ---------------------------------------------------------------------------------------

    def step(self, now: float) -> list[Outgoing]:
        """Take the reading due at epoch time `now`; return what the device sends; set `next_due`."""
        out: list[Outgoing] = []
        rng = self._rng
        elapsed = now - self.start
        if not self.online and now >= self.offline_until:
            self._reconnect(now, out)
        self._check_disconnect(now, elapsed, out)
        self.seq += 1
        doc: dict[str, Any] = {"ts": self.clock(now), "seq": self.seq}
        for signal in self._fields:
            doc[signal.name] = signal.read(now, rng)
        faults = self.spec.faults
        broken = faults.malformed is not None and rng.random() < faults.malformed.rate
        late = faults.late is not None and rng.random() < faults.late.rate
        shuffled = faults.out_of_order is not None and rng.random() < faults.out_of_order.rate
        reading: Outgoing | None
        if broken:
            assert faults.malformed is not None
            kind: MalformedKind = rng.choice(faults.malformed.kinds)
            payload = malformed_payload(kind, doc, rng)
            reading = Outgoing(self.device_id, "telemetry", "malformed", payload, (self.seq,))
        else:
            reading = Outgoing(self.device_id, "telemetry", "reading", encode(doc), (self.seq,))
            if late:
                assert faults.late is not None
                reading.kind = "late"
                self._held_late.append(_Held(reading, now + faults.late.by.draw(rng)))
                reading = None
            elif shuffled:
                assert faults.out_of_order is not None
                reading.kind = "out_of_order"
                self._held_order.append(_Held(reading, float(round(faults.out_of_order.by.draw(rng)))))
                reading = None
        if reading is not None:
            self._send(reading, out)
        self._release_held(now, out)
        jitter = self._jitter
        factor = rng.uniform(1.0 - jitter, 1.0 + jitter) if jitter > 0.0 else 1.0
        self.next_due = now + self.interval * factor
        return out

    def reschedule(self, now: float) -> None:
        """Take the next reading at `now` at the earliest (the runner fell behind; no catch-up burst)."""
        self.next_due = max(self.next_due, now)

    def _send(self, message: Outgoing, out: list[Outgoing]) -> None:
        if self.online:
            out.append(message)
            return
        disconnect = self.spec.faults.disconnect
        if disconnect is None or disconnect.replay == "drop" or disconnect.buffer == 0:
            self.dropped += len(message.seqs)
            return
        if len(self._buffer) >= disconnect.buffer:
            self.dropped += len(self._buffer.popleft().seqs)  # the oldest go first, as on most devices
        self._buffer.append(message)

    def _release_held(self, now: float, out: list[Outgoing]) -> None:
        if self._held_order:
            keep = []
            for held in self._held_order:
                held.release_at -= 1.0
                if held.release_at < 0.0:
                    self._send(held.out, out)
                else:
                    keep.append(held)
            self._held_order = keep
        if self._held_late:
            due = [held for held in self._held_late if held.release_at <= now]
            if due:
                self._held_late = [held for held in self._held_late if held.release_at > now]
                for held in due:
                    self._send(held.out, out)

    # -- disconnects -----------------------------------------------------------------------------------

    def _check_disconnect(self, now: float, elapsed: float, out: list[Outgoing]) -> None:
        disconnect = self.spec.faults.disconnect
        if disconnect is None:
            return
        rng = self._rng
        until: float | None = None
        for window in self._windows:
            start, every, duration = window
            if start is None or elapsed < start:
                continue
            if every is not None:  # the latest occurrence that has begun; missed ones are skipped
                start += math.floor((elapsed - start) / every) * every
                window[0] = start + every
            else:
                window[0] = None
            end = self.start + start + duration.draw(rng)
            until = end if until is None else max(until, end)
        if disconnect.probability > 0.0 and rng.random() < disconnect.probability and self.online:
            end = now + disconnect.for_.draw(rng)
            until = end if until is None else max(until, end)
        if until is None:
            return
        if self.online:
            self.online = False
            self.disconnects += 1
            out.append(
                Outgoing(self.device_id, "status", "offline", encode_status("offline", self.clock(now)))
            )
        self.offline_until = max(self.offline_until, until)

    def _reconnect(self, now: float, out: list[Outgoing]) -> None:
        self.online = True
        out.append(Outgoing(self.device_id, "status", "online", encode_status("online", self.clock(now))))
        disconnect = self.spec.faults.disconnect
        buffered, self._buffer = list(self._buffer), deque()
        if disconnect is not None and disconnect.replay == "batch":
            out.extend(self._batches(buffered))
        else:
            for message in buffered:
                message.kind = "burst"
                out.append(message)
        pending, self._pending = list(self._pending), deque()
        for command in pending:
            out.extend(self._answer(command, now))

    def _batches(self, buffered: list[Outgoing]) -> list[Outgoing]:
        """Group buffered readings into JSON arrays; a malformed one goes alone, in its place."""
        batches: list[Outgoing] = []
        parts: list[bytes] = []
        seqs: list[int] = []
        size = 2

        def flush() -> None:
            nonlocal size
            if parts:
                payload = b"[" + b",".join(parts) + b"]"
                batches.append(Outgoing(self.device_id, "telemetry", "batch", payload, tuple(seqs)))
                parts.clear()
                seqs.clear()
                size = 2

        for message in buffered:
            if message.kind == "malformed":
                flush()
                batches.append(message)
                continue
            if len(parts) >= MAX_BATCH_ITEMS or size + len(message.payload) + 1 > MAX_BATCH_BYTES:
                flush()
            parts.append(message.payload)
            seqs.extend(message.seqs)
            size += len(message.payload) + 1
        flush()
        return batches

    # -- commands --------------------------------------------------------------------------------------

    def handle(self, command: Command, now: float) -> list[Outgoing]:
        """Answer `command`, received at epoch time `now`; offline, keep it for the reconnect."""
        if not self.online:
            if len(self._pending) < PENDING_COMMANDS:
                self._pending.append(command)
            return []  # beyond that a broker would drop it too (its queue limit)
        return self._answer(command, now)

    def _answer(self, command: Command, now: float) -> list[Outgoing]:
        answered = self._remembered.get(command.id)
        if answered is not None:  # a retry: same answer, not run twice
            return [Outgoing(self.device_id, "ack", "ack_repeat", answered)]
        expires = command.expires
        if expires is not None and now >= expires:
            ack = self._ack(command, "error", EXPIRED_DETAIL)
        else:
            faults = self.spec.faults.commands
            draw = self._commands_rng().random() if faults is not None else 1.0
            if faults is not None and draw < faults.ignore:
                self.ignored += 1
                return []  # never acked: the gateway records a timeout
            if faults is not None and draw < faults.ignore + faults.error:
                ack = self._ack(command, "error", FAILURE_DETAIL)
            else:
                ack = self._obey(command, now)
        payload = ack.encode()
        self._remembered[command.id] = payload
        if len(self._remembered) > REMEMBERED_COMMANDS:
            self._remembered.popitem(last=False)
        kind = "ack" if ack.status == "ok" else "ack_expired" if ack.detail == EXPIRED_DETAIL else "ack_error"
        return [Outgoing(self.device_id, "ack", kind, payload)]

    def _obey(self, command: Command, now: float) -> CommandAck:
        behaviours = self._behaviours.get(command.name)
        if behaviours is None:
            known = ", ".join(repr(name) for name in sorted(self._behaviours)) or "none"
            return self._ack(command, "error", f"unknown command {command.name!r}; this device knows {known}")
        params = command.params
        for behaviour in behaviours:
            if all(key in params and _same(params[key], value) for key, value in behaviour.params.items()):
                for index, effect in behaviour.effects:
                    self._fields[index].apply(effect, now)
                return self._ack(command, behaviour.ack, behaviour.detail)
        expected = " or ".join(_show(b.params) for b in behaviours)
        detail = f"{command.name!r} with params {_show(params)} not understood; expected {expected}"
        return self._ack(command, "error", detail)

    def _commands_rng(self) -> random.Random:
        if self._command_rng is None:
            self._command_rng = random.Random(f"{self._seed}/{self.device_id}/commands")
        return self._command_rng

    def _ack(self, command: Command, status: Literal["ok", "error"], detail: str = "") -> CommandAck:
        return CommandAck(command.id, self.device_id, status, detail)

    # -- what the runner needs -------------------------------------------------------------------------

    def birth(self, now: float) -> Outgoing:
        """The status message published right after connecting."""
        return Outgoing(self.device_id, "status", "online", encode_status("online", self.clock(now)))

    def goodbye(self, now: float) -> Outgoing:
        """The status message published before a clean disconnect."""
        return Outgoing(self.device_id, "status", "offline", encode_status("offline", self.clock(now)))

    @property
    def held(self) -> int:
        """Readings not sent yet: held back (late, out of order) or buffered while offline."""
        return len(self._held_late) + len(self._held_order) + sum(len(m.seqs) for m in self._buffer)


def _same(given: object, expected: object) -> bool:
    """Compare a command param with a behaviour's; 1 and 1.0 match, True and 1 do not."""
    if isinstance(given, bool) or isinstance(expected, bool):
        return type(given) is type(expected) and given == expected
    return given == expected


def _show(params: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{key}: {_text(value)}" for key, value in params.items()) + "}"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
