"""Pytest fixtures that run a real mosquitto on a free loopback port (loaded from tests/conftest.py).

`mosquitto` is shared by the whole session: tests must not stop, pause or kill it. Tests that do
(broker failure, restart on the same port and data) take `mosquitto_fresh`, their own broker.
Both skip, saying why, only when mosquitto is not installed; CI installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.broker import MosquittoBroker, find_mosquitto

MISSING = "mosquitto is not installed (apt-get install mosquitto); CI installs it, so these tests run there"


def _executable() -> str:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip(MISSING)
    return executable


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """Yield a mosquitto shared by the session (`.host`, `.port`, `.url`); do not stop or signal it."""
    broker = MosquittoBroker(executable=_executable(), data_dir=tmp_path_factory.mktemp("mosquitto"))
    with broker:
        yield broker


@pytest.fixture
def mosquitto_fresh(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """Yield a mosquitto of this test's own, free to pause, kill and restart on the same port and data."""
    broker = MosquittoBroker(executable=_executable(), data_dir=tmp_path / "mosquitto")
    with broker:
        yield broker
