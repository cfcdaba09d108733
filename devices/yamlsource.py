"""Load user-written YAML keeping line and column of every node, so errors can point at them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from devices.errors import Problem, SourceFileError

PathItem = str | int


class LocatedDocument:
    """A parsed YAML document plus the position of each mapping value and sequence item."""

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data: Any = yaml.safe_load(text) if root is not None else None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            column = mark.column + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            raise SourceFileError([Problem(file, line, column, "", f"invalid YAML: {problem}")]) from None
        self._root = root

    def position(self, path: Sequence[PathItem]) -> tuple[int | None, int | None]:
        """Return the 1-based (line, column) of the deepest node along `path` that exists."""
        node = self._root
        if node is None:
            return None, None
        best = node
        for item in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == item:
                        child = value
                        break
            elif (
                isinstance(node, yaml.SequenceNode) and isinstance(item, int) and 0 <= item < len(node.value)
            ):
                child = node.value[item]
            if child is None:
                break
            node = best = child
        return best.start_mark.line + 1, best.start_mark.column + 1

    def problem(self, path: Sequence[PathItem], message: str) -> Problem:
        """Build a located problem for the node at `path`."""
        line, column = self.position(path)
        return Problem(self.file, line, column, format_path(path), message)

    def problems_from(self, exc: ValidationError, prefix: Sequence[PathItem] = ()) -> list[Problem]:
        """Translate pydantic errors into located problems, one per error."""
        problems = []
        for error in exc.errors(include_url=False):
            path = [*prefix, *(p for p in error["loc"] if isinstance(p, str | int))]
            value = error.get("input")
            shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
            problems.append(self.problem(path, error["msg"] + shown))
        return problems


def format_path(path: Sequence[PathItem]) -> str:
    """Render a location like `rules[2].when`."""
    out = ""
    for item in path:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else item)
    return out
