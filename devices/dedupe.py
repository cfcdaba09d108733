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

    def export_state(self) -> dict[str, list[int | str]]:
        """Return what is remembered as plain JSON-able data: device -> [highest seq, mask as hex]."""
        return {device_id: [highest, format(mask, "x")] for device_id, (highest, mask) in self._seen.items()}

    def restore_state(self, data: object) -> None:
        """Replace what is remembered with what `export_state` returned.

        Raises:
            ValueError: the data is not such a state; nothing is changed then.
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected an object of devices, got {type(data).__name__}")
        seen: dict[str, tuple[int, int]] = {}
        limit = 1 << self._window
        for device_id, entry in data.items():
            try:
                highest, mask_hex = entry
                mask = int(mask_hex, 16)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"device {device_id!r}: expected [seq, hex mask], got {entry!r}") from exc
            if not isinstance(device_id, str) or type(highest) is not int or not 0 <= mask < limit:
                raise ValueError(f"device {device_id!r}: expected [seq, hex mask], got {entry!r}")
            seen[device_id] = (highest, mask)
        self._seen = seen

    def forget(self, device_id: str) -> None:
        """Drop what is known of one device."""
        self._seen.pop(device_id, None)
