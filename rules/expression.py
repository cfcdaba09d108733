"""Compile rule conditions (`when`, `clear`) from a small, safe expression language.

The language is a whitelisted subset of Python expression syntax, parsed with `ast`:

    condition := comparison | condition and condition | condition or condition | not condition
               | has(<field>) | <bool field> | True | False | ( condition )
    comparison := value (< | <= | > | >= | == | !=) value ...      (chains like `20 < t < 30`)
    value := <field> | number | 'string' | True | False | -value | value (+ - * / %) value
           | abs(value) | round(value[, <int literal>]) | min(value, value, ...) | max(value, value, ...)

Names are the metric fields of the event. Anything else (attributes, indexing, other calls, `**`,
lambdas, comprehensions, f-strings, ...) is rejected when the rule file is loaded, with the column.

Windowed functions are values too; their last argument is a window, a time (`30s`, `5m`, `1.5h`,
`250ms`, `1d`) or a number of readings (`10 events`, `1 event`):

    avg(value, W)  min(value, W)  max(value, W)  sum(value, W)  count(value, W)  stddev(value, W)
    first(value, W)  last(value, W)  delta(value, W)  rate(value, W)  percentile(value, q, W)
    count_if(condition, W)

`value` is any value expression without windows (`avg(temperature - setpoint, 5m)`), `q` a number
from 0 to 100, and `min`/`max` with a window as their last argument are the windowed ones (with
plain values they stay the scalar `min(a, b, ...)`). A reading joins the window when the value is
known (every field it reads is present); `count_if` counts the readings for which the condition
definitely held. What each function returns, and how windows move, is in `rules.window`. An empty
window is unknown, except `count`, `count_if` and `sum`, which are 0.

Missing fields use three-valued logic: a comparison that reads a field the event lacks is *unknown*,
neither true nor false, and so is its negation; `and`/`or` combine unknowns the way SQL does
(`false and unknown` is false, `true or unknown` is true). A rule fires only on a definite result,
so `not (temperature > 30)` does not clear an alarm on an event that carries no temperature.
`has(field)` is never unknown. Each expression is compiled once into two plain Python functions,
`is_true(fields, windows)` and `is_false(fields, windows)` (`is_false` is what the default
`clear: not (when)` runs). `windows` holds one window object per entry of `Expression.windows`, owned
by the engine per device; an expression without windows takes just `fields`.

Evaluation may still raise one of `EVALUATION_ERRORS` on bad data (a string compared with a number,
a division by zero); the engine counts those and treats the expression as not firing.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from devices.errors import TidegateInputError
from devices.event import FieldValue
from devices.payload import FIELD_NAME_RE, RESERVED_KEYS
from rules.window import FUNCTIONS as WINDOW_FUNCTIONS
from rules.window import MAX_COUNT_WINDOW, EmptyWindow, Window


class Predicate(Protocol):
    """A compiled condition: fields of one event, plus the expression's windows if it has any."""

    def __call__(self, fields: Mapping[str, FieldValue], windows: Sequence[Window] = (), /) -> bool: ...


Extractor = Callable[[Mapping[str, FieldValue]], "float | None"]

EVALUATION_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError, ArithmeticError)

# Limits keep the parser, our recursive checker and the generated code far from CPython's recursion
# and parenthesis-nesting limits (the generated code adds at most one level of parentheses per level).
MAX_SOURCE_LENGTH = 2_000
MAX_DEPTH = 64
# round(x, n) on an int computes 10**-n: a literal bound keeps a rule from asking for a huge power.
MAX_ROUND_DIGITS = 15

