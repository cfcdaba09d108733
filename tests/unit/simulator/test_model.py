"""The simulated device: readings, seq numbers, faults and commands, driven with explicit times."""

from __future__ import annotations

import itertools
import json
import re
import statistics
import textwrap
from collections import Counter
from typing import Any

import pytest

from devices.command import Command, CommandAck
from devices.errors import PayloadError
from devices.payload import PayloadDecoder
from devices.status import decode_status
from simulator.fleet import parse_fleet, quick_fleet
from simulator.model import SimulatedDevice

T0 = 1_764_000_000.0
SEQ_RE = re.compile(rb'"seq":(\d+)')
DECODER = PayloadDecoder()

BASE = """\
types:
  t:
    interval: 10s
    jitter: 0%
    fields:
      temperature: {random_walk: {start: 20, step: 0.2}, noise: 0.1}
      door: {constant: false}
{extra}
groups:
  - {type: t, ids: [dev-1]}
"""


def device(extra: str = "", *, seed: int = 1, device_id: str = "dev-1") -> SimulatedDevice:
    text = BASE.replace("{extra}", textwrap.indent(textwrap.dedent(extra), "    "))
    fleet = parse_fleet(text, "test.yaml")
    return SimulatedDevice(device_id, fleet.groups[0].spec, seed=seed, start=T0)


def run(d: SimulatedDevice, seconds: float) -> list[tuple[float, Any]]:
    """Step `d` at its due times for `seconds`; return (time, message) for everything it sent."""
    sent = []
    while d.next_due <= T0 + seconds:
        now = d.next_due
        sent += [(now, message) for message in d.step(now)]
    return sent


def telemetry(sent: list[tuple[float, Any]]) -> list[tuple[float, Any]]:
    return [(t, m) for t, m in sent if m.channel == "telemetry"]


def seq_of(payload: bytes) -> int:
    match = SEQ_RE.search(payload)
    assert match is not None, payload[:80]
    return int(match.group(1))


def test_same_seed_same_messages_other_seed_other_values() -> None:
    first = [m.payload for _, m in run(device(seed=7), 600)]
    assert [m.payload for _, m in run(device(seed=7), 600)] == first
    assert [m.payload for _, m in run(device(seed=8), 600)] != first
    # the seed is per device: another id with the same seed reads differently
    assert [m.payload for _, m in run(device(seed=7, device_id="dev-2"), 600)] != first


def test_readings_carry_ts_seq_and_the_fields_and_decode_as_the_gateway_does() -> None:
    sent = run(device(), 100)
    assert [m.kind for _, m in sent] == ["reading"] * len(sent)
    for i, (now, message) in enumerate(sent, start=1):
        assert message.device_id == "dev-1" and message.seqs == (i,)
        [event] = DECODER.decode(message.device_id, message.payload, now)
        assert event.seq == i and event.ts == pytest.approx(now, abs=0.001)
        assert set(event.fields) == {"temperature", "door"}
    times = [now for now, _ in sent]
    assert times[1] - times[0] == pytest.approx(10.0)  # jitter 0


def test_jitter_spreads_intervals_within_its_bounds_and_the_first_reading_within_one_interval() -> None:
    spec_text = BASE.replace("jitter: 0%", "jitter: 20%").replace("{extra}", "")
    d = SimulatedDevice("dev-1", parse_fleet(spec_text).groups[0].spec, seed=3, start=T0)
    times = [t for t, _ in run(d, 5000)]
    assert T0 <= times[0] < T0 + 10
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(8.0 <= gap <= 12.0 for gap in gaps) and statistics.mean(gaps) == pytest.approx(10.0, rel=0.02)
    assert statistics.stdev(gaps) > 0.5


def test_clock_skew_is_fixed_per_device_within_its_range() -> None:
    skews = set()
    for seed in range(30):
        d = device("clock_skew: -5s..5s", seed=seed)
        sent = run(d, 60)
        offsets = {round(json.loads(m.payload)["ts"] - now, 2) for now, m in sent}
        assert len(offsets) == 1
        skews |= offsets
    assert all(-5.0 <= s <= 5.0 for s in skews) and len(skews) > 20


