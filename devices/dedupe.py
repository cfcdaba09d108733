"""Recognise redelivered messages by (device, seq), so rules and commands fire once per message."""

from __future__ import annotations

WINDOW = 1024  # seqs remembered per device behind the highest one: ~128 bytes of bitmask each


class SeqTracker:
    """Remember which sequence numbers each device has sent recently.

    A seq at most `window` behind the device's highest is a duplicate if seen before. A seq further
    behind means the device restarted and counts from 1 again: it is new and restarts the window.
    """

    __slots__ = ("_seen", "_window")

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        # device -> (highest seq, bitmask of seen seqs: bit i set = highest - i seen)
        self._seen: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, device_id: str, seq: int) -> bool:
        """Record `seq` for the device; return False when it was already seen (a redelivery)."""
        state = self._seen.get(device_id)
        if state is None:
            self._seen[device_id] = (seq, 1)
            return True
        highest, mask = state
        if seq > highest:
            shift = seq - highest
            mask = ((mask << shift) | 1) & ((1 << self._window) - 1) if shift < self._window else 1
            self._seen[device_id] = (seq, mask)
            return True
        behind = highest - seq
        if behind >= self._window:
            self._seen[device_id] = (seq, 1)  # the device restarted its numbering
            return True
        bit = 1 << behind
        if mask & bit:
            return False
        self._seen[device_id] = (highest, mask | bit)
        return True

    def forget(self, device_id: str) -> None:
        """Drop what is known of one device."""
        self._seen.pop(device_id, None)
