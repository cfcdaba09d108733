"""Errors raised by the pure device layer.

TidegateInputError            (bad input from a user or a device; carries where and what)
 ├── PayloadError             a telemetry or ack payload that cannot be accepted
 └── SourceFileError          a YAML file (config, rules) with one or more problems
"""

from __future__ import annotations

from dataclasses import dataclass


class TidegateInputError(Exception):
    """Base of every error caused by input rather than by a bug."""


class PayloadError(TidegateInputError):
    """A device payload was rejected; `reason` says why in a few words."""

    def __init__(self, reason: str, *, device_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.device_id = device_id


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a source file, located as precisely as we can."""

    file: str
    line: int | None
    column: int | None
    where: str  # dotted path inside the document, e.g. "rules[2].when", or "" for the whole file
    message: str

    def __str__(self) -> str:
        pos = self.file
        if self.line is not None:
            pos += f":{self.line}"
            if self.column is not None:
                pos += f":{self.column}"
        where = f" {self.where}:" if self.where else ""
        return f"{pos}:{where} {self.message}"


class SourceFileError(TidegateInputError):
    """A YAML source file has problems; all of them are listed, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