REASONS = {
    "bad_json": "invalid JSON: (?!NaN)",
    "nan": "NaN is not a number",
    "wrong_type": "must be a number, bool or string",
    "oversize": "exceeds 65536",
    "not_utf8": "not UTF-8",
    "empty": "empty payload",
}


def test_malformed_messages_come_at_their_rate_in_every_kind_and_the_gateway_rejects_them() -> None:
    d = device(f"faults: {{malformed: {{rate: 5%, kinds: [{', '.join(REASONS)}]}}}}")
    sent = telemetry(run(d, 200_000))  # 20,000 readings
    malformed = [m for _, m in sent if m.kind == "malformed"]
    assert len(malformed) / len(sent) == pytest.approx(0.05, rel=0.1)
    assert [m.seqs[0] for _, m in sent] == list(range(1, len(sent) + 1))  # a broken one uses up its seq
    kinds: Counter[str] = Counter()
    for message in malformed:
        with pytest.raises(PayloadError) as rejected:
            DECODER.decode("dev-1", message.payload, T0)
        [kind] = [kind for kind, reason in REASONS.items() if re.search(reason, rejected.value.reason)]
        kinds[kind] += 1
        if kind not in ("empty", "not_utf8"):
            assert seq_of(message.payload) == message.seqs[0]  # the checker can still tell which
    assert set(kinds) == set(REASONS) and min(kinds.values()) > len(malformed) / 6 * 0.7, kinds


def test_every_malformed_kind_is_rejected_for_the_reason_it_is_meant_to_be() -> None:
    for kind, reason in REASONS.items():
        d = device(f"faults: {{malformed: {{rate: 100%, kinds: [{kind}]}}}}")
        for _, message in run(d, 100):
            with pytest.raises(PayloadError, match=reason):
                DECODER.decode("dev-1", message.payload, T0)


def test_late_readings_arrive_later_with_their_old_ts_and_seq() -> None:
    d = device("faults: {late: {rate: 10%, by: 30s..60s}}")
    sent = telemetry(run(d, 100_000))
    late = [(now, m) for now, m in sent if m.kind == "late"]
    assert len(late) / len(sent) == pytest.approx(0.10, rel=0.15)
    for now, message in late:
        ts = json.loads(message.payload)["ts"]
        assert 30.0 - 10.0 <= now - ts <= 60.0  # held for 30-60 s, released at the next reading after
    seqs = [m.seqs[0] for _, m in sent]
    assert sorted(seqs) == list(range(1, len(seqs) + 1))  # each seq exactly once...
    assert seqs != sorted(seqs)  # ...but not in order


def test_out_of_order_readings_come_after_the_next_n() -> None:
    d = device("faults: {out_of_order: {rate: 5%, by: 2..2}}")
    sent = telemetry(run(d, 50_000))
    seqs = [m.seqs[0] for _, m in sent]
    shuffled = [m.seqs[0] for _, m in sent if m.kind == "out_of_order"]
    assert len(shuffled) / len(sent) == pytest.approx(0.05, rel=0.2)
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    alone = [seq for seq in shuffled if not {seq - 2, seq - 1, seq + 1, seq + 2} & set(shuffled)]
    assert len(alone) > len(shuffled) / 2
    for seq in alone:
        if seq + 2 < len(seqs):
            position = seqs.index(seq)
            assert seqs[position - 2 : position] == [seq + 1, seq + 2]


def test_a_scheduled_disconnect_buffers_and_replays_as_a_burst_with_the_original_seqs() -> None:
    d = device("faults: {disconnect: {schedule: [{at: 60s, for: 55s}], replay: burst}}")
    sent = run(d, 300)
    statuses = [(now - T0, decode_status("dev-1", m.payload)[0]) for now, m in sent if m.channel == "status"]
    assert [s for _, s in statuses] == ["offline", "online"]
    went, back = statuses[0][0], statuses[1][0]
    assert 60 <= went < 70 and 115 <= back < 125
    burst = [m for _, m in sent if m.kind == "burst"]
    assert 5 <= len(burst) <= 6  # readings taken while away
    seqs = [m.seqs[0] for _, m in telemetry(sent)]
    assert seqs == list(range(1, len(seqs) + 1))  # the burst comes back in order, before newer readings
    kinds = [m.kind for _, m in sent]
    assert kinds.index("online") == kinds.index("burst") - 1
    assert d.disconnects == 1 and d.dropped == 0


