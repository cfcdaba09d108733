"""Rule expressions: the whitelist, three-valued missing-field logic, and the compiled code."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.event import FieldValue
from rules.expression import EVALUATION_ERRORS, MAX_DEPTH, ExpressionError, compile_expression

T, F, U = "true", "false", "unknown"  # the three outcomes: is_true, is_false, or neither


def outcome(source: str, fields: Mapping[str, FieldValue]) -> str:
    expression = compile_expression(source)
    is_true, is_false = expression.is_true(fields), expression.is_false(fields)
    assert not (is_true and is_false)
    return T if is_true else F if is_false else U


@pytest.mark.parametrize(
    ("source", "fields", "expected"),
    [
        ("temperature > 30", {"temperature": 31}, T),
        ("temperature > 30", {"temperature": 30}, F),
        ("temperature > 30", {"humidity": 50}, U),
        ("temperature >= 30.5", {"temperature": 30.5}, T),
        ("status == 'fault'", {"status": "fault"}, T),
        ('status != "ok"', {"status": "ok"}, F),
        ("20 < t <= 30", {"t": 30}, T),
        ("20 < t <= 30", {"t": 20}, F),
        ("a < b < c", {"a": 1, "b": 2}, U),
        ("a > 1 and b > 1", {"a": 0}, F),  # false and unknown is false
        ("a > 1 and b > 1", {"a": 2}, U),
        ("a > 1 or b > 1", {"a": 2}, T),  # true or unknown is true
        ("a > 1 or b > 1", {"a": 0}, U),
        ("not (a > 1)", {}, U),  # a negated unknown stays unknown
        ("not (a > 1)", {"a": 0}, T),
        ("not not a > 1", {"a": 2}, T),
        ("has(gps)", {}, F),
        ("not has(gps)", {}, T),
        ("has('battery.level')", {"battery.level": 3.1}, T),
        ("door_open", {"door_open": True}, T),
        ("door_open", {"door_open": 0}, F),
        ("not door_open", {}, U),
        ("True", {}, T),
        ("False or x > 1", {"x": 0}, F),
        ("-t > 5", {"t": -6}, T),
        ("a + b * 2 - c / 4 % 3 == 4.5", {"a": 1, "b": 2, "c": 2}, T),
        ("abs(a - b) > 2", {"a": 1, "b": 5}, T),
        ("round(t, 1) == 21.3", {"t": 21.25001}, T),
        ("round(t, -1) == 20", {"t": 21}, T),
        ("round(t) == 2", {"t": 2.4}, T),
        ("max(a, b, 3) == 7 and min(a, b) == 1", {"a": 7, "b": 1}, T),
        ("min(name, 'm') == 'k'", {"name": "kiwi"}, F),
        ("abs", {"abs": 1}, T),  # a field may share a function's name
        ("  t > 1\nand t < 3", {"t": 2}, T),  # folded YAML keeps newlines
    ],
)
def test_evaluation(source: str, fields: dict[str, FieldValue], expected: str) -> None:
    assert outcome(source, fields) == expected


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("temperature > 30 and has(humidity) or max(a, temperature) < 3", ("temperature", "humidity", "a")),
        ("has('x.y') and z", ("x.y", "z")),
        ("1 < 2", ()),
    ],
)
def test_fields_are_listed_in_order_of_first_use(source: str, fields: tuple[str, ...]) -> None:
    assert compile_expression(source).fields == fields


@pytest.mark.parametrize(
    ("source", "message", "column"),
    [
        # injection attempts
        ("__import__('os')", "calling __import__ is not allowed", 1),
        ("().__class__", "attribute access is not allowed", 3),
        ("temperature.__class__ > 1", "attribute access is not allowed", 12),
        ("open('x')", "calling open is not allowed", 1),
        ("9**9**9", "operator '**' is not allowed", 2),
        ("t > 1 and x.y.z()", "calling x.y.z is not allowed", 11),
        ("(lambda: 1)() > 0", "calling lambda: 1 is not allowed", 1),
        ("[c for c in ()] == 1", "comprehension is not allowed", 1),
        ("f'{t}' == '1'", "f-string is not allowed", 1),
        ("(x := 1) > 0", "assignment expression is not allowed", 2),
        ("t[0] > 1", "indexing is not allowed", 2),
        ("globals() == 1", "calling globals is not allowed", 1),
        # the rest of the whitelist
        ("t ** 2 > 1", "operator '**' is not allowed", 3),
        ("t // 2 > 1", "operator '//' is not allowed", 3),
        ("t & 1", "operator '&' is not allowed", 3),
        ("+t > 1", "operator 'unary +' is not allowed", 1),
        ("x in (1, 2)", "operator 'in' is not allowed", 3),
        ("x is None", "operator 'is' is not allowed", 3),
        ("t > None", "the constant None is not allowed", 5),
        ("t == b'x'", "the constant b'x' is not allowed", 6),
        ("a if b else c", "conditional expression is not allowed", 1),
        ("t > 1, 2", "tuple is not allowed", 1),
        (
            "t + 1",
            "expected a comparison, has(field), and/or/not, True/False or a bool field, got a value",
            1,
        ),
        ("(t > 1) + 1 > 0", "expected a value here", 2),
        ("t + 'x' > 1", "expected a number, got the constant 'x'", 5),
        ("t + True > 1", "expected a number, got the constant True", 5),
        ("t > 'x' + 1", "expected a number, got the constant 'x'", 5),
        ("1 < 'x'", "cannot compare a number with a string using <", 5),
        ("abs(t, 1) > 0", "abs() takes exactly one argument", 1),
        ("min(t) > 0", "min() takes two or more arguments", 1),
        ("max(t, key=1) > 0", "max() takes plain positional arguments", 1),
        ("max(1, 'a') > 0", "max() arguments mix number and string", 1),
        ("round(t, d) > 0", "round() digits must be a whole number from -15 to 15", 10),
        ("round(t, 16) > 0", "round() digits must be a whole number", 10),
        ("has(a, b)", "has() takes exactly one field name", 1),
        ("has(1)", "has() takes a field name", 5),
        ("has(t) + 1 > 0", "has() is a condition", 1),
        ("ts > 0", "'ts' is not a metric field", 1),
        ("true", "'true' would be read as a field; write True or False", 1),
        ("temperature > 1e999", "number 1e999 is too large", 15),
        ("1 / 0 > 1", "expression cannot be evaluated: division by zero", 1),
        # syntax
        ("temperature >", "invalid syntax", 14),
        ("  temperature >", "invalid syntax", 16),
        ("(t > 1", "invalid syntax: '(' was never closed", 1),
        ("t > > 1", "invalid syntax", 5),
        ("", "expression is empty", 1),
        ("t > 1" + " " * 2000, "longer than 2000 characters", 1),
        ("éé > 1 and éé.x", "'éé' is not a valid field name", 1),
        ("- " * 3000 + "t > 1", "longer than 2000 characters", 1),
        ("-" * 100 + "t > 1", f"nested more than {MAX_DEPTH} levels deep", MAX_DEPTH + 1),
    ],
)
def test_rejected(source: str, message: str, column: int) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert message in caught.value.reason
    assert caught.value.column == column
    assert str(caught.value).endswith(f"(column {column})")


def test_column_counts_characters_not_bytes() -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression("name == 'é' and x.y > 1")
    assert caught.value.column == 18


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("t > 1", {"t": "warm"}),  # str > int
        ("s * 1000 == 3", {"s": "abc"}),  # strings never reach arithmetic: `*` and `%` could allocate
        ("s % 2 == 0", {"s": "%999999999d"}),
        ("a / b > 1", {"a": 1, "b": 0}),
        ("round(t) > 1", {"t": float("nan")}),
        ("flag", {"flag": "yes"}),
    ],
)
def test_bad_data_raises_an_evaluation_error(source: str, fields: dict[str, FieldValue]) -> None:
    expression = compile_expression(source)
    with pytest.raises(EVALUATION_ERRORS):
        expression.is_true(fields)


def test_negated_swaps_the_compiled_predicates() -> None:
    expression = compile_expression("t > 30")
    negated = expression.negated()
    assert negated.source == "not (t > 30)"
    assert negated == compile_expression("not (t > 30)")
    assert (negated.is_true({"t": 10}), negated.is_false({"t": 10}), negated.is_true({})) == (
        True,
        False,
        False,
    )


def test_equal_by_source() -> None:
    assert compile_expression(" t > 1 ") == compile_expression("t > 1")
    assert hash(compile_expression("t > 1")) == hash(compile_expression("t > 1"))
    assert compile_expression("t > 1") != compile_expression("t > 2")


def test_compiled_code_has_no_builtins() -> None:
    predicate: Any = compile_expression("t > 1").is_true
    assert predicate.__globals__["__builtins__"] == {}


def test_names_only_ever_read_fields() -> None:
    expression = compile_expression("__builtins__ == 2 or __class__ == 'x' or __import__ == 1")
    assert expression.fields == ("__builtins__", "__class__", "__import__")
    assert (expression.is_true({}), expression.is_true({"__class__": "x"})) == (False, True)


# --- compiled code against a naive tree-walking reference -------------------------------------------

MISSING = object()
_OPS: dict[type[ast.AST], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_FUNCS: dict[str, Callable[..., Any]] = {"abs": abs, "min": min, "max": max, "round": round}


def reference_value(node: ast.expr, fields: Mapping[str, FieldValue]) -> Any:
    if isinstance(node, ast.Name):
        return fields.get(node.id, MISSING)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp):
        operand = reference_value(node.operand, fields)
        return MISSING if operand is MISSING else -operand
    if isinstance(node, ast.BinOp):
        left, right = reference_value(node.left, fields), reference_value(node.right, fields)
        return MISSING if MISSING in (left, right) else _OPS[type(node.op)](left, right)
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    args = [reference_value(arg, fields) for arg in node.args]
    return MISSING if MISSING in args else _FUNCS[node.func.id](*args)


def reference(node: ast.expr, fields: Mapping[str, FieldValue]) -> bool | None:
    """Evaluate with Kleene logic, None meaning unknown; no short-circuits, no code generation."""
    if isinstance(node, ast.BoolOp):
        values = [reference(value, fields) for value in node.values]
        decisive = isinstance(node.op, ast.Or)  # True decides an `or`, False decides an `and`
        return decisive if decisive in values else None if None in values else not decisive
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = reference(node.operand, fields)
        return None if inner is None else not inner
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "has":
        assert isinstance(node.args[0], ast.Name)
        return node.args[0].id in fields
    if isinstance(node, ast.Name):
        value = fields.get(node.id)
        return None if value is None else bool(value)
    if isinstance(node, ast.Constant):
        return bool(node.value)
    assert isinstance(node, ast.Compare)
    operands = [reference_value(o, fields) for o in [node.left, *node.comparators]]
    if MISSING in operands:
        return None
    return all(_OPS[type(op)](a, b) for op, a, b in zip(node.ops, operands, operands[1:], strict=False))


PROPERTY_EXPRESSIONS = [
    "a > 1 and b < 2",
    "not (a >= b) or c == 3",
    "-a * 2 + b % 7 > c / (abs(b) + 1)",
    "1 < a <= b < 10",
    "max(a, b, 3) - min(a, c) >= round(b, 1) or not has(c)",
    "a and not b or c",
    "not (a > 1 or (b < 2 and not c != 0)) and (True or a == b)",
]
numbers = st.one_of(
    st.integers(-20, 20), st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), st.booleans()
)
field_values = st.dictionaries(st.sampled_from(["a", "b", "c"]), numbers)


@pytest.mark.parametrize("source", PROPERTY_EXPRESSIONS)
@given(fields=field_values)
def test_compiled_matches_reference(source: str, fields: dict[str, FieldValue]) -> None:
    expression = compile_expression(source)
    expected = reference(ast.parse(source, mode="eval").body, fields)
    assert expression.is_true(fields) is (expected is True)
    assert expression.is_false(fields) is (expected is False)


# -- windowed functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "windows", "uses"),
    [
        ("avg(t, 5m) > 1", [(False, 300.0, {"avg"})], ["avg(t, 5m)"]),
        ("avg(t, 250ms) > 1", [(False, 0.25, {"avg"})], ["avg(t, 250ms)"]),
        ("avg(t, 10 events) > 1", [(True, 10.0, {"avg"})], ["avg(t, 10 events)"]),
        ("avg(t, 1 event) > 1", [(True, 1.0, {"avg"})], ["avg(t, 1 event)"]),
        # one window for every function over the same value and length
        ("max(t, 1h) - min(t, 1h) > avg(t, 1h)", [(False, 3600.0, {"avg", "max", "min"})], None),
        ("avg(t, 5m) > avg(t, 1h)", [(False, 300.0, {"avg"}), (False, 3600.0, {"avg"})], None),
        ("avg(t - s, 5m) > 1 and avg(t, 5m) > 1", [(False, 300.0, {"avg"}), (False, 300.0, {"avg"})], None),
        ("percentile(t, 99.5, 2m) > 1", [(False, 120.0, {"percentile"})], None),
        ("count_if(status == 'fault', 5m) > 2", [(False, 300.0, {"count"})], None),
        ("min(a, b) < 1", [], []),  # the scalar min
        ("status == '5m'", [], []),  # a duration inside a string is text
    ],
)
def test_window_calls(
    source: str, windows: list[tuple[bool, float, set[str]]], uses: list[str] | None
) -> None:
    expression = compile_expression(source)
    assert [(w.by_count, w.size, set(w.functions)) for w in expression.windows] == windows
    if uses is not None:
        assert [use.source for use in expression.uses] == uses


@pytest.mark.parametrize(
    ("source", "column", "message"),
    [
        ("avg(t) > 1", 1, "avg() needs a window as its last argument"),
        ("avg(t, 300) > 1", 1, "avg() needs a window as its last argument"),
        ("t > 5m", 5, "a window (5m) goes only as the last argument"),
        ("avg(avg(t, 5m), 5m) > 1", 5, "windowed functions cannot be nested"),
        ("percentile(t, 101, 5m) > 1", 15, "percentile() takes a number from 0 to 100"),
        ("percentile(t, 5m) > 1", 1, "percentile() takes 3 arguments"),
        ("avg(t, 1.5 events) > 1", 8, "a count window is a whole number of events"),
        ("avg(t, 0s) > 1", 8, "a time window is longer than 0"),
        ("avg(t, 32d) > 1", 8, "a time window is longer than 0 and at most 31d"),
        ("avg(status == 1, 5m) > 1", 5, "expected a value here"),
        ("count_if(t + 1, 5m) > 1", 10, "expected a comparison"),
        ("avg(t, 5min) > 1", 8, "invalid decimal literal"),
    ],
)
def test_window_errors(source: str, column: int, message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert message in caught.value.reason
    assert caught.value.column == column


def test_window_values_are_read_from_the_windows_passed_in() -> None:
    from rules.window import CountWindow, needs_of

    expression = compile_expression("avg(t, 3 events) > 30 and has(t)")
    [spec] = expression.windows
    window = CountWindow(3, needs_of(spec.functions))
    for value in (40, 40, 20):
        window.update(0.0, spec.extract({"t": value}))
    assert outcome_with(expression, {"t": 20}, (window,)) == T
    window.update(0.0, spec.extract({"t": 10}))
    assert outcome_with(expression, {"t": 10}, (window,)) == F
    assert spec.extract({"x": 1}) is None  # nothing to add
    with pytest.raises(EVALUATION_ERRORS):
        spec.extract({"t": "hot"})  # text never reaches a window's sums


def test_an_empty_window_is_unknown_but_count_is_zero() -> None:
    from rules.window import TimeWindow

    window = TimeWindow(60.0)
    assert outcome_with(compile_expression("avg(t, 1m) > 1"), {}, (window,)) == U
    assert outcome_with(compile_expression("count(t, 1m) == 0"), {}, (window,)) == T


def outcome_with(expression: Any, fields: Mapping[str, FieldValue], windows: tuple[Any, ...]) -> str:
    is_true, is_false = expression.is_true(fields, windows), expression.is_false(fields, windows)
    assert not (is_true and is_false)
    return T if is_true else F if is_false else U
