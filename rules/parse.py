"""Turn rule-file text into validated rules, reporting every problem of every file at once.

The gateway reads the files and passes their text in; nothing here touches the file system.
The format is documented in `rules.model`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from devices.errors import Problem, SourceFileError
from devices.yamlsource import LocatedDocument, PathItem
from rules.duration import parse_duration
from rules.model import (
    DEFAULT_LATENESS,
    CommandSpec,
    DerivedMetric,
    DeviceSelector,
    NOfM,
    RepublishSpec,
    Rule,
    RuleSet,
    RuleTest,
    WebhookSpec,
)

_EXPECTED_FILE = "expected a mapping with a `rules` list (or a `derived` list)"
_TOP_LEVEL_KEYS = ("rules", "derived", "lateness", "time", "tests")
_TESTS = TypeAdapter(list[RuleTest])
_TIME_MODES = ("event", "processing")


class _RuleLoader(yaml.SafeLoader):
    """A SafeLoader with YAML 1.2 booleans, so `params: {on: true}` has the key "on", not True."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_RuleLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RuleLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass(frozen=True, slots=True)
class _Located:
    rule: Rule | DerivedMetric
    file: str
    line: int | None
    column: int | None
    where: str


@dataclass(slots=True)
class _File:
    rules: list[_Located]
    tests: list[RuleTest]
    problems: list[Problem]


def parse_rule_file(text: str, file: str) -> list[Rule]:
    """Parse one rule file, or raise `SourceFileError` listing all of its problems.

    Returns the file's rules (its derived metrics are checked too, but only `build_rule_set`
    returns them).
    """
    parsed = _parse(text, file)
    problems = parsed.problems + _duplicate_problems(parsed.rules)
    if problems:
        raise SourceFileError(_in_reading_order(problems))
    return [entry.rule for entry in parsed.rules if isinstance(entry.rule, Rule)]


def build_rule_set(files: Mapping[str, str]) -> RuleSet:
    """Parse every file (name -> text) into one rule set, or raise `SourceFileError` with all problems.

    Files are taken in name order, so rule order and error order do not depend on directory listing.
    """
    located: list[_Located] = []
    problems: list[Problem] = []
    tests: dict[str, tuple[RuleTest, ...]] = {}
    for file in sorted(files):
        parsed = _parse(files[file], file)
        located += parsed.rules
        problems += parsed.problems
        if parsed.tests:
            tests[file] = tuple(parsed.tests)
    problems += _duplicate_problems(located)
    if problems:
        raise SourceFileError(_in_reading_order(problems))
    return RuleSet(
        tuple(entry.rule for entry in located if isinstance(entry.rule, Rule)),
        {entry.rule.id: entry.file for entry in located},
        tests,
        tuple(entry.rule for entry in located if isinstance(entry.rule, DerivedMetric)),
    )


def _parse(text: str, file: str) -> _File:
    try:
        doc = LocatedDocument(text, file)
    except SourceFileError as exc:
        return _File([], [], list(exc.problems))
    # LocatedDocument reads YAML 1.1 booleans; it is kept for positions, and the data is read again
    # with YAML 1.2 booleans. Both use the same grammar, so this load cannot fail differently.
    data = yaml.load(text, Loader=_RuleLoader)  # a SafeLoader subclass: no arbitrary objects
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        return _File([], [], [doc.problem([], f"{_EXPECTED_FILE}, got {got}")])
    problems = [
        doc.problem(
            [key],
            f"unknown top-level key {key!r}; expected only `rules`, `derived`, `lateness`, `time` and `tests`",
        )
        for key in data
        if key not in _TOP_LEVEL_KEYS
    ]
    lateness = DEFAULT_LATENESS
    if "lateness" in data:
        try:
            lateness = parse_duration(data["lateness"])
        except ValueError as exc:
            problems.append(doc.problem(["lateness"], f"lateness: {exc} (got {data['lateness']!r:.40})"))
    time_mode = data.get("time", "event")
    if time_mode not in _TIME_MODES:
        problems.append(
            doc.problem(["time"], f"time: expected `event` or `processing` (got {time_mode!r:.40})")
        )
        time_mode = "event"
    tests: list[RuleTest] = []
    if "tests" in data:
        try:
            tests = _TESTS.validate_python(data["tests"])
        except ValidationError as exc:
            problems += [_test_problem(problem) for problem in doc.problems_from(exc, ["tests"])]
    if "rules" not in data and "derived" in data:
        items: object = []
    else:
        items = data.get("rules")
    if not isinstance(items, list):
        got = "nothing" if items is None else type(items).__name__
        problems.append(doc.problem(["rules"] if "rules" in data else [], f"{_EXPECTED_FILE}, got {got}"))
        items = []
    defaults = {"lateness": lateness, "time": time_mode}
    located = _entries(doc, file, items, "rules", Rule, defaults, problems)
    if "derived" in data:
        derived = data["derived"]
        if isinstance(derived, list):
            located += _entries(doc, file, derived, "derived", DerivedMetric, defaults, problems)
        else:
            problems.append(doc.problem(["derived"], "expected a list of derived metrics"))
    return _File(located, tests, problems)


