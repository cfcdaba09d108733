"""SeqTracker against a naive reference that remembers every (device, seq) in the window."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from devices.dedupe import SeqTracker


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


class Reference:
    def __init__(self, window: int) -> None:
        self.window = window
        self.highest: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}

    def first_time(self, device: str, seq: int) -> bool:
        if device not in self.highest or self.highest[device] - seq >= self.window:
            self.highest[device], self.seen[device] = seq, {seq}
            return True
        if seq in self.seen[device]:
            return False
        self.seen[device].add(seq)
        self.highest[device] = max(self.highest[device], seq)
        self.seen[device] = {s for s in self.seen[device] if self.highest[device] - s < self.window}
        return True


@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 40)), max_size=200))
def test_matches_reference(messages: list[tuple[str, int]]) -> None:
    tracker, reference = SeqTracker(window=16), Reference(16)
    for device, seq in messages:
        assert tracker.first_time(device, seq) == reference.first_time(device, seq), (device, seq)
