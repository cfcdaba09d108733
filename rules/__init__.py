"""The pure rule engine: rule files in, events and the current time in, actions out."""

from rules.action import Action, AlertState, RecordAlert, SendCommand, Severity
from rules.engine import AlarmStatus, RuleEngine
from rules.expression import EVALUATION_ERRORS, Expression, ExpressionError, compile_expression
from rules.model import CommandSpec, MessageTemplate, Rule, RuleSet
from rules.parse import build_rule_set, parse_rule_file

__all__ = [
    "EVALUATION_ERRORS",
    "Action",
    "AlarmStatus",
    "AlertState",
    "CommandSpec",
    "Expression",
    "ExpressionError",
    "MessageTemplate",
    "RecordAlert",
    "Rule",
    "RuleEngine",
    "RuleSet",
    "SendCommand",
    "Severity",
    "build_rule_set",
    "compile_expression",
    "parse_rule_file",
]