_COMPARE_OPS: dict[type[ast.cmpop], str] = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
}
_ORDERING_OPS = ("<", "<=", ">", ">=")
_ARITHMETIC_OPS: dict[type[ast.operator], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Mod: "%",
}
_OPERATOR_SYMBOLS: dict[type[ast.AST], str] = {
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.UAdd: "unary +",
    ast.Invert: "~",
}
_NODE_NAMES: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Lambda: "lambda",
    ast.IfExp: "conditional expression",
    ast.NamedExpr: "assignment expression",
    ast.JoinedStr: "f-string",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension",
    ast.Tuple: "tuple",
    ast.List: "list",
    ast.Dict: "dict",
    ast.Set: "set",
    ast.Starred: "unpacking",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slice",
}
_FUNCTIONS = (
    "abs",
    "min",
    "max",
    "round",
    "has",
    *(name for name in WINDOW_FUNCTIONS if name not in ("min", "max")),
    "count_if",
)
# A window literal (`5m`, `250ms`, `10 events`) is not Python. Before parsing, each one is replaced by
# a complex literal of the same length (`5j`, `250j `, `10j      `), so every column stays where the
# author put it, and the compiler looks the original up by position. Strings are matched first so
# that a '5m' inside quotes is left alone.
_WINDOW_LITERAL_RE = re.compile(
    r"""'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?"""
    r"|(?<![\w.])(\d+(?:\.\d+)?)(?:(ms|s|m|h|d)|\s+(events?))(?![\w.])"
)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_WINDOW_SECONDS = 31 * 86400.0
_EXPECTED_VALUE = "a field, number, string, True/False, arithmetic (+ - * / %) or abs/min/max/round"
_EXPECTED_CONDITION = "a comparison, has(field), and/or/not, True/False or a bool field"

Kind = Literal["number", "string", "bool", "any"]


class ExpressionError(TidegateInputError):
    """An expression was rejected; `column` is 1-based within `source`."""

    def __init__(self, reason: str, *, source: str, column: int) -> None:
        super().__init__(f"{reason} (column {column})")
        self.reason = reason
        self.source = source
        self.column = column


def _num(value: FieldValue) -> FieldValue:
    # Strings must not reach arithmetic: `*` and `%` on device-sent text could allocate without bound.
    if value.__class__ is str:
        raise TypeError(f"expected a number, got the string {value!r:.40}")
    return value


def _truth(value: FieldValue) -> bool:
    if value.__class__ is str:
        raise TypeError(f"expected a bool or number as a condition, got the string {value!r:.40}")
    return bool(value)


# Generated code sees only these names: no builtins, so nothing outside the whitelist is reachable
# even if the checker below had a hole.
_RUNTIME: dict[str, object] = {
    "__builtins__": {},
    "_num": _num,
    "_str": str,
    "_bool": bool,
    "_truth": _truth,
    "_abs": abs,
    "_min": min,
    "_max": max,
    "_round": round,
}


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """One window an expression reads: what goes in, how long it is, which functions read it.

    Windows with equal `key` hold the same readings, so a rule keeps one per device for all of them.
    """

    key: tuple[str, bool, float, str]  # (value or condition AST, by count, size, "value"/"if")
    by_count: bool
    size: float  # seconds, or a number of readings when `by_count`
    extract: Extractor = field(compare=False)  # the reading an event adds, or None for none
    functions: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class WindowUse:
    """One windowed call in an expression, e.g. `avg(temperature, 5m)`: window index and function."""

    source: str
    window: int
    function: str
    q: float | None = None

    def value(self, windows: Sequence[Window]) -> float | None:
        """Return the call's current value over `windows` (the expression's windows)."""
        window = windows[self.window]
        if self.q is not None:
            return window.percentile(self.q)
        result: float | None = getattr(window, self.function)()
        return result


class Expression:
    """A checked, compiled condition; compare and hash by source text."""

    __slots__ = ("direct_fields", "fields", "is_false", "is_true", "negative", "source", "uses", "windows")

    def __init__(
        self,
        source: str,
        fields: tuple[str, ...],
        is_true: Predicate,
        is_false: Predicate,
        windows: tuple[WindowSpec, ...] = (),
        uses: tuple[WindowUse, ...] = (),
        direct_fields: tuple[str, ...] | None = None,
        *,
        negative: bool = False,
    ) -> None:
        self.source = source
        self.fields = fields  # every field read, in order of first appearance (inside windows too)
        # the fields read outside windowed functions (a group rule may read none)
        self.direct_fields = fields if direct_fields is None else direct_fields
        self.is_true = is_true
        self.is_false = is_false
        self.windows = windows
        self.uses = uses
        self.negative = negative  # `not (source)` of an expression whose text is `source[5:-1]`

    def negated(self) -> Expression:
        """Return `not (self)`, sharing the compiled functions."""
        return Expression(
            f"not ({self.source})",
            self.fields,
            self.is_false,
            self.is_true,
            self.windows,
            self.uses,
            self.direct_fields,
            negative=True,
        )

    def code(self, variables: dict[str, str], prefix: str = "") -> ExpressionCode:
        """Return this expression as Python source over shared field locals (see `ExpressionCode`)."""
        if self.negative:
            inner = expression_code(self.source[len("not (") : -1], variables, prefix)
            return ExpressionCode(inner.false, inner.true, inner.fields, inner.calls, inner.windows)
        return expression_code(self.source, variables, prefix)

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


