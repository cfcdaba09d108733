"""Read the device registry file named by `devices.file` in the config."""

from __future__ import annotations

from pathlib import Path

from devices.errors import Problem, SourceFileError
from devices.registry import DeviceRegistry, parse_registry


def read_device_file(path: str | Path) -> DeviceRegistry:
    """Read and validate a device registry file.

    Raises:
        SourceFileError: the file cannot be read or has problems; all are listed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceFileError([Problem(str(path), None, None, "", f"cannot read: {exc.strerror}")]) from None
    return parse_registry(text, str(path))
