"""The ingest's message accounts against a real BatchWriter and spool: they add up at every moment.

`received = messages_stored + messages_spooled + messages_dead_lettered + rejected + in_flight`,
whatever mix of good, bad, redelivered and store-refused messages arrives, and whether the store is
up, down (the spool takes the batches) or back. Batches are small so that messages straddle them.
Gaps found in the seqs are counted and recorded as `gateway_events` points.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from devices.payload import PayloadDecoder
from devices.registry import DeviceRegistry, parse_registry
from devices.topic import TopicScheme
from gateway.commands import CommandDispatcher
from gateway.ingest import TelemetryIngest
from gateway.store.base import Point, RejectedPointsError, RetryableStoreError
from gateway.store.batcher import BatchWriter
from gateway.store.memory import MemoryStore
from gateway.store.spool import Spool
from rules import RuleEngine, build_rule_set

T0 = 1_764_000_000.0


@dataclass
class Msg:
    topic: str
    payload: bytes
    mid: int
    qos: int = 1
    content_type: str | None = None


class FakeMqtt:
    generation = 1

    def __init__(self) -> None:
        self.acks: list[int] = []

    def ack(self, mid: int, qos: int, generation: int) -> None:
        self.acks.append(mid)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        pass


class ScriptedStore(MemoryStore):
    """Fail while `down`; refuse for good every point with a `poison` field, storing the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def write(self, points: Sequence[Point]) -> None:
        if self.down:
            raise RetryableStoreError("down")
        poisoned = [p for p in points if "poison" in p.fields]
        await super().write([p for p in points if "poison" not in p.fields])
        if poisoned:
            raise RejectedPointsError("field type conflict", poisoned)


REGISTRY = """
types:
  probe:
    fields:
      t: {type: number, min: 0, max: 100}
devices:
  - {id: d, type: probe}
"""


def make(
    tmp_path: Path, registry: DeviceRegistry | None = None
) -> tuple[TelemetryIngest, BatchWriter, ScriptedStore, FakeMqtt]:
    store, mqtt = ScriptedStore(), FakeMqtt()
    writer = BatchWriter(
        store,
        batch_size=3,
        flush_interval=0.001,
        max_pending=1_000,
        retry_initial=0.001,
        retry_max=0.002,
        spool=Spool(tmp_path / "spool"),
    )
    ingest = TelemetryIngest(
        topics=TopicScheme("devices/{device_id}/telemetry"),
        decoder=PayloadDecoder(),
        engine=RuleEngine(build_rule_set({})),
        sink=writer,
        commands=CommandDispatcher(
            channel=mqtt,
            topics=TopicScheme("devices/{device_id}/commands"),
            record=lambda point: writer.add([point]),
            clock=lambda: T0,
        ),
        mqtt=mqtt,
        dead_letter_topic="tidegate/dead-letter",
        dead_letter_max_bytes=64,
        clock=lambda: T0,
        hand_off=lambda: writer.current_hand_off,
        registry=registry,
    )
    return ingest, writer, store, mqtt


def check(ingest: TelemetryIngest) -> None:
    s = ingest.stats
    parts = (s.messages_stored, s.messages_spooled, s.messages_dead_lettered, s.rejected, s.in_flight)
    assert s.received == sum(parts), (s.received, parts)
    assert s.written == s.messages_stored + s.messages_spooled + s.messages_dead_lettered


# A message: ("good", seq), ("poison", seq), ("bad",), ("batch", seq) two events in one message,
# or a store switch ("down",) / ("up",).
steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["good", "poison", "batch"]), st.integers(1, 30)),
        st.tuples(st.sampled_from(["bad", "down", "up", "settle"])),
    ),
    max_size=40,
)


def payload(kind: str, seq: int) -> bytes:
    if kind == "poison":
        return json.dumps({"seq": seq, "ts": T0 + seq, "poison": 1}).encode()
    if kind == "batch":
        return json.dumps([{"seq": seq, "ts": T0 + seq, "t": 1}, {"ts": T0 + seq + 0.5, "t": 2}]).encode()
    return json.dumps({"seq": seq, "ts": T0 + seq, "t": seq}).encode()


