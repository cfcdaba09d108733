"""What a gateway restart must carry over: the MQTT session it had, and how exact its seq memory is.

The run state (gateway/runstate.py) lives next to the rule checkpoint. A broker that forgot our
session while tidegate was down is a loss tidegate must record (M8 across a restart); after a crash,
seqs the crashed run stored after its last checkpoint must not be counted as missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.broker import MosquittoBroker
from gateway.config import BatchSettings, MqttSettings, NullSettings, RulesSettings, Settings
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from tests.integration.faultproxy import FaultProxy
from tests.integration.mqtt_servers import StartTunedMosquitto
from tests.integration.reliability import check_accounts, gap_events, send
from tests.integration.test_mqtt_faults import running, telemetry_seqs, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T0 = float(int(time.time()) - 3600)
DEVICE = "sess-1"


def settings_for(host: str, port: int, client_id: str, state_dir: Path) -> Settings:
    return Settings(
        mqtt=MqttSettings(url=f"mqtt://{host}:{port}", client_id=client_id),
        store=NullSettings(kind="null"),  # replaced by a MemoryStore
        batch=BatchSettings(flush_interval=0.05),
        # periodic checkpoints only when the test asks for one
        rules=RulesSettings(checkpoint_file=state_dir / "rules-state.json", checkpoint_interval=3600),
    )


def telemetry(*seqs: int) -> list[tuple[str, bytes]]:
    topic = f"devices/{DEVICE}/telemetry"
    return [(topic, json.dumps({"seq": s, "ts": T0 + s, "t": s}).encode()) for s in seqs]


async def publish(broker: MosquittoBroker, *seqs: int) -> None:
    await asyncio.to_thread(send, broker.host, broker.port, telemetry(*seqs))


async def stored(store: MemoryStore, *seqs: int) -> None:
    await until(lambda: set(seqs) <= telemetry_seqs(store.points).get(DEVICE, set()), f"seqs {seqs} stored")


def test_a_session_the_broker_lost_while_tidegate_was_down_is_recorded_after_the_restart(
    mosquitto_tuned: StartTunedMosquitto, tmp_path: Path
) -> None:
    broker = mosquitto_tuned()
    store = MemoryStore()
    settings = settings_for(broker.host, broker.port, f"tg-sess-{uuid.uuid4().hex[:6]}", tmp_path)
    first = Gateway(settings, rule_set=build_rule_set({}), store=store)
    second = Gateway(settings, rule_set=build_rule_set({}), store=store)

    async def scenario() -> tuple[float, float]:
        async with running(first):
            await publish(broker, 1, 2, 3)
            await stored(store, 1, 2, 3)
        stopped = time.time()
        run_state = json.loads((tmp_path / "tidegate-run.json").read_text())
        assert run_state["session"] and run_state["clean_stop"]
        # The broker restarts without its persistence: our session and what it queued are gone.
        await asyncio.to_thread(broker.stop)
        (broker.persistence_dir / "mosquitto.db").unlink()
        await asyncio.to_thread(broker.start)
        await publish(broker, 4, 5)  # nobody is subscribed: mosquitto drops these
        async with running(second):
            await publish(broker, 6)
            await stored(store, 6)
        return stopped, time.time()

    stopped, ended = asyncio.run(scenario())
    snapshot = second.snapshot()
    assert snapshot["sessions_lost"] == 1
    [event] = [
        p
        for p in store.points
        if p.measurement == "gateway_events" and dict(p.tags)["kind"] == "session_lost"
    ]
    since, until_ = float(event.fields["since"]), float(event.fields["until"])
    assert stopped - 2 <= since <= stopped  # from when the first run let go of its session
    assert since < until_ <= ended
    # the seqs the broker dropped show as a gap too: the clean stop left an exact checkpoint
    assert gap_events(store.points) == {DEVICE: [(4, 5)]}
    assert (snapshot["seq_gaps"], snapshot["seq_missing"], snapshot["seq_gaps_unverified"]) == (1, 2, 0)
    check_accounts(snapshot)


def test_a_first_start_and_a_resumed_session_record_no_loss(
    mosquitto_tuned: StartTunedMosquitto, tmp_path: Path
) -> None:
    broker = mosquitto_tuned()
    store = MemoryStore()
    settings = settings_for(broker.host, broker.port, f"tg-sess-{uuid.uuid4().hex[:6]}", tmp_path)
    runs = [Gateway(settings, rule_set=build_rule_set({}), store=store) for _ in range(2)]

    async def scenario() -> None:
        for n, gateway in enumerate(runs):
            async with running(gateway):
                await publish(broker, n + 1)
                await stored(store, n + 1)

    asyncio.run(scenario())
    assert [g.snapshot()["sessions_lost"] for g in runs] == [0, 0]
    assert not [p for p in store.points if p.measurement == "gateway_events"]


@contextlib.asynccontextmanager
async def crashing(gateway: Gateway) -> AsyncIterator[Gateway]:
    """Run the gateway for the block, then end it as a crash would: no drain, no checkpoint, no DISCONNECT."""
    task = asyncio.create_task(gateway.run(asyncio.Event()))
    try:
        await until(gateway.mqtt.connected.is_set, "gateway connected")
        yield gateway
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_after_a_crash_what_the_crashed_run_stored_is_not_counted_missing(
    mosquitto_tuned: StartTunedMosquitto, tmp_path: Path
) -> None:
    broker = mosquitto_tuned()
    store = MemoryStore()
    client_id = f"tg-crash-{uuid.uuid4().hex[:6]}"
    second = Gateway(
        settings_for(broker.host, broker.port, client_id, tmp_path), rule_set=build_rule_set({}), store=store
    )

    async def scenario() -> None:
        async with FaultProxy(broker.host, broker.port) as proxy:
            first = Gateway(
                settings_for(proxy.host, proxy.port, client_id, tmp_path),
                rule_set=build_rule_set({}),
                store=store,
            )
            async with crashing(first):
                await publish(broker, 1, 2, 3)
                await stored(store, 1, 2, 3)
                assert first.checkpointer is not None and await first.checkpointer.checkpoint()
                await publish(broker, 4, 5, 6)  # stored and acked, but newer than the checkpoint
                await stored(store, 4, 5, 6)
                await asyncio.sleep(0.2)  # their acks reach the broker
            proxy.reset_connections()  # the crashed process's connection dies with it
        await publish(broker, 7, 8)  # queued for our session meanwhile
        async with running(second):
            await stored(store, 7, 8)
            await publish(broker, 11)  # 9 and 10 never sent: a real gap
            await stored(store, 11)

    asyncio.run(scenario())
    snapshot = second.snapshot()
    assert gap_events(store.points, "seq_gap_unverified") == {DEVICE: [(4, 6)]}
    assert gap_events(store.points) == {DEVICE: [(9, 10)]}
    assert (snapshot["seq_gaps"], snapshot["seq_missing"], snapshot["seq_gaps_unverified"]) == (1, 2, 1)
    assert snapshot["sessions_lost"] == 0
    assert snapshot["duplicates"] == 0  # nothing the crashed run acked came again
    check_accounts(snapshot)
