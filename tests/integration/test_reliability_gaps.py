"""Loss the gateway cannot prevent is reported: M9 (offline queue overflow) and M2 (broker SIGKILL).

Both against a real mosquitto of the test's own. The publisher numbers each device's messages; the
gateway writes to a MemoryStore read back afterwards. What never arrived must be exactly what the
gateway reported as `seq_gap` events (and counted in `seq_gaps` / `seq_missing`), device by device.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.config import BatchSettings, MqttSettings, NullSettings, RulesSettings, Settings
from gateway.store.base import Point
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from tests.integration.mqtt_servers import StartTunedMosquitto
from tests.integration.reliability import check_accounts, gap_events, missing, save_broker, seqs_in
from tests.integration.test_mqtt_faults import Publisher, publisher, running, telemetry_seqs, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEVICES = ["gap-a", "gap-b", "gap-c"]


def gateway_for(
    broker: MosquittoBroker, store: MemoryStore, *, state_dir: Path | None = None, **mqtt: object
) -> Gateway:
    settings = Settings(
        mqtt=MqttSettings.model_validate(
            {"url": broker.url, "client_id": f"tg-gaps-{uuid.uuid4().hex[:6]}", **mqtt}
        ),
        store=NullSettings(kind="null"),  # replaced by the MemoryStore
        batch=BatchSettings(flush_interval=0.05),
        # a checkpoint (and the run state next to it) carries the seqs across a restart
        rules=RulesSettings(checkpoint_file=state_dir / "rules-state.json" if state_dir else None),
    )
    return Gateway(settings, rule_set=build_rule_set({}), store=store)


def sent_seqs(pub: Publisher) -> dict[str, set[int]]:
    return {device: set(seqs) for device, seqs in pub.sent.items()}


async def last_seqs_stored(pub: Publisher, store: MemoryStore, gateways: Sequence[Gateway]) -> None:
    """Wait until each device's newest seq is stored and nothing is in flight: gaps show by then."""
    newest = {device: max(seqs) for device, seqs in pub.sent.items()}

    def done() -> bool:
        stored = telemetry_seqs(store.points)
        return all(seq in stored.get(d, set()) for d, seq in newest.items()) and all(
            g.ingest.stats.in_flight == 0 for g in gateways
        )

    await until(done, f"newest seqs {newest} stored")


def events(points: Sequence[Point]) -> dict[str, set[int]]:
    return seqs_in(gap_events(points))


# -- M9 offline queue overflow ------------------------------------------------------------------------


def test_m9_offline_queue_overflow_is_reported_as_gaps_per_device(
    mosquitto_tuned: StartTunedMosquitto, tmp_path: Path
) -> None:
    queue = 20
    broker = mosquitto_tuned(max_queued_messages=queue)
    store = MemoryStore()
    first = gateway_for(broker, store, state_dir=tmp_path)
    second = Gateway(first.settings, rule_set=build_rule_set({}), store=store)

    async def scenario() -> tuple[dict[str, set[int]], dict[str, Any]]:
        async with publisher(broker.host, broker.port) as pub:
            async with running(first):
                await asyncio.to_thread(pub.publish, DEVICES, 5)
                await pub.flush()
                await last_seqs_stored(pub, store, [first])
            # tidegate is down (stopped cleanly); the broker queues for its session, 20 at most, and
            # drops the rest without telling anyone
            await asyncio.to_thread(pub.publish, DEVICES, 30)
            await pub.flush()
            async with running(second):
                await until(lambda: second.ingest.stats.received >= queue, "the queued messages arrived")
                await asyncio.to_thread(pub.publish, DEVICES, 5)  # the next seqs reveal the gaps
                await pub.flush()
                await last_seqs_stored(pub, store, [second])
                snapshot = second.snapshot()
            return sent_seqs(pub), snapshot

    sent, snapshot = asyncio.run(scenario())
    lost = missing(sent, telemetry_seqs(store.points))
    reported = events(store.points)
    print(
        f"M9: lost { ({d: (min(s), max(s), len(s)) for d, s in lost.items()}) }; {snapshot['seq_gaps']} gaps"
    )
    total = sum(len(s) for s in sent.values())
    assert sum(len(s) for s in lost.values()) == total - 15 - queue - 15  # before, queued, after
    assert set(lost) == set(DEVICES)  # every device lost some
    assert reported == lost
    assert snapshot["seq_gaps"] == len(DEVICES)  # one run of seqs each: the queue kept the oldest
    assert snapshot["seq_missing"] == sum(len(s) for s in lost.values())
    assert (snapshot["seq_late"], snapshot["seq_gaps_unverified"], snapshot["sessions_lost"]) == (0, 0, 0)
    assert snapshot["received"] == queue + 15
    check_accounts(snapshot)
    assert snapshot["messages_stored"] == snapshot["received"]


