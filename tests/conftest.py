"""Shared test setup: server fixtures live in their own plugin modules."""

import pytest

pytest_plugins = ["tests.integration.mqtt_servers", "tests.integration.influx_servers"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave `soak` tests out unless they are asked for with `-m soak`."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in soak test: run with -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
