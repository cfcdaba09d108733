"""SeqTracker against a naive reference that remembers every (device, seq) in the window."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.dedupe import SeqGap, SeqTracker


def gaps(tracker: SeqTracker, device: str, seqs: list[int]) -> list[tuple[int, int]]:
    found = []
    for seq in seqs:
        gap = tracker.observe(device, seq).gap
        if gap is not None:
            found.append((gap.first, gap.last))
    return found


def test_in_order_then_redelivered() -> None:
    tracker = SeqTracker(window=8)
    assert [tracker.first_time("d", s) for s in (1, 2, 3)] == [True, True, True]
    assert [tracker.first_time("d", s) for s in (2, 3, 1)] == [False, False, False]
    assert tracker.first_time("e", 2) is True  # per device


def test_out_of_order_within_the_window() -> None:
    tracker = SeqTracker(window=8)
    assert tracker.first_time("d", 5)
    assert tracker.first_time("d", 3)
    assert not tracker.first_time("d", 3)
    assert tracker.first_time("d", 4)


def test_device_restart_counts_again() -> None:
    tracker = SeqTracker(window=8)
    for seq in range(1, 100):
        tracker.first_time("d", seq)
    assert tracker.first_time("d", 1) is True  # far behind: a restarted device, not a redelivery
    assert tracker.first_time("d", 2) is True
    assert tracker.first_time("d", 1) is False


def test_a_jump_is_a_gap_naming_the_device_and_the_missing_range() -> None:
    tracker = SeqTracker(window=8)
    assert tracker.observe("d", 1).gap is None  # the first seq starts the numbering, whatever it is
    assert tracker.observe("d", 2).gap is None
    seen = tracker.observe("d", 6)
    assert seen.new and seen.gap == SeqGap("d", 3, 5)
    assert seen.gap.missing == 3 and seen.gap.verified
    assert tracker.observe("d", 7).gap is None
    assert tracker.observe("e", 40).gap is None  # per device


def test_a_gap_larger_than_the_window_is_reported_whole() -> None:
    tracker = SeqTracker(window=8)
    tracker.observe("d", 1)
    assert tracker.observe("d", 1_001).gap == SeqGap("d", 2, 1_000)
    assert not tracker.observe("d", 1_001).new


def test_redeliveries_reveal_no_gap() -> None:
    tracker = SeqTracker(window=8)
    assert gaps(tracker, "d", [1, 2, 3, 4, 2, 3, 4, 5, 6]) == []


def test_a_late_arrival_fills_a_reported_gap() -> None:
    tracker = SeqTracker(window=8)
    assert gaps(tracker, "d", [1, 2, 5]) == [(3, 4)]
    seen = tracker.observe("d", 3)
    assert seen.new and seen.late and seen.gap is None
    assert not tracker.observe("d", 3).new  # and then it is a duplicate like any other
    assert tracker.observe("d", 4).late


def test_seqs_from_before_the_numbering_started_are_new_but_not_late() -> None:
    tracker = SeqTracker(window=8)
    tracker.observe("d", 5)  # the gateway started while the device was at 5
    seen = tracker.observe("d", 4)
    assert seen.new and not seen.late


@pytest.mark.parametrize("restart_at", [0, 1])
def test_a_device_rebooting_to_0_or_1_is_not_a_gap(restart_at: int) -> None:
    tracker = SeqTracker(window=8)
    # far behind its old highest: recognised as a restart at once
    assert gaps(tracker, "d", [*range(1, 50), restart_at, restart_at + 1, restart_at + 2]) == []
    assert tracker.observe("d", restart_at + 3).new
    # within the window: taken for redeliveries until the new numbering passes the old highest
    near = SeqTracker(window=8)
    assert gaps(near, "d", [1, 2, 3, 4, restart_at, 1, 2, 3, 4, 5]) == []
    assert near.observe("d", 6).new


def test_a_distrusted_state_reports_its_first_jump_as_unverified_and_marks_it_seen() -> None:
    tracker = SeqTracker(window=16)
    for seq in (1, 2, 3):
        tracker.observe("d", seq)
        tracker.observe("e", seq)
    tracker.distrust()
    assert not tracker.observe("d", 3).new  # redeliveries stay duplicates
    seen = tracker.observe("d", 8)
    assert seen.new and seen.gap == SeqGap("d", 4, 7, verified=False)
    assert not tracker.observe("d", 5).new  # the crashed run may have evaluated it
    assert tracker.observe("d", 11).gap == SeqGap("d", 9, 10)  # later jumps are real gaps
    assert tracker.observe("e", 4).gap is None  # no jump: nothing to distrust any more
    assert tracker.observe("e", 6).gap == SeqGap("e", 5, 5)


def test_a_distrusted_jump_beyond_the_window_marks_the_whole_window_seen() -> None:
    tracker = SeqTracker(window=8)
    tracker.observe("d", 1)
    tracker.distrust()
    assert tracker.observe("d", 100).gap == SeqGap("d", 2, 99, verified=False)
    assert all(not tracker.observe("d", seq).new for seq in range(93, 101))


def test_state_round_trips_with_the_start_of_the_numbering() -> None:
    tracker = SeqTracker(window=8)
    for seq in (10, 11, 14):
        tracker.observe("d", seq)
    copy = SeqTracker(window=8)
    copy.restore_state(json.loads(json.dumps(tracker.export_state())))
    assert copy.observe("d", 12).late
    assert not copy.observe("d", 9).late  # before the numbering started
    assert not copy.observe("d", 14).new
    assert copy.observe("d", 17).gap == SeqGap("d", 15, 16)


def test_state_of_the_two_item_format_is_accepted() -> None:
    tracker = SeqTracker(window=8)
    tracker.restore_state({"d": [10, "d"]})  # 10, 8 and 7 seen (0b1101)
    assert [tracker.observe("d", seq).late for seq in (9, 6)] == [True, False]
    assert not tracker.observe("d", 8).new


@pytest.mark.parametrize(
    "bad",
    [{"d": [5, "0"]}, {"d": [5, "2"]}, {"d": [5, "1", 6]}, {"d": [5, "1", "x"]}, {"d": [5, "1", 1, 2]}],
)
def test_impossible_states_are_refused(bad: object) -> None:
    tracker = SeqTracker(window=8)
    tracker.observe("d", 1)
    with pytest.raises(ValueError, match="device 'd'"):
        tracker.restore_state(bad)
    assert not tracker.observe("d", 1).new  # nothing was changed


class Reference:
    """Every seq of the current numbering within the window, in a set."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.highest: dict[str, int] = {}
        self.base: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}

    def observe(self, device: str, seq: int) -> tuple[bool, tuple[int, int] | None, bool]:
        if device not in self.highest or self.highest[device] - seq >= self.window:
            self.highest[device], self.base[device], self.seen[device] = seq, seq, {seq}
            return True, None, False
        highest = self.highest[device]
        if seq in self.seen[device]:
            return False, None, False
        self.seen[device].add(seq)
        if seq < highest:
            return True, None, seq > self.base[device]
        self.highest[device] = seq
        self.seen[device] = {s for s in self.seen[device] if seq - s < self.window}
        return True, ((highest + 1, seq - 1) if seq > highest + 1 else None), False


@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 40)), max_size=200))
def test_matches_reference(messages: list[tuple[str, int]]) -> None:
    tracker, reference = SeqTracker(window=16), Reference(16)
    for device, seq in messages:
        seen = tracker.observe(device, seq)
        gap = (seen.gap.first, seen.gap.last) if seen.gap is not None else None
        assert (seen.new, gap, seen.late) == reference.observe(device, seq), (device, seq)


@given(st.lists(st.integers(-3, 6), min_size=1, max_size=300))
def test_reported_missing_minus_late_is_what_never_arrived(steps: list[int]) -> None:
    # A device counting up with skips, reorderings and repeats, never far enough back to look like
    # a restart: what the gaps reported, less what came late, is exactly what is still missing.
    tracker = SeqTracker(window=64)
    seq, sent = 1_000, []
    for step in steps:
        seq = max(seq + step, 1_000)
        sent.append(seq)
    if max(sent) - min(sent) >= 64:
        return
    missing = late = 0
    for s in sent:
        seen = tracker.observe("d", s)
        missing += seen.gap.missing if seen.gap is not None else 0
        late += seen.late
    first = sent[0]
    arrived = {s for s in sent if s >= first}
    assert missing - late == (max(sent) - first + 1) - len(arrived)