@settings(max_examples=40, deadline=None)
@given(script=steps)
def test_messages_are_accounted_for_at_every_moment(script: list[tuple[str] | tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        ingest, writer, store, mqtt = make(Path(directory))
        expected = {"rejected": 0, "dead": 0, "handed": 0}

        async def body() -> None:
            async with asyncio.TaskGroup() as group:
                running = group.create_task(writer.run())
                for mid, step in enumerate(script, 1):
                    kind = step[0]
                    if kind == "down":
                        store.down = True
                    elif kind == "up":
                        store.down = False
                    elif kind == "settle":
                        await asyncio.sleep(0.01)
                    else:
                        body = b"{not json" if len(step) == 1 else payload(kind, step[1])
                        ingest.on_message(Msg("devices/d/telemetry", body, mid))
                        expected["rejected" if kind == "bad" else "handed"] += 1
                    check(ingest)
                    await asyncio.sleep(0)
                    check(ingest)
                store.down = False
                while ingest.stats.in_flight or not writer.spool or not writer.spool.empty:
                    check(ingest)
                    await asyncio.sleep(0.001)
                await writer.close()
                await running

        asyncio.run(asyncio.wait_for(body(), 20))
        stats = ingest.stats
        check(ingest)
        assert stats.in_flight == 0
        assert stats.rejected == expected["rejected"]
        assert stats.written == expected["handed"]
        assert len(mqtt.acks) == len([s for s in script if s[0] not in ("down", "up", "settle")])
        assert mqtt.acks == sorted(mqtt.acks)  # PUBACKs leave in the order the messages came
        # a poisoned message counts as dead-lettered unless it went to the spool first: refusals
        # found while draining the spool come after its ack (points_rejected, the dead-letter file)
        poisoned = sum(1 for s in script if s[0] == "poison")
        assert stats.messages_dead_lettered <= poisoned
        if not any(s[0] == "down" for s in script):
            assert stats.messages_spooled == 0 and stats.messages_dead_lettered == poisoned
        # each message counted as spooled had a point in the spool, and spooled points (other than
        # gap records, which belong to no message) mean some message was counted so
        assert stats.messages_spooled <= writer.spooled
        assert (writer.spooled > stats.seq_gaps) <= (stats.messages_spooled > 0)


def test_a_gap_is_counted_and_recorded_and_a_late_seq_fills_it(tmp_path: Path) -> None:
    ingest, writer, store, _ = make(tmp_path)

    async def body() -> None:
        async with asyncio.TaskGroup() as group:
            running = group.create_task(writer.run())
            for mid, seq in enumerate([1, 2, 6, 4, 4, 7], 1):
                ingest.on_message(Msg("devices/d/telemetry", payload("good", seq), mid))
            await writer.close()  # hands off everything pending first
            await running

    asyncio.run(asyncio.wait_for(body(), 10))
    stats = ingest.stats
    assert (stats.seq_gaps, stats.seq_missing, stats.seq_late, stats.duplicates) == (1, 3, 1, 1)
    [event] = [p for p in store.points if p.measurement == "gateway_events"]
    assert dict(event.tags) == {"device": "d", "kind": "seq_gap"}
    assert (event.fields["first"], event.fields["last"], event.fields["missing"]) == (3, 5, 3)
    assert event.ts == T0 + 6  # timed like the message that revealed it: a redelivery rewrites it
    check(ingest)


def test_seqs_of_a_message_refused_after_decoding_are_not_reported_missing(tmp_path: Path) -> None:
    ingest, writer, _, _ = make(tmp_path, parse_registry(REGISTRY, "devices.yaml"))
    too_hot = json.dumps({"seq": 2, "ts": T0 + 2, "t": 150}).encode()  # outside the type's range

    async def body() -> None:
        async with asyncio.TaskGroup() as group:
            running = group.create_task(writer.run())
            ingest.on_message(Msg("devices/d/telemetry", payload("good", 1), 1))
            ingest.on_message(Msg("devices/d/telemetry", too_hot, 2))
            ingest.on_message(Msg("devices/d/telemetry", payload("good", 3), 3))
            await writer.close()  # hands off everything pending first
            await running

    asyncio.run(asyncio.wait_for(body(), 10))
    assert ingest.stats.rejected == 1
    assert ingest.stats.seq_gaps == 0  # seq 2 is in the dead-letter record with its reason, not lost
    check(ingest)
