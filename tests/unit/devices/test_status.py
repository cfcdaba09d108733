"""Device status protocol and the tracker of status, last seen and message rate."""

from __future__ import annotations

import pytest

from devices.errors import PayloadError
from devices.status import DeviceTracker, decode_status, encode_status


def test_encode_decode_round_trip() -> None:
    assert decode_status("d", encode_status("online", 1_764_000_000.0)) == ("online", 1_764_000_000.0)
    assert decode_status("d", b'{"status": "offline"}') == ("offline", None)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"online", "not JSON", id="not-json"),
        pytest.param(b'{"status": "away"}', "must be 'online' or 'offline'", id="bad-status"),
        pytest.param(b'{"status": "online", "x": 1}', "status payload must be", id="extra-key"),
        pytest.param(b'["online"]', "status payload must be", id="not-object"),
        pytest.param(b'{"status": "online", "ts": true}', "ts must be", id="bad-ts"),
        pytest.param(b"{" + b" " * 2000 + b"}", "exceeds", id="too-big"),
    ],
)
def test_bad_status_payloads(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason) as raised:
        decode_status("d", payload)
    assert raised.value.device_id == "d"


def test_status_changes_are_reported_once() -> None:
    tracker = DeviceTracker()
    assert tracker.set_status("d", "online", 10.0)
    assert not tracker.set_status("d", "online", 11.0)  # a retained birth seen again
    assert tracker.set_status("d", "offline", 12.0)
    view = tracker.view("d", 12.0)
    assert (view.status, view.status_since, view.last_seen) == ("offline", 12.0, 12.0)


def test_unheard_device_is_unknown() -> None:
    tracker = DeviceTracker()
    view = tracker.view("ghost", 5.0)
    assert (view.status, view.last_seen, view.rate) == ("unknown", None, 0.0)
    tracker.seen("quiet", 5.0)
    assert tracker.view("quiet", 5.0).status == "unknown"
    assert tracker.device_ids() == ["quiet"]


def test_rate_is_averaged_over_the_last_minute() -> None:
    tracker = DeviceTracker()
    for i in range(120):  # 2 msg/s for 60 s
        tracker.seen("d", 1000.0 + i * 0.5)
    assert tracker.view("d", 1059.9).rate == pytest.approx(2.0)
    assert tracker.view("d", 1089.9).rate == pytest.approx(1.0)  # half the window has gone quiet
    assert tracker.view("d", 1200.0).rate == 0.0
    tracker.seen("d", 1200.0)  # slots of old seconds are reused, not added to
    assert tracker.view("d", 1200.0).rate == pytest.approx(1 / 60)