def test_batch_replay_sends_arrays_the_gateway_decodes() -> None:
    d = device("faults: {disconnect: {schedule: [{at: 1m, for: 10m}], buffer: 1000, replay: batch}}")
    sent = telemetry(run(d, 1200))
    [batch] = [m for _, m in sent if m.kind == "batch"]
    events = DECODER.decode("dev-1", batch.payload, T0 + 1200)
    assert [e.seq for e in events] == list(batch.seqs) and len(events) == 60
    assert [s for _, m in sent for s in m.seqs] == list(range(1, d.seq + 1))


def test_a_full_buffer_drops_the_oldest_and_counts_them() -> None:
    d = device("faults: {disconnect: {schedule: [{at: 1m, for: 10m}], buffer: 20}}")
    sent = telemetry(run(d, 1200))
    seqs = [s for _, m in sent for s in m.seqs]
    missing = sorted(set(range(1, d.seq + 1)) - set(seqs))
    assert d.dropped == len(missing) == 40  # 60 readings offline, 20 kept: the newest
    assert missing == list(range(missing[0], missing[0] + 40))


def test_replay_drop_loses_what_was_read_offline() -> None:
    d = device("faults: {disconnect: {schedule: [{at: 1m, for: 1m}], replay: drop}}")
    sent = telemetry(run(d, 300))
    assert d.dropped == 6 and len(sent) == d.seq - 6


def test_random_disconnects_happen_at_their_probability() -> None:
    d = device("faults: {disconnect: {probability: 1%, for: 20s}}")
    run(d, 300_000)  # 30,000 readings, roughly 3 spent offline per disconnect
    assert d.disconnects == pytest.approx(30_000 / (100 + 3), rel=0.15)


def test_every_disconnect_repeat_and_commands_while_offline_are_answered_on_reconnect() -> None:
    d = device(
        """\
        commands:
          open: {effects: {door: {set: true}}}
        faults: {disconnect: {schedule: [{at: 60s, every: 10m, for: 30s}]}}
        """
    )
    run(d, 75)
    assert not d.online
    assert d.handle(Command("c1", "dev-1", "open", {}, T0 + 76), T0 + 76) == []  # held, like a broker
    sent = run(d, 200)
    acks = [m for _, m in sent if m.channel == "ack"]
    assert [CommandAck.decode("dev-1", m.payload).status for m in acks] == ["ok"]
    assert json.loads(telemetry(sent)[-1][1].payload)["door"] is True
    run(d, 1300)
    assert d.disconnects == 3  # at 1m, 11m and 21m


QUICK = quick_fleet(1, 1.0, "gh").groups[0].spec


def quick_device() -> SimulatedDevice:
    return SimulatedDevice("gh-0001", QUICK, seed=1, start=T0)


def fan(on: object, command_id: str = "c1", **extra: Any) -> Command:
    return Command(command_id, "gh-0001", "fan", {"on": on}, T0, **extra)


def readings(d: SimulatedDevice, seconds: float) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for _, m in telemetry(run(d, seconds))]


def test_the_quick_form_heats_up_and_the_fan_cools_it_down() -> None:
    d = quick_device()
    first = readings(d, 30)
    assert 22.0 <= first[0]["temperature"] <= 28.5 and first[-1]["temperature"] > 33.0
    [ack] = d.handle(fan(True), T0 + 30)
    assert (ack.channel, CommandAck.decode("gh-0001", ack.payload).status) == ("ack", "ok")
    cooled = readings(d, 90)
    assert cooled[-1]["fan"] is True and cooled[-1]["temperature"] < 21.0
    d.handle(fan(False, "c2"), T0 + 90)
    warmed = readings(d, 150)
    assert warmed[-1]["fan"] is False and warmed[-1]["temperature"] > 35.0