def _entries(
    doc: LocatedDocument,
    file: str,
    items: list[object],
    section: str,
    model: type[Rule] | type[DerivedMetric],
    defaults: Mapping[str, object],
    problems: list[Problem],
) -> list[_Located]:
    located: list[_Located] = []
    what = (
        "a rule (a mapping with id, when, ...)" if model is Rule else "a derived metric (id, every, fields)"
    )
    for index, item in enumerate(items):
        path: list[PathItem] = [section, index]
        if not isinstance(item, dict):
            problems.append(doc.problem(path, f"expected {what}, got {item!r:.40}"))
            continue
        raw_id = item.get("id")
        rule_id = raw_id if isinstance(raw_id, str) else None
        try:
            entry = model.model_validate(item)
        except ValidationError as exc:
            problems += _rule_problems(doc, exc, path, rule_id, item)
            continue
        # the file's lateness and time apply where the entry does not set its own
        update = {key: value for key, value in defaults.items() if getattr(entry, key) is None}
        if update:
            entry = entry.model_copy(update=update)
        line, column = doc.position([*path, "id"])
        located.append(_Located(entry, file, line, column, f"{section}[{index}].id"))
    return located


def _test_problem(problem: Problem) -> Problem:
    # The union tags of `expect` items show up in pydantic's locations; the YAML path has none.
    for tag in (".alert", ".command", ".republish", ".webhook", ".derived"):
        if tag + "." in problem.where or problem.where.endswith(tag):
            where = problem.where.replace(tag, "", 1)
            return replace(problem, where=where)
    return problem


def _rule_problems(
    doc: LocatedDocument,
    exc: ValidationError,
    path: Sequence[PathItem],
    rule_id: str | None,
    item: Mapping[str, object],
) -> list[Problem]:
    named = (
        f"{'rule' if path[0] == 'rules' else 'derived metric'} {rule_id!r}: " if rule_id is not None else ""
    )
    problems = []
    # problems_from yields one problem per error, in order, so the two can be paired.
    for error, problem in zip(exc.errors(include_url=False), doc.problems_from(exc, path), strict=True):
        loc = _without_union_tags(error["loc"], item)
        at = error.get("ctx", {}).get("at")
        if isinstance(at, list):  # a rule-wide check that names the key it is about (rules.model)
            loc = (*loc, *at)
        if loc != error["loc"]:
            problem = replace(doc.problem([*path, *loc], problem.message), message=problem.message)
            error = {**error, "loc": loc}
        message = problem.message
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(error["loc"], Rule if path[0] == "rules" else DerivedMetric)
        elif error["type"] == "missing":
            message = f"missing required key {error['loc'][-1]!r}"
        problems.append(replace(problem, message=named + message))
    return problems


def _without_union_tags(loc: tuple[int | str, ...], item: Mapping[str, object]) -> tuple[int | str, ...]:
    # `for:` is a duration or {count, of}, and `devices: [...]` is short for `devices: {ids: [...]}`:
    # pydantic names the union member, or the key the shorthand stands for, in the location, which
    # the YAML does not have.
    shorthand = isinstance(item.get("devices"), list)
    return tuple(
        part
        for i, part in enumerate(loc)
        if not (i and loc[i - 1] == "for" and part in ("duration", "n_of_m"))
        and not (i and shorthand and loc[i - 1] == "devices" and part == "ids")
    )


def _unknown_key_message(loc: tuple[int | str, ...], base: type[BaseModel]) -> str:
    key = str(loc[-1])
    parent = loc[-2] if len(loc) >= 2 else None
    nested: dict[object, type[BaseModel]] = {
        "command": CommandSpec,
        "republish": RepublishSpec,
        "webhook": WebhookSpec,
        "for": NOfM,
        "devices": DeviceSelector,
    }
    model = nested.get(parent, base)
    known = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; expected one of: {', '.join(known)}"


def _duplicate_problems(located: Sequence[_Located]) -> list[Problem]:
    first: dict[str, _Located] = {}
    problems = []
    for entry in located:
        seen = first.setdefault(entry.rule.id, entry)
        if seen is entry:
            continue
        where = f"{seen.file}:{seen.line}:{seen.column} ({seen.where})"
        problems.append(
            Problem(
                entry.file,
                entry.line,
                entry.column,
                entry.where,
                f"rule {entry.rule.id!r}: duplicate id, first defined at {where}; rule ids must be unique "
                "across all rule files",
            )
        )
    return problems


def _in_reading_order(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line or 0, p.column or 0))
