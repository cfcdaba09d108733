"""The pure rule engine: rule files in, events and the current time in, actions out."""

from rules.action import Action, AlertState, RecordAlert, SendCommand, Severity
from rules.checkpoint import CheckpointError
from rules.duration import format_duration, parse_duration
from rules.engine import AlarmStatus, RuleEngine
from rules.expression import EVALUATION_ERRORS, Expression, ExpressionError, compile_expression
from rules.model import CommandSpec, MessageTemplate, NOfM, Rule, RuleSet, RuleTest
from rules.parse import build_rule_set, parse_rule_file
from rules.testing import CaseResult, run_rule_tests

__all__ = [
    "EVALUATION_ERRORS",
    "Action",
    "AlarmStatus",
    "AlertState",
    "CaseResult",
    "CheckpointError",
    "CommandSpec",
    "Expression",
    "ExpressionError",
    "MessageTemplate",
    "NOfM",
    "RecordAlert",
    "Rule",
    "RuleEngine",
    "RuleSet",
    "RuleTest",
    "SendCommand",
    "Severity",
    "build_rule_set",
    "compile_expression",
    "format_duration",
    "parse_duration",
    "parse_rule_file",
    "run_rule_tests",
]
