"""Shared test setup: server fixtures live in their own plugin modules."""

pytest_plugins = ["tests.integration.mqtt_servers", "tests.integration.influx_servers"]