def test_unknown_commands_and_params_that_match_no_behaviour_are_acked_error() -> None:
    d = quick_device()
    [unknown] = d.handle(Command("c1", "gh-0001", "self_destruct", {}, T0), T0)
    ack = CommandAck.decode("gh-0001", unknown.payload)
    assert ack.status == "error" and "'self_destruct'" in ack.detail and "'fan'" in ack.detail
    [bad] = d.handle(fan("yes", "c2"), T0)
    ack = CommandAck.decode("gh-0001", bad.payload)
    assert ack.status == "error" and "{on: true} or {on: false}" in ack.detail and bad.kind == "ack_error"
    [one] = d.handle(fan(1, "c3"), T0)  # 1 is not true
    assert CommandAck.decode("gh-0001", one.payload).status == "error"


def test_a_repeated_command_id_gets_the_same_ack_and_is_not_run_twice() -> None:
    d = device(
        """\
        commands:
          bump: {effects: {temperature: {rate: 1, for: 10s}}}
        """
    )
    run(d, 20)
    [first] = d.handle(Command("same", "dev-1", "bump", {}, T0 + 20), T0 + 20)
    [again] = d.handle(Command("same", "dev-1", "bump", {}, T0 + 25), T0 + 25)
    assert (first.kind, again.kind) == ("ack", "ack_repeat") and first.payload == again.payload
    once = device(
        """\
        commands:
          bump: {effects: {temperature: {rate: 1, for: 10s}}}
        """
    )
    run(once, 20)
    once.handle(Command("same", "dev-1", "bump", {}, T0 + 20), T0 + 20)
    assert [m.payload for _, m in run(d, 100)] == [m.payload for _, m in run(once, 100)]


def test_an_expired_command_is_acked_error_expired_and_not_run() -> None:
    d = quick_device()
    [late] = d.handle(fan(True, expires=T0 + 5), T0 + 6)
    ack = CommandAck.decode("gh-0001", late.payload)
    assert (ack.status, ack.detail, late.kind) == ("error", "expired", "ack_expired")
    assert all(r["fan"] is False for r in readings(d, 30))
    [in_time] = d.handle(fan(True, "c2", expires=T0 + 100), T0 + 31)
    assert CommandAck.decode("gh-0001", in_time.payload).status == "ok"


def test_command_faults_error_and_ignore_at_their_rates() -> None:
    d = device(
        """\
        commands:
          ping: {effects: {}}
        faults: {commands: {error: 10%, ignore: 5%}}
        """
    )
    outcomes: Counter[str] = Counter()
    for i in range(4000):
        answer = d.handle(Command(f"c{i}", "dev-1", "ping", {}, T0), T0)
        outcomes["ignored" if not answer else CommandAck.decode("dev-1", answer[0].payload).status] += 1
    assert outcomes["ignored"] / 4000 == pytest.approx(0.05, rel=0.2) and d.ignored == outcomes["ignored"]
    assert outcomes["error"] / 4000 == pytest.approx(0.10, rel=0.15)


def test_commands_draw_from_their_own_rng_so_telemetry_stays_the_same() -> None:
    extra = """\
        commands:
          ping: {effects: {}}
        faults: {commands: {error: 50%}, malformed: {rate: 10%}}
        """
    plain, busy = device(extra), device(extra)
    sent_plain = run(plain, 300)
    sent_busy = []
    while busy.next_due <= T0 + 300:
        busy.handle(Command(f"c{busy.seq}", "dev-1", "ping", {}, busy.next_due - 1), busy.next_due - 1)
        sent_busy += [(busy.next_due, m) for m in busy.step(busy.next_due)]
    assert [m.payload for _, m in sent_plain] == [m.payload for _, m in sent_busy]


def test_birth_and_goodbye_are_status_messages_the_gateway_reads() -> None:
    d = device("clock_skew: 3s")
    assert decode_status("dev-1", d.birth(T0).payload) == ("online", T0 + 3)
    goodbye = d.goodbye(T0 + 10)
    assert goodbye.retain and decode_status("dev-1", goodbye.payload) == ("offline", T0 + 13)