@dataclass(frozen=True, slots=True)
class _Value:
    code: str
    kind: Kind
    fields: frozenset[str]  # the local variables it reads that may be None (fields, window results)


@dataclass(frozen=True, slots=True)
class _WindowLiteral:
    size: float
    by_count: bool
    text: str


@dataclass(frozen=True, slots=True)
class _Condition:
    true: str  # Python source that is True exactly when the condition definitely holds
    false: str  # ... exactly when it definitely does not hold


class _Compiler:
    """Check an expression AST against the whitelist and emit Python source for it."""

    def __init__(
        self,
        source: str,
        literals: Mapping[int, _WindowLiteral],
        *,
        nested: bool = False,
        variables: dict[str, str] | None = None,
        prefix: str = "",
    ) -> None:
        self.source = source
        self.literals = literals  # window literals by byte offset in `source`
        self.nested = nested  # compiling the value inside a windowed call: no windows there
        # field name -> local variable in the generated function; may be shared by several expressions
        # compiled into one function, which then read each field once
        self.variables: dict[str, str] = {} if variables is None else variables
        self.used: dict[str, str] = {}  # the fields this expression reads, in order of first appearance
        self.direct: dict[str, None] = {}  # ... of those, the ones read outside windowed functions
        self.prefix = prefix  # for window-call locals, unique per expression within one function
        self.order: dict[str, int] = {}  # local variable -> position, for a stable `is not None` order
        self.windows: dict[tuple[str, bool, float, str], WindowSpec] = {}
        self.calls: dict[tuple[int, str, float | None], str] = {}  # (window, function, q) -> local
        self.window_code: dict[tuple[str, bool, float, str], str] = {}  # the reading each window takes
        self.uses: list[WindowUse] = []

    def error(self, node: ast.AST, reason: str, *, offset: int | None = None) -> ExpressionError:
        encoded = self.source.encode()
        if offset is None:
            offset = getattr(node, "col_offset", 0)
        # ast offsets count UTF-8 bytes; users count characters.
        column = len(encoded[:offset].decode(errors="ignore")) + 1
        return ExpressionError(reason, source=self.source, column=column)

    def not_allowed(self, node: ast.AST, expected: str) -> ExpressionError:
        # Point at the offending operator rather than at the start of its left operand.
        offset = None
        if isinstance(node, ast.Attribute | ast.Subscript):
            offset = node.value.end_col_offset
        elif isinstance(node, ast.BinOp):
            offset = self.operator_offset(node.left, node.right)
        return self.error(node, f"{self.describe(node)} is not allowed; expected {expected}", offset=offset)

    def operator_offset(self, left: ast.expr, right: ast.expr) -> int | None:
        if left.end_col_offset is None:
            return None
        gap = self.source.encode()[left.end_col_offset : right.col_offset]
        return left.end_col_offset + len(gap) - len(gap.lstrip(b" \t)"))

    def field(self, node: ast.AST, name: str, *, direct: bool = True) -> str:
        if name in ("true", "false", "null", "none"):
            raise self.error(node, f"{name!r} would be read as a field; write True or False")
        if name in RESERVED_KEYS:
            raise self.error(node, f"{name!r} is not a metric field (it is event metadata)")
        if FIELD_NAME_RE.match(name) is None:
            raise self.error(node, f"{name!r} is not a valid field name")
        var = self.variables.get(name)
        if var is None:
            var = self.variables[name] = f"v{len(self.variables)}"
        if var not in self.order:
            self.order[var] = len(self.order)
        self.used[name] = var
        if direct:
            self.direct[name] = None
        return var

    def describe(self, node: ast.AST) -> str:
        if isinstance(node, ast.Constant):
            return f"the constant {node.value!r:.40}"
        if isinstance(node, ast.BinOp | ast.UnaryOp | ast.BoolOp):
            op = _OPERATOR_SYMBOLS.get(type(node.op))
            if op is not None:
                return f"operator {op!r}"
        return _NODE_NAMES.get(type(node), type(node).__name__.lower())

    def condition(self, node: ast.expr, depth: int) -> _Condition:
        if depth > MAX_DEPTH:
            raise self.error(node, f"expression is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(value, depth + 1) for value in node.values]
            trues, falses = " and ".join(p.true for p in parts), " or ".join(p.false for p in parts)
            if isinstance(node.op, ast.Or):
                trues, falses = " or ".join(p.true for p in parts), " and ".join(p.false for p in parts)
            return _Condition(f"({trues})", f"({falses})")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.condition(node.operand, depth + 1)
            return _Condition(inner.false, inner.true)
        if isinstance(node, ast.Compare):
            return self.compare(node, depth)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "has":
            var = self.has_argument(node)
            return _Condition(f"({var} is not None)", f"({var} is None)")
        if isinstance(node, ast.Name):
            var = self.field(node, node.id)
            return _Condition(
                # a bool field (the usual case) is its own truth: no call
                f"({var} is not None and ({var} if {var}.__class__ is _bool else _truth({var})))",
                f"({var} is not None and not ({var} if {var}.__class__ is _bool else _truth({var})))",
            )
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            return _Condition(repr(node.value), repr(not node.value))
        if isinstance(node, ast.BinOp | ast.UnaryOp | ast.Call | ast.Constant):
            self.value(node, depth)  # report a forbidden operator or call before the misplaced value
            raise self.error(node, f"expected {_EXPECTED_CONDITION}, got a value")
        raise self.not_allowed(node, _EXPECTED_CONDITION)

    def has_argument(self, node: ast.Call) -> str:
        if node.keywords or len(node.args) != 1:
            raise self.error(node, "has() takes exactly one field name")
        arg = node.args[0]
        if isinstance(arg, ast.Name):
            return self.field(arg, arg.id)
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return self.field(arg, arg.value)
        raise self.error(arg, "has() takes a field name, like has(temperature) or has('battery.level')")

    def compare(self, node: ast.Compare, depth: int) -> _Condition:
        operands = [self.value(node.left, depth + 1)]
        code = [operands[0].code]
        left_node = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            symbol = _COMPARE_OPS.get(type(op))
            if symbol is None:
                shown = _OPERATOR_SYMBOLS.get(type(op), "?")
                raise self.error(
                    node,
                    f"operator {shown!r} is not allowed; expected < <= > >= == !=",
                    offset=self.operator_offset(left_node, right),
                )
            left_node = right
            value = self.value(right, depth + 1)
            left = operands[-1]
            if {left.kind, value.kind} == {"number", "string"}:
                raise self.error(right, f"cannot compare a number with a string using {symbol}")
            operands.append(value)
            code += [symbol, value.code]
        comparison = " ".join(code)
        fields = sorted(frozenset().union(*(o.fields for o in operands)), key=self.order.__getitem__)
        if not fields:
            return _Condition(f"({comparison})", f"(not ({comparison}))")
        known = " and ".join(f"{var} is not None" for var in fields)
        return _Condition(f"({known} and ({comparison}))", f"({known} and not ({comparison}))")

    def value(self, node: ast.expr, depth: int) -> _Value:
        if depth > MAX_DEPTH:
            raise self.error(node, f"expression is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ast.Name):
            var = self.field(node, node.id)
            return _Value(var, "any", frozenset({var}))
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC_OPS:
            left, right = self.number(node.left, depth), self.number(node.right, depth)
            code = f"({left.code} {_ARITHMETIC_OPS[type(node.op)]} {right.code})"
            return _Value(code, "number", left.fields | right.fields)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            operand = self.number(node.operand, depth)
            return _Value(f"(-{operand.code})", "number", operand.fields)
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        if isinstance(node, ast.Compare | ast.BoolOp) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
        ):
            raise self.error(node, f"expected a value here ({_EXPECTED_VALUE}), got a condition")
        raise self.not_allowed(node, _EXPECTED_VALUE)

    def constant(self, node: ast.Constant) -> _Value:
        value = node.value
        literal = self.literals.get(node.col_offset)
        if literal is not None:
            raise self.error(
                node,
                f"a window ({literal.text}) goes only as the last argument of a windowed function, "
                f"like avg(temperature, {literal.text})",
            )
        if isinstance(value, bool):
            return _Value(repr(value), "bool", frozenset())
        if isinstance(value, str):
            return _Value(repr(value), "string", frozenset())
        if isinstance(value, int | float):
            if isinstance(value, float) and not math.isfinite(value):
                raise self.error(node, f"number {ast.get_source_segment(self.source, node)} is too large")
            return _Value(repr(value), "number", frozenset())
        raise self.error(
            node, f"{self.describe(node)} is not allowed; expected a number, string or True/False"
        )

    def number(self, node: ast.expr, depth: int) -> _Value:
        value = self.value(node, depth + 1)
        if value.kind in ("string", "bool"):
            raise self.error(node, f"expected a number, got {self.describe(node)}")
        if value.kind == "any":
            if value.code.isidentifier():
                # A local (a field or a window result): test for text inline, since a call to _num for
                # every number costs more than the rest of a simple comparison.
                code = f"({value.code} if {value.code}.__class__ is not _str else _num({value.code}))"
                return _Value(code, "number", value.fields)
            return _Value(f"_num({value.code})", "number", value.fields)
        return value

    def call(self, node: ast.Call, depth: int) -> _Value:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS:
            shown = ast.get_source_segment(self.source, node.func) or "this"
            raise self.error(
                node, f"calling {shown} is not allowed; the functions are {', '.join(_FUNCTIONS)}"
            )
        if name == "has":
            raise self.error(node, "has() is a condition; use it on its own or with and/or/not")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise self.error(node, f"{name}() takes plain positional arguments")
        literal = self.window_literal(node.args[-1]) if node.args else None
        if name == "count_if" or (
            name in WINDOW_FUNCTIONS and (literal is not None or name not in ("min", "max"))
        ):
            return self.window_call(node, name, literal, depth)
        if name == "abs":
            if len(node.args) != 1:
                raise self.error(node, "abs() takes exactly one argument")
            arg = self.number(node.args[0], depth)
            return _Value(f"_abs({arg.code})", "number", arg.fields)
        if name == "round":
            return self.round(node, depth)
        if len(node.args) < 2:
            raise self.error(node, f"{name}() takes two or more arguments")
        args = [self.value(arg, depth + 1) for arg in node.args]
        kinds = {arg.kind for arg in args} - {"any"}
        if len(kinds) > 1:
            raise self.error(node, f"{name}() arguments mix {' and '.join(sorted(kinds))}")
        code = f"_{name}({', '.join(arg.code for arg in args)})"
        return _Value(code, kinds.pop() if kinds else "any", frozenset().union(*(arg.fields for arg in args)))

    def window_literal(self, node: ast.expr) -> _WindowLiteral | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, complex):
            return self.literals.get(node.col_offset)
        return None

    def window_call(self, node: ast.Call, name: str, literal: _WindowLiteral | None, depth: int) -> _Value:
        what = "a condition" if name == "count_if" else "a value"
        shape = f"{name}(<{what[2:]}>, {'<percentile>, ' if name == 'percentile' else ''}<window>)"
        if literal is None:
            raise self.error(
                node,
                f"{name}() needs a window as its last argument: {shape}, where the window is a time "
                "like 5m or a count like 10 events",
            )
        if self.nested:
            raise self.error(node, f"{name}(): windowed functions cannot be nested")
        arity = 3 if name == "percentile" else 2
        if len(node.args) != arity:
            raise self.error(node, f"{name}() takes {arity} arguments: {shape}")
        if literal.by_count and (
            literal.size != int(literal.size) or not 1 <= literal.size <= MAX_COUNT_WINDOW
        ):
            raise self.error(
                node.args[-1], f"a count window is a whole number of events from 1 to {MAX_COUNT_WINDOW}"
            )
        if not literal.by_count and not 0 < literal.size <= MAX_WINDOW_SECONDS:
            raise self.error(node.args[-1], "a time window is longer than 0 and at most 31d")
        q = None
        if name == "percentile":
            q = _number_literal(node.args[1])
            if q is None or not 0 <= q <= 100:
                raise self.error(
                    node.args[1], "percentile() takes a number from 0 to 100 as its second argument"
                )
        arg = node.args[0]
        # Shared variables: the reading's code can then run inside the expression's own function.
        inner = _Compiler(self.source, self.literals, nested=True, variables=self.variables)
        if name == "count_if":
            body = f"1.0 if {inner.condition(arg, depth + 1).true} else None"
        else:
            value = inner.number(arg, depth)
            known = " and ".join(
                f"{var} is not None" for var in sorted(value.fields, key=inner.order.__getitem__)
            )
            body = f"{value.code} if {known} else None" if known else value.code
        for field_name in inner.used:
            # the rule reads these fields too (alert values, skip tests)
            self.field(arg, field_name, direct=False)
        kind = "if" if name == "count_if" else "value"
        key = (ast.dump(arg), literal.by_count, literal.size, kind)
        spec = self.windows.get(key)
        index = list(self.windows).index(key) if spec is not None else len(self.windows)
        function = "count" if name == "count_if" else name
        if spec is None:
            extract: Extractor = _build("extract", body, inner.used)  # type: ignore[assignment]
            spec = WindowSpec(key, literal.by_count, literal.size, extract)
        self.window_code.setdefault(key, body)
        self.windows[key] = WindowSpec(
            key, spec.by_count, spec.size, spec.extract, spec.functions | {function}
        )
        call = (index, function, q)
        var = self.calls.get(call)
        if var is None:
            var = self.calls[call] = f"{self.prefix}a{len(self.calls)}"
            self.order[var] = len(self.order)
            source = ast.get_source_segment(self.source, node) or name
            self.uses.append(WindowUse(" ".join(source.split()), index, function, q))
        return _Value(var, "number", frozenset({var}))

    def round(self, node: ast.Call, depth: int) -> _Value:
        if len(node.args) not in (1, 2):
            raise self.error(node, "round() takes a value and optionally a number of digits")
        arg = self.number(node.args[0], depth)
        if len(node.args) == 1:
            return _Value(f"_round({arg.code})", "number", arg.fields)
        digits_node = node.args[1]
        digits = _int_literal(digits_node)
        if digits is None or abs(digits) > MAX_ROUND_DIGITS:
            raise self.error(
                digits_node,
                f"round() digits must be a whole number from -{MAX_ROUND_DIGITS} to {MAX_ROUND_DIGITS}",
            )
        return _Value(f"_round({arg.code}, {digits})", "number", arg.fields)