# -- M2 broker SIGKILL --------------------------------------------------------------------------------


class GatedStore(MemoryStore):
    """A MemoryStore whose writes wait until `opened`: the gateway falls behind and the broker queues."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = asyncio.Event()

    async def write(self, points: Sequence[Point]) -> None:
        await self.opened.wait()
        await super().write(points)


def test_m2_broker_sigkill_loses_only_what_it_had_not_saved_and_reports_it_as_gaps(
    mosquitto_tuned: StartTunedMosquitto,
) -> None:
    # No autosave: the test decides what mosquitto has on disk when it is killed.
    broker = mosquitto_tuned(autosave_interval=3600)
    store = GatedStore()
    # A small receive window keeps most of the backlog queued in the broker, not in our socket.
    gateway = gateway_for(broker, store, receive_maximum=20, reconnect_max_delay=1.0)

    async def scenario() -> tuple[dict[str, set[int]], dict[str, set[int]], dict[str, Any]]:
        async with publisher(broker.host, broker.port) as pub, running(gateway):
            await asyncio.to_thread(pub.publish, DEVICES, 100)
            await pub.flush()
            await until(lambda: gateway.ingest.stats.received >= 20, "the gateway is receiving")
            await save_broker(broker)
            saved = sent_seqs(pub)  # acknowledged by the broker before its last save
            await asyncio.to_thread(pub.publish, DEVICES, 100)
            await pub.flush()  # acknowledged, queued for us, not saved
            load = asyncio.create_task(asyncio.to_thread(pub.publish, DEVICES, 60, 0.02))
            await asyncio.sleep(0.3)
            broker.kill()  # under load: SIGKILL, no save
            await asyncio.sleep(0.5)
            await asyncio.to_thread(broker.start)  # same port and data directory
            store.opened.set()
            await until(lambda: gateway.mqtt.stats.connects == 2, "the gateway reconnected")
            await load
            await pub.flush()
            await last_seqs_stored(pub, store, [gateway])
            return saved, sent_seqs(pub), gateway.snapshot()

    saved, sent, snapshot = asyncio.run(scenario())
    stored = telemetry_seqs(store.points)
    lost = missing(sent, stored)
    reported = events(store.points)
    print(
        f"M2: lost { ({d: (min(s), max(s), len(s)) for d, s in lost.items()}) }; "
        f"gaps {snapshot['seq_gaps']}, duplicates {snapshot['duplicates']}"
    )
    assert not missing(saved, stored), "a message the broker had saved was lost"
    assert lost, "nothing was lost: the kill came after everything was delivered"
    # The publisher resends what the broker had not acknowledged when it died, and may do so after
    # newer messages: a gap can be reported first and partly filled by late arrivals afterwards.
    assert {d: s - stored[d] for d, s in reported.items() if s - stored[d]} == lost
    late = sum(len(s & stored[d]) for d, s in reported.items())
    assert (snapshot["seq_missing"], snapshot["seq_late"]) == (sum(map(len, reported.values())), late)
    assert snapshot["seq_missing"] - snapshot["seq_late"] == sum(len(s) for s in lost.values())
    assert snapshot["seq_gaps"] == sum(len(r) for r in gap_events(store.points).values())
    assert (snapshot["sessions_lost"], snapshot["seq_gaps_unverified"]) == (0, 0)  # the session was saved
    assert snapshot["mqtt_connected"]
    check_accounts(snapshot)
    assert snapshot["in_flight"] == 0 and snapshot["messages_stored"] == snapshot["received"]
