"""Input through the whole gateway: I5 (awkward names and values read back exactly) and I8 (time policy).

I5: hypothesis picks device ids, field names and string values from what the README allows, with
separators, quotes, escapes and non-ASCII text often; each message goes over a real mosquitto
through one running gateway into a real InfluxDB 1.x and must read back as exactly one point with
the same values.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from devices.payload import FIELD_NAME_RE, IDENTITY_KEYS, RESERVED_KEYS
from devices.topic import DEVICE_ID_PATTERN
from gateway.app import Gateway
from gateway.config import BatchSettings, InfluxV1Settings, MqttSettings, Settings
from gateway.store.memory import MemoryStore
from rules import build_rule_set
from tests.integration.influx_servers import InfluxDBServer
from tests.integration.mqtt_servers import StartTunedMosquitto
from tests.integration.reliability import check_accounts, send
from tests.integration.test_mqtt_faults import running, telemetry_seqs, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

T0 = float(int(time.time()) - 3600)

# What the README allows, and nothing more: the names line protocol cannot carry ("time") and the
# keys with a meaning of their own are left out.
device_ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)
field_names = st.from_regex(FIELD_NAME_RE.pattern.removesuffix(r"\Z"), fullmatch=True).filter(
    lambda name: name not in RESERVED_KEYS | IDENTITY_KEYS | {"time"}
)
string_values = st.text(
    st.one_of(
        st.sampled_from(list(" ,=\"'\\#+/{}$\t")),
        st.characters(codec="utf-8", exclude_characters="\r\n"),  # line breaks are refused by design
    ),
    max_size=64,
)


class GatewayThread:
    """Run a gateway on an event loop of its own thread, so that hypothesis examples can drive it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        await self.gateway.run(self._stop)

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.gateway.mqtt.connected.is_set():
            assert self._thread.is_alive() and time.monotonic() < deadline, "the gateway did not connect"
            time.sleep(0.02)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        self._loop.close()


def wait_for(condition: Any, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within}s"
        time.sleep(0.005)


def test_i5_hypothesis_names_and_values_read_back_from_influxdb_as_exactly_one_point(
    mosquitto_tuned: StartTunedMosquitto, influxdb_v1: InfluxDBServer
) -> None:
    broker = mosquitto_tuned()
    database = influxdb_v1.create_database("i5")
    gateway = Gateway(
        Settings(
            mqtt=MqttSettings(url=broker.url, client_id=f"tg-i5-{uuid.uuid4().hex[:6]}"),
            store=InfluxV1Settings(kind="influxdb_v1", url=influxdb_v1.url, database=database),
            batch=BatchSettings(flush_interval=0.01),
        ),
        rule_set=build_rule_set({}),
    )
    numbers = itertools.count(1)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"i5-{uuid.uuid4().hex[:6]}")
    client.connect(broker.host, broker.port)
    client.loop_start()

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(device=device_ids, fields=st.dictionaries(field_names, string_values, min_size=1, max_size=4))
    def example(device: str, fields: dict[str, str]) -> None:
        n = next(numbers)  # a distinct timestamp per example: one point each, never merged
        ts = T0 + n / 1000
        stats = gateway.ingest.stats
        written, rejected = stats.written, stats.rejected
        payload = json.dumps({"seq": n, "ts": ts, **fields}).encode()
        client.publish(f"devices/{device}/telemetry", payload, qos=1).wait_for_publish(10)
        wait_for(lambda: stats.written + stats.rejected > written + rejected, "the message handed off")
        assert stats.rejected == rejected, "an allowed message was rejected"
        assert gateway.snapshot()["points_rejected"] == 0
        rows = influxdb_v1.rows(
            f'SELECT * FROM "telemetry" WHERE "device" = \'{device}\' AND time = {round(ts * 1e6)}u', database
        )
        assert len(rows) == 1, rows
        values = {k: v for k, v in rows[0].items() if v is not None and k not in ("time", "device")}
        assert values == {**fields, "seq": n}
        assert rows[0]["device"] == device

    try:
        with GatewayThread(gateway):
            example()
    finally:
        client.disconnect()
        client.loop_stop()
    check_accounts(gateway.snapshot())


# -- I8 out-of-order, late and future timestamps ------------------------------------------------------

RULES = """
lateness: 30s
rules:
  - id: warm
    when: avg(t, 5m) > 25
"""


def test_i8_out_of_order_and_late_events_are_stored_late_ones_counted_future_ones_refused(
    mosquitto_tuned: StartTunedMosquitto,
) -> None:
    broker = mosquitto_tuned()
    store = MemoryStore()
    gateway = Gateway(
        Settings(
            mqtt=MqttSettings(url=broker.url, client_id=f"tg-i8-{uuid.uuid4().hex[:6]}"),
            batch=BatchSettings(flush_interval=0.05),
        ),
        rule_set=build_rule_set({"warm.yaml": RULES}),
        store=store,
    )
    now = time.time()
    device = "i8-1"
    # (seq, seconds before now, t): 2 comes out of order within the lateness, 4 is 2 minutes behind
    # the newest (late for the window, stored all the same), 5 is a year and more ahead (refused).
    sends = [(1, 60, 20.0), (3, 40, 30.0), (2, 50, 20.0), (4, 160, 90.0), (5, -367 * 86_400, 20.0)]

    async def scenario() -> None:
        async with running(gateway):
            messages = [
                (f"devices/{device}/telemetry", json.dumps({"seq": s, "ts": now - ago, "t": t}).encode())
                for s, ago, t in sends
            ]
            await asyncio.to_thread(send, broker.host, broker.port, messages)
            await until(
                lambda: gateway.ingest.stats.received == 5 and gateway.ingest.stats.in_flight == 0, "all"
            )

    asyncio.run(scenario())
    snapshot = gateway.snapshot()
    assert telemetry_seqs(store.points) == {device: {1, 2, 3, 4}}  # late ones are stored, not dropped
    assert snapshot["rule_late_events"] == 1  # the 90 degrees two minutes late did not reach the window
    assert snapshot["rejected"] == 1  # the future timestamp, dead-lettered with its reason
    assert snapshot["alerts_raised"] == 0  # avg of 20, 30, 20 is 23.3: the late 90 would have raised it
    assert snapshot["seq_late"] == 1  # seq 2 arrived after 3: reported missing, then it came
    check_accounts(snapshot)
