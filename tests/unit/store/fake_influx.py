"""A small emulation of InfluxDB 1.x's HTTP API for httpx.MockTransport, as measured on influxd 1.6.

It keeps field types per measurement and answers like the real server: a field type conflict with
the stored type drops those points and answers 400 "partial write: field type conflict: ... dropped=N"
naming the first conflict; conflicting types for a new field within one batch refuse the whole
batch ("field type conflict", nothing stored); lines tagged bad=1 stand for unparseable lines
("unable to parse", the rest stored as a partial write with dropped=0); bodies over `max_body`
get 413.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.unit.store.reference import parse_line

TYPE_NAMES = {int: "integer", float: "float", bool: "boolean", str: "string"}


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": message})


class FakeInflux:
    """The server's state and its request handler."""

    def __init__(self, *, max_body: int | None = None, database: str = "db") -> None:
        self.max_body = max_body
        self.database = database
        self.types: dict[tuple[str, str], str] = {}
        self.stored: dict[tuple[str, tuple[tuple[str, str], ...], int], dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.queries: list[str] = []
        self.query_answers: list[dict[str, Any]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/query":
            form = dict(httpx.QueryParams(request.content.decode()))
            self.queries.append(form["q"])
            answer = self.query_answers.pop(0) if self.query_answers else {"results": [{"statement_id": 0}]}
            return httpx.Response(200, json=answer)
        assert request.url.path == "/write"
        if request.url.params["db"] != self.database:
            return _error(404, f'database not found: "{request.url.params["db"]}"')
        body = request.content
        if self.max_body is not None and len(body) > self.max_body:
            return _error(413, "Request Entity Too Large")
        return self._write(body.decode().split("\n"))

    def _write(self, lines: list[str]) -> httpx.Response:
        parsed = [(line, parse_line(line)) for line in lines]
        unparseable = [line for line, (_, tags, _, _) in parsed if tags.get("bad") == "1"]
        points = [point for _, point in parsed if point[1].get("bad") != "1"]
        in_batch: dict[tuple[str, str], str] = {}
        for measurement, _, fields, _ in points:
            for name, value in fields.items():
                key, kind = (measurement, name), TYPE_NAMES[type(value)]
                if key not in self.types and in_batch.setdefault(key, kind) != kind:
                    return _error(400, "field type conflict")
        first_conflict = None
        dropped = 0
        for measurement, tags, fields, ts in points:
            conflict = None
            for name, value in fields.items():
                kind = TYPE_NAMES[type(value)]
                existing = self.types.get((measurement, name), kind)
                if existing != kind:
                    conflict = (
                        f'input field "{name}" on measurement "{measurement}" is type {kind}, '
                        f"already exists as type {existing}"
                    )
                    break
            if conflict is not None:
                dropped += 1
                first_conflict = first_conflict or conflict
                continue
            for name, value in fields.items():
                self.types[(measurement, name)] = TYPE_NAMES[type(value)]
            self.stored.setdefault((measurement, tuple(sorted(tags.items())), ts), {}).update(fields)
        if unparseable and not points:
            return _error(400, "\n".join(f"unable to parse '{line}': invalid" for line in unparseable))
        if first_conflict is not None:
            return _error(400, f"partial write: field type conflict: {first_conflict} dropped={dropped}")
        if unparseable:
            reasons = "\n".join(f"unable to parse '{line}': invalid" for line in unparseable)
            return _error(400, f"partial write: {reasons} dropped=0")
        return httpx.Response(204)


def query_answer(*series: dict[str, Any]) -> dict[str, Any]:
    """Build a /query JSON answer holding `series`."""
    return {"results": [{"statement_id": 0, "series": list(series)}]}
