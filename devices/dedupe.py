"""Per-device sequence numbers: recognise redeliveries, and find the seqs that never arrived.

Devices number their telemetry (`seq`, +1 per message). For each device the tracker keeps the
highest seq `H`, a bitmask of which of the `window` seqs at and below `H` were seen, and `base`,
the first seq of the device's current numbering. `observe(device, seq)` classifies each seq:

| seq                                         | verdict                                                  |
|---------------------------------------------|----------------------------------------------------------|
| the first from the device                   | new; the numbering starts here (earlier seqs: not a gap) |
| `H + 1`                                     | new                                                      |
| above `H + 1`                               | new; `H + 1 .. seq - 1` is a gap (reported missing)      |
| below `H`, within the window, seen          | duplicate (a redelivery): store again, do not evaluate   |
| below `H`, within the window, unseen        | new; `late` if above `base`: reported missing, it came   |
|                                             | out of order after all                                   |
| `window` or more below `H`                  | new; the device restarted its numbering (a reboot): no   |
|                                             | gap, the numbering starts again here                     |

A device that reboots and counts from 0 or 1 again is therefore never a gap: within `window` of
its old highest its seqs look like redeliveries (stored, not evaluated again) until they pass it;
further behind, the restart is recognised at once. A gap shows when the next seq after it arrives,
not before: seqs lost at the very end of a device's life are not reported.

After a crash the state comes from the last periodic checkpoint, older than what the crashed run
handled: seqs it received, stored and acknowledged after that checkpoint are never delivered again
and would look missing. `distrust()` marks every device so restored: its first jump above `H` is
returned as an unverified gap (`SeqGap.verified` False) and the seqs it spans are marked seen.
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW = 1024  # seqs remembered per device behind the highest one: ~128 bytes of bitmask each


@dataclass(frozen=True, slots=True)
class SeqGap:
    """Seqs `first..last` (inclusive) of a device that were skipped.

    `verified` is False when the gap is only the distance to a checkpoint that may be stale (see
    the module docstring): the seqs may have been stored by an earlier run.
    """

    device_id: str
    first: int
    last: int
    verified: bool = True

    @property
    def missing(self) -> int:
        """Return how many seqs the gap spans."""
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class Seen:
    """What one `observe` found: whether the seq is new, and the gap or late arrival it reveals."""

    new: bool
    gap: SeqGap | None = None
    late: bool = False  # this seq had been reported missing and arrived after all


NEW = Seen(True)
DUPLICATE = Seen(False)
_LATE = Seen(True, late=True)


class SeqTracker:
    """Remember which sequence numbers each device sent recently; report duplicates and gaps."""

    __slots__ = ("_distrusted", "_seen", "_window")

    def __init__(self, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self._window = window
        # device -> (highest seq, bitmask of seen seqs: bit i set = highest - i seen, first seq of
        # the current numbering)
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._distrusted: set[str] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, device_id: str, seq: int) -> bool:
        """Record `seq` for the device; return False when it was already seen (a redelivery)."""
        return self.observe(device_id, seq).new

    def observe(self, device_id: str, seq: int) -> Seen:
        """Record `seq` for the device and classify it (see the module docstring)."""
        state = self._seen.get(device_id)
        if state is None:
            self._seen[device_id] = (seq, 1, seq)
            return NEW
        highest, mask, base = state
        window = self._window
        if seq > highest:
            shift = seq - highest
            full = (1 << window) - 1
            gap: SeqGap | None = None
            if device_id in self._distrusted:
                self._distrusted.discard(device_id)
                if shift > 1:
                    # The skipped seqs may have been handled by the run that crashed: mark them
                    # seen, so a late one is not evaluated twice, and do not count them as lost.
                    gap = SeqGap(device_id, highest + 1, seq - 1, verified=False)
                    skipped = (1 << min(shift, window)) - 2  # bits 1 .. shift-1
                    mask = (((mask << shift) & full) | skipped | 1) & full if shift < window else full
                    self._seen[device_id] = (seq, mask, base)
                    return Seen(True, gap)
            elif shift > 1:
                gap = SeqGap(device_id, highest + 1, seq - 1)
            mask = ((mask << shift) | 1) & full if shift < window else 1
            self._seen[device_id] = (seq, mask, base)
            return NEW if gap is None else Seen(True, gap)
        behind = highest - seq
        if behind >= window:
            self._distrusted.discard(device_id)
            self._seen[device_id] = (seq, 1, seq)  # the device restarted its numbering
            return NEW
        bit = 1 << behind
        if mask & bit:
            return DUPLICATE
        self._seen[device_id] = (highest, mask | bit, base)
        return _LATE if seq > base else NEW

    def distrust(self) -> None:
        """Treat each known device's next jump as unverified: the state may predate what was stored."""
        self._distrusted = set(self._seen)

    def export_state(self) -> dict[str, list[int | str]]:
        """Return what is remembered as plain JSON-able data: device -> [highest, mask as hex, base]."""
        return {
            device_id: [highest, format(mask, "x"), base]
            for device_id, (highest, mask, base) in self._seen.items()
        }

    def restore_state(self, data: object) -> None:
        """Replace what is remembered with what `export_state` returned.

        Entries of two items ([highest, mask], from before `base` was kept) are accepted; their
        numbering is taken to start at the lowest seq the mask holds.

        Raises:
            ValueError: the data is not such a state; nothing is changed then.
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected an object of devices, got {type(data).__name__}")
        seen: dict[str, tuple[int, int, int]] = {}
        limit = 1 << self._window
        for device_id, entry in data.items():
            expected = f"device {device_id!r}: expected [seq, hex mask, base seq], got {entry!r}"
            if not isinstance(device_id, str) or not isinstance(entry, list) or len(entry) not in (2, 3):
                raise ValueError(expected)
            highest, mask_hex = entry[0], entry[1]
            try:
                mask = int(mask_hex, 16)
            except (TypeError, ValueError) as exc:
                raise ValueError(expected) from exc
            if type(highest) is not int or not 0 < mask < limit or not mask & 1:
                raise ValueError(expected)
            base = entry[2] if len(entry) == 3 else highest - mask.bit_length() + 1
            if type(base) is not int or base > highest:
                raise ValueError(expected)
            seen[device_id] = (highest, mask, base)
        self._seen = seen
        self._distrusted = set()

    def forget(self, device_id: str) -> None:
        """Drop what is known of one device."""
        self._seen.pop(device_id, None)
        self._distrusted.discard(device_id)