def _number_literal(node: ast.expr) -> float | None:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return float(node.value)
    return None


def _window_literals(text: str) -> tuple[str, dict[int, _WindowLiteral]]:
    """Replace window literals by same-length complex literals; return the text and them by byte offset."""
    literals: dict[int, _WindowLiteral] = {}
    parts: list[str] = []
    done = 0
    for match in _WINDOW_LITERAL_RE.finditer(text):
        number = match.group(1)
        if number is None:  # a string literal: left as it is
            continue
        unit, events = match.group(2), match.group(3)
        size = float(number) * _UNIT_SECONDS[unit] if unit else float(number)
        start = match.start()
        literals[len(text[:start].encode())] = _WindowLiteral(size, events is not None, match.group(0))
        parts += [text[done:start], f"{number}j".ljust(len(match.group(0)))]
        done = match.end()
    parts.append(text[done:])
    return "".join(parts), literals


def _int_literal(node: ast.expr) -> int | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_literal(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _parse(source: str) -> tuple[ast.Expression, str, dict[int, _WindowLiteral], int]:
    """Parse `source`; return the tree, the stripped text, its window literals, and the indent."""
    # Folded YAML scalars carry newlines; a space keeps every column where the author put it.
    text = source.replace("\r", " ").replace("\n", " ")
    stripped = text.lstrip()
    if not stripped:
        raise ExpressionError("expression is empty", source=source, column=1)
    if len(text) > MAX_SOURCE_LENGTH:
        raise ExpressionError(
            f"expression is longer than {MAX_SOURCE_LENGTH} characters", source=source, column=1
        )
    indent = len(text) - len(stripped)
    parsed, literals = _window_literals(stripped)
    try:
        tree = ast.parse(parsed, mode="eval")
    except SyntaxError as exc:
        offset = exc.offset or 0
        # CPython reports "unexpected end" errors at offset 0 or past the end; point after the text.
        column = indent + offset if 0 < offset <= len(stripped) else len(text.rstrip()) + 1
        reason = exc.msg if exc.msg.startswith("invalid syntax") else f"invalid syntax: {exc.msg}"
        raise ExpressionError(reason, source=source, column=column) from None
    except (RecursionError, MemoryError):
        raise ExpressionError("expression is nested too deeply", source=source, column=1) from None
    except ValueError as exc:  # e.g. a NUL character
        raise ExpressionError(f"invalid expression: {exc}", source=source, column=1) from None
    return tree, stripped, literals, indent


def _translate(
    source: str, variables: dict[str, str] | None = None, prefix: str = ""
) -> tuple[_Compiler, _Condition, int]:
    tree, stripped, literals, indent = _parse(source)
    compiler = _Compiler(stripped, literals, variables=variables, prefix=prefix)
    try:
        condition = compiler.condition(tree.body, 0)
    except ExpressionError as exc:
        raise ExpressionError(exc.reason, source=source, column=indent + exc.column) from None
    return compiler, condition, indent


def compile_expression(source: str) -> Expression:
    """Check `source` against the whitelist and compile it, or raise `ExpressionError`."""
    compiler, condition, indent = _translate(source)
    calls = [
        f"{var} = w[{index}].{function}({'' if q is None else repr(q)})"
        for (index, function, q), var in compiler.calls.items()
    ]
    is_true: Predicate = _build("predicate", condition.true, compiler.used, calls)  # type: ignore[assignment]
    is_false: Predicate = _build("predicate", condition.false, compiler.used, calls)  # type: ignore[assignment]
    empty = (EmptyWindow(),) * len(compiler.windows)
    try:
        # Parts without fields are constants: fail now rather than on every event.
        is_true({}, empty)
        is_false({}, empty)
    except EVALUATION_ERRORS as exc:
        raise ExpressionError(
            f"expression cannot be evaluated: {exc}", source=source, column=indent + 1
        ) from None
    return Expression(
        source.strip(),
        tuple(compiler.used),
        is_true,
        is_false,
        tuple(compiler.windows.values()),
        tuple(compiler.uses),
        tuple(compiler.direct),
    )


@dataclass(frozen=True, slots=True)
class ExpressionCode:
    """An expression as Python source, for the engine to build functions of several expressions.

    `true` and `false` are Python expressions over the locals named in `fields` (field name ->
    local; the caller assigns `local = fields.get(name)`) and `calls` (local, index into
    `Expression.windows`, function, percentile q; the caller assigns each local the function's value
    over that window). They read nothing else but the names in `RUNTIME`.
    """

    true: str
    false: str
    fields: Mapping[str, str]
    calls: tuple[tuple[str, int, str, float | None], ...]
    windows: tuple[str, ...] = ()  # per entry of `Expression.windows`: the reading an event adds, or None


def expression_code(source: str, variables: dict[str, str], prefix: str) -> ExpressionCode:
    """Translate a checked expression again, naming fields from `variables` (shared, extended here)."""
    compiler, condition, _ = _translate(source, variables, prefix)
    calls = tuple((var, index, function, q) for (index, function, q), var in compiler.calls.items())
    windows = tuple(compiler.window_code[key] for key in compiler.windows)
    return ExpressionCode(condition.true, condition.false, dict(compiler.used), calls, windows)


RUNTIME: Mapping[str, object] = _RUNTIME


def build_function(name: str, params: str, lines: Sequence[str], namespace: Mapping[str, object]) -> object:
    """Compile `def name(params): lines` in a namespace of `RUNTIME` plus `namespace`, and return it.

    The lines must be built only from `ExpressionCode` text, `repr()` literals and the caller's own
    identifiers; nothing from a rule file reaches them otherwise.
    """
    text = "\n".join([f"def {name}({params}):", *(f"    {line}" for line in lines)])
    scope = {**_RUNTIME, **namespace}
    exec(compile(text, f"<rules: {name}>", "exec"), scope)
    return scope[name]


def _build(name: str, body: str, variables: Mapping[str, str], calls: Sequence[str] = ()) -> object:
    # Only the checked AST reaches this text: field names appear as repr() string literals, operators
    # and window function names come from fixed tables, and locals are our own v0, a0, ... names.
    lines = [f"def {name}(fields, w=()):" if name == "predicate" else f"def {name}(fields):"]
    lines += [f"    {var} = fields.get({field_name!r})" for field_name, var in variables.items()]
    lines += [f"    {call}" for call in calls]
    lines.append(f"    return {body}")
    namespace = dict(_RUNTIME)
    exec(compile("\n".join(lines), "<rule expression>", "exec"), namespace)
    return namespace[name]


# -- tumbling aggregates ---------------------------------------------------------------------------------

AGGREGATE_FUNCTIONS = (*WINDOW_FUNCTIONS, "count_if")


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One aggregate of a derived metric, e.g. `avg(temperature)`: what to read and how to reduce it.

    `extract` returns the reading an event adds (None for none): the value, or 1.0 when the
    condition of `count_if` definitely holds.
    """

    source: str
    function: str  # a window function; count_if is `count` over its condition
    q: float | None
    extract: Extractor = field(compare=False)
    fields: tuple[str, ...] = ()
    value_key: str = ""  # equal for aggregates that read the same readings


def compile_aggregate(source: str) -> Aggregate:
    """Check and compile `fn(value)`, `percentile(value, q)` or `count_if(condition)`.

    Raises:
        ExpressionError: not such an aggregate, or the value is not a valid value expression.
    """
    tree, stripped, literals, indent = _parse(source)
    body = tree.body
    shape = f"one of {', '.join(f'{name}(<value>)' for name in WINDOW_FUNCTIONS if name != 'percentile')}, "
    shape += "percentile(<value>, <q>) or count_if(<condition>)"
    compiler = _Compiler(stripped, literals, nested=True)
    try:
        if not (isinstance(body, ast.Call) and isinstance(body.func, ast.Name)):
            raise compiler.error(body, f"expected an aggregate: {shape}")
        name = body.func.id
        if name not in AGGREGATE_FUNCTIONS:
            raise compiler.error(body, f"{name}() is not an aggregate; expected {shape}")
        if literals:
            first = literals[min(literals)]
            raise compiler.error(
                body,
                f"a derived metric's window is its `every`; leave out the window ({first.text}) here",
            )
        arity = 2 if name == "percentile" else 1
        if body.keywords or len(body.args) != arity:
            raise compiler.error(body, f"{name}() takes {arity} argument{'s' if arity > 1 else ''} here")
        q = None
        if name == "percentile":
            q = _number_literal(body.args[1])
            if q is None or not 0 <= q <= 100:
                raise compiler.error(
                    body.args[1], "percentile() takes a number from 0 to 100 as its second argument"
                )
        arg = body.args[0]
        if name == "count_if":
            code = f"1.0 if {compiler.condition(arg, 1).true} else None"
        else:
            value = compiler.number(arg, 0)
            known = " and ".join(
                f"{var} is not None" for var in sorted(value.fields, key=compiler.order.__getitem__)
            )
            code = f"{value.code} if {known} else None" if known else value.code
    except ExpressionError as exc:
        raise ExpressionError(exc.reason, source=source, column=indent + exc.column) from None
    extract: Extractor = _build("extract", code, compiler.used)  # type: ignore[assignment]
    try:
        extract({})  # parts without fields are constants: fail now rather than on every event
    except EVALUATION_ERRORS as exc:
        raise ExpressionError(
            f"aggregate cannot be evaluated: {exc}", source=source, column=indent + 1
        ) from None
    function = "count" if name == "count_if" else name
    key = f"{'if' if name == 'count_if' else 'value'}:{ast.dump(arg)}"
    return Aggregate(source.strip(), function, q, extract, tuple(compiler.used), key)
