"""MQTT topic schemes with a `{device_id}` placeholder, e.g. `devices/{device_id}/telemetry`."""

from __future__ import annotations

import re

DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN + r"\Z")
PLACEHOLDER = "{device_id}"


def is_valid_device_id(device_id: str) -> bool:
    """Tell whether a device id is on the allow-list (safe in topics, tags and file names)."""
    return _DEVICE_ID_RE.match(device_id) is not None


class TopicScheme:
    """A topic template with exactly one whole `{device_id}` segment."""

    __slots__ = ("_index", "_segments", "template")

    def __init__(self, template: str) -> None:
        segments = template.split("/")
        if segments.count(PLACEHOLDER) != 1 or template.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"topic template {template!r} must contain exactly one whole segment '{PLACEHOLDER}'"
            )
        if any(c in template for c in "+#"):
            raise ValueError(f"topic template {template!r} must not contain MQTT wildcards")
        self.template = template
        self._segments = segments
        self._index = segments.index(PLACEHOLDER)

    def __repr__(self) -> str:
        return f"TopicScheme({self.template!r})"

    @property
    def subscription(self) -> str:
        """The MQTT filter that matches every device: the placeholder becomes `+`."""
        return self.template.replace(PLACEHOLDER, "+")

    def format(self, device_id: str) -> str:
        """Build the topic of one device."""
        return self.template.replace(PLACEHOLDER, device_id)

    def device_id(self, topic: str) -> str | None:
        """Extract the device id from a topic, or None when the topic does not fit the scheme."""
        parts = topic.split("/")
        if len(parts) != len(self._segments):
            return None
        for i, (part, segment) in enumerate(zip(parts, self._segments, strict=True)):
            if i != self._index and part != segment:
                return None
        return parts[self._index]
