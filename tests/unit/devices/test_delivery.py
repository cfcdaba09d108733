"""The pure command scheduler: lifecycle, retries, timeouts, expiry, offline hold, rate limit, bounds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.command import Command, CommandAck
from devices.delivery import CommandScheduler, DeliveryPolicy, OfflinePolicy, Step, TokenBucket

T0 = 1_000.0


def command(n: int = 1, device: str = "gh-1", ttl: float = 60.0, at: float = T0) -> Command:
    return Command(f"c{n}", device, "fan", {"on": True}, at, at + ttl)


def published(step: Step) -> list[tuple[str, int]]:
    return [(p.tracked.command.id, p.attempt) for p in step.publish]


def moved(step: Step) -> list[tuple[str, str]]:
    return [(t.tracked.command.id, t.status) for t in step.transitions]


def offline(*devices: str) -> Callable[[str], bool]:
    return lambda device_id: device_id in devices


# -- the token bucket --------------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=T0)
    assert [bucket.take(T0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(T0 + 0.4)  # 0.8 of a token
    assert bucket.take(T0 + 0.5)  # one token after 0.5 s at 2/s
    assert not bucket.take(T0 + 0.5)
    assert bucket.is_full(T0 + 100.0)


@given(st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=200))
def test_token_bucket_never_grants_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    rate, burst = 1.5, 4
    bucket = TokenBucket(rate, burst, T0)
    now, granted = T0, 0
    for gap in gaps:
        now += gap
        granted += bucket.take(now)
        assert granted <= burst + rate * (now - T0) + 1e-9


# -- straight through ---------------------------------------------------------------------------------


def test_a_command_is_sent_at_once_and_acked() -> None:
    scheduler = CommandScheduler(DeliveryPolicy())
    step = scheduler.submit(command(), T0)
    assert published(step) == [("c1", 1)] and step.transitions == []
    assert step.publish[0].expiry_interval == 60
    match, done = scheduler.ack(CommandAck("c1", "gh-1", "ok", "fan on"), T0 + 0.2)
    assert match == "matched"
    [transition] = done.transitions
    assert (transition.status, transition.detail) == ("ok", "fan on")
    assert transition.latency_ms == pytest.approx(200.0)
    assert scheduler.pending == 0
    tracked = scheduler.get("c1")
    assert tracked is not None and tracked.state == "ok"


def test_an_error_ack_keeps_the_device_detail_and_a_second_ack_is_a_duplicate() -> None:
    scheduler = CommandScheduler(DeliveryPolicy())
    scheduler.submit(command(), T0)
    match, step = scheduler.ack(CommandAck("c1", "gh-1", "error", "fan jammed"), T0 + 1)
    assert match == "matched" and moved(step) == [("c1", "error")]
    assert step.transitions[0].detail == "fan jammed"
    assert scheduler.ack(CommandAck("c1", "gh-1", "ok"), T0 + 2) == ("duplicate", Step())


def test_acks_from_another_device_or_for_unknown_ids_match_nothing() -> None:
    scheduler = CommandScheduler(DeliveryPolicy())
    scheduler.submit(command(), T0)
    assert scheduler.ack(CommandAck("c1", "gh-2", "ok"), T0)[0] == "unknown"
    assert scheduler.ack(CommandAck("nope", "gh-1", "ok"), T0)[0] == "unknown"
    assert scheduler.pending == 1


# -- retries and timeouts -----------------------------------------------------------------------------


def test_retries_republish_the_same_id_then_time_out() -> None:
    policy = DeliveryPolicy(ack_timeout=30.0, retry_interval=10.0, max_attempts=3)
    scheduler = CommandScheduler(policy)
    scheduler.submit(command(ttl=300), T0)
    assert published(scheduler.advance(T0 + 9.9)) == []
    step = scheduler.advance(T0 + 10.0)
    assert published(step) == [("c1", 2)] and step.publish[0].expiry_interval == 290
    assert published(scheduler.advance(T0 + 15.0)) == []
    assert published(scheduler.advance(T0 + 20.0)) == [("c1", 3)]
    assert published(scheduler.advance(T0 + 29.0)) == []  # max_attempts reached
    step = scheduler.advance(T0 + 30.0)
    assert moved(step) == [("c1", "timed_out")]
    assert "3 attempt(s)" in step.transitions[0].detail
    # a late ack is told apart from an unknown one, and changes nothing
    assert scheduler.ack(CommandAck("c1", "gh-1", "ok"), T0 + 31)[0] == "late"


def test_an_ack_after_a_retry_ends_the_retries() -> None:
    scheduler = CommandScheduler(DeliveryPolicy(retry_interval=5.0))
    scheduler.submit(command(ttl=300), T0)
    assert published(scheduler.advance(T0 + 5)) == [("c1", 2)]
    _, step = scheduler.ack(CommandAck("c1", "gh-1", "ok"), T0 + 6)
    assert moved(step) == [("c1", "ok")]
    assert step.transitions[0].latency_ms == pytest.approx(6_000.0)  # from the first publish
    assert scheduler.advance(T0 + 100) == Step()


def test_no_retry_while_disconnected_or_once_the_command_has_expired() -> None:
    scheduler = CommandScheduler(DeliveryPolicy(retry_interval=5.0, ack_timeout=100.0, max_attempts=5))
    scheduler.submit(command(ttl=12), T0)
    assert published(scheduler.advance(T0 + 5, connected=False)) == []
    assert published(scheduler.advance(T0 + 6)) == [("c1", 2)]
    assert published(scheduler.advance(T0 + 12)) == []  # expired: a device would refuse it anyway
    assert moved(scheduler.advance(T0 + 100)) == [("c1", "timed_out")]


def test_a_failed_first_publish_is_rejected_and_a_failed_retry_is_tried_again() -> None:
    scheduler = CommandScheduler(DeliveryPolicy(retry_interval=5.0))
    step = scheduler.submit(command(1), T0)
    assert moved(scheduler.publish_failed(step.publish[0], T0, "queue full")) == [("c1", "rejected")]
    assert scheduler.pending == 0
    scheduler.submit(command(2), T0)
    retry = scheduler.advance(T0 + 5).publish[0]
    assert scheduler.publish_failed(retry, T0 + 5, "queue full") == Step()
    assert published(scheduler.advance(T0 + 10)) == [("c2", 2)]


# -- waiting: offline devices, disconnection, rate limit ---------------------------------------------


def test_hold_keeps_commands_for_an_offline_device_until_it_is_back() -> None:
    scheduler = CommandScheduler(DeliveryPolicy(offline="hold"))
    step = scheduler.submit(command(1), T0, is_offline=offline("gh-1"))
    assert moved(step) == [("c1", "queued")] and step.transitions[0].detail == "device is offline"
    step = scheduler.submit(command(2), T0 + 1, is_offline=offline("gh-1"))
    assert "behind 1 earlier" in step.transitions[0].detail
    assert scheduler.advance(T0 + 5, is_offline=offline("gh-1")) == Step()
    # back online: both go out, in order, once
    assert published(scheduler.advance(T0 + 6)) == [("c1", 1), ("c2", 1)]
    assert published(scheduler.advance(T0 + 6.5)) == []
    assert scheduler.queued == 0 and scheduler.pending == 2


def test_held_commands_expire_after_their_ttl_and_are_never_sent() -> None:
    scheduler = CommandScheduler(DeliveryPolicy(offline="hold"))
    scheduler.submit(command(1, ttl=10), T0, is_offline=offline("gh-1"))
    scheduler.submit(command(2, ttl=30), T0, is_offline=offline("gh-1"))
    step = scheduler.advance(T0 + 10, is_offline=offline("gh-1"))
    assert moved(step) == [("c1", "expired")] and "device is offline" in step.transitions[0].detail
    assert published(scheduler.advance(T0 + 11)) == [("c2", 1)]
    assert moved(scheduler.advance(T0 + 41)) == [("c2", "timed_out")]  # sent, so never `expired`


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("hold", "queued"), ("reject", "rejected"), ("send", None)],
)
def test_offline_policies(policy: OfflinePolicy, expected: str | None) -> None:
    scheduler = CommandScheduler(DeliveryPolicy(offline=policy))
    step = scheduler.submit(command(), T0, is_offline=offline("gh-1"))
    if expected is None:
        assert published(step) == [("c1", 1)]
    else:
        assert moved(step) == [("c1", expected)]


def test_send_policy_retries_an_offline_device_but_hold_waits_for_it() -> None:
    cases: list[tuple[OfflinePolicy, bool]] = [("send", True), ("hold", False)]
    for policy, retried in cases:
        scheduler = CommandScheduler(DeliveryPolicy(offline=policy, retry_interval=5.0))
        scheduler.submit(command(), T0)
        assert bool(scheduler.advance(T0 + 5, is_offline=offline("gh-1")).publish) is retried
    # hold: the retry that came due while it was away goes out as soon as it is back
    assert published(scheduler.advance(T0 + 6)) == [("c1", 2)]


def test_commands_wait_while_disconnected_and_go_out_on_reconnect() -> None:
    scheduler = CommandScheduler(DeliveryPolicy())
    step = scheduler.submit(command(1), T0, connected=False)
    assert moved(step) == [("c1", "queued")] and step.transitions[0].detail == "not connected to the broker"
    assert scheduler.advance(T0 + 1, connected=False) == Step()
    assert published(scheduler.advance(T0 + 2, connected=True)) == [("c1", 1)]


def test_rate_limit_queues_the_excess_and_releases_it_at_the_rate() -> None:
    scheduler = CommandScheduler(DeliveryPolicy(rate=1.0, burst=2))
    steps = [scheduler.submit(command(n), T0) for n in range(1, 5)]
    assert [bool(s.publish) for s in steps] == [True, True, False, False]
    assert "rate limit" in steps[2].transitions[0].detail
    assert published(scheduler.advance(T0 + 0.5)) == []
    assert published(scheduler.advance(T0 + 1.0)) == [("c3", 1)]
    assert published(scheduler.advance(T0 + 2.0)) == [("c4", 1)]
    # another device has its own bucket
    assert published(scheduler.submit(command(9, device="gh-2"), T0 + 2.0)) == [("c9", 1)]


def test_bounds_reject_rather_than_grow() -> None:
    scheduler = CommandScheduler(DeliveryPolicy(max_queued_per_device=2, max_pending=4))
    down = offline("gh-1")
    assert [moved(scheduler.submit(command(n), T0, is_offline=down))[0][1] for n in (1, 2, 3)] == [
        "queued",
        "queued",
        "rejected",
    ]
    rejected = scheduler.get("c3")
    assert rejected is not None and "max_queued_per_device" in rejected.detail
    scheduler.submit(command(4, device="gh-2"), T0)
    scheduler.submit(command(5, device="gh-3"), T0)
    step = scheduler.submit(command(6, device="gh-4"), T0)
    assert moved(step) == [("c6", "rejected")] and "max_pending" in step.transitions[0].detail
    assert scheduler.pending == 4


def test_listing_covers_pending_and_finished_commands_oldest_first() -> None:
    scheduler = CommandScheduler(DeliveryPolicy())
    scheduler.submit(command(1, at=T0), T0)
    scheduler.reject(command(2, at=T0 + 1), T0 + 1, "not on the allow-list")
    scheduler.submit(command(3, at=T0 + 2), T0 + 2, is_offline=offline("gh-1"))
    views = [t.view() for t in scheduler.commands()]
    assert [(v["id"], v["status"]) for v in views] == [("c1", "sent"), ("c2", "rejected"), ("c3", "queued")]
    assert views[1]["detail"] == "not on the allow-list"


def test_release_sends_what_waits_for_one_device_only() -> None:
    scheduler = CommandScheduler(DeliveryPolicy())
    down = offline("gh-1", "gh-2")
    scheduler.submit(command(1, device="gh-1"), T0, is_offline=down)
    scheduler.submit(command(2, device="gh-2"), T0, is_offline=down)
    assert published(scheduler.release("gh-1", T0 + 1, is_offline=offline("gh-2"))) == [("c1", 1)]
    assert scheduler.release("gh-3", T0 + 1) == Step()  # nothing waits for it
    assert scheduler.queued == 1


def test_abandon_ends_every_pending_command_on_record() -> None:
    scheduler = CommandScheduler(DeliveryPolicy())
    scheduler.submit(command(1), T0)
    scheduler.submit(command(2, device="gh-2"), T0, is_offline=offline("gh-2"))
    step = scheduler.abandon(T0 + 1)
    assert sorted(moved(step)) == [("c1", "timed_out"), ("c2", "expired")]
    assert all("gateway stopped" in t.detail for t in step.transitions)
    assert scheduler.pending == 0 and scheduler.advance(T0 + 100) == Step()
