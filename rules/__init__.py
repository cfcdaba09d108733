"""The pure rule engine: rule files in, events and the current time in, actions out."""

from rules.action import (
    Action,
    AlertState,
    FailedAction,
    RecordAlert,
    Republish,
    SendCommand,
    Severity,
    Webhook,
    WriteDerived,
    alert_payload,
)
from rules.checkpoint import CheckpointError
from rules.duration import format_duration, parse_duration
from rules.engine import AlarmStatus, RuleEngine
from rules.expression import EVALUATION_ERRORS, Expression, ExpressionError, compile_expression
from rules.model import (
    CommandSpec,
    DerivedMetric,
    DeviceSelector,
    MessageTemplate,
    NOfM,
    RepublishSpec,
    Rule,
    RuleSet,
    RuleTest,
    WebhookSpec,
)
from rules.parse import build_rule_set, parse_rule_file
from rules.selector import DeviceInfo, KnownDevice
from rules.testing import CaseResult, run_rule_tests

__all__ = [
    "EVALUATION_ERRORS",
    "Action",
    "AlarmStatus",
    "AlertState",
    "CaseResult",
    "CheckpointError",
    "CommandSpec",
    "DerivedMetric",
    "DeviceInfo",
    "DeviceSelector",
    "Expression",
    "ExpressionError",
    "FailedAction",
    "KnownDevice",
    "MessageTemplate",
    "NOfM",
    "RecordAlert",
    "Republish",
    "RepublishSpec",
    "Rule",
    "RuleEngine",
    "RuleSet",
    "RuleTest",
    "SendCommand",
    "Severity",
    "Webhook",
    "WebhookSpec",
    "WriteDerived",
    "alert_payload",
    "build_rule_set",
    "compile_expression",
    "format_duration",
    "parse_duration",
    "parse_rule_file",
    "run_rule_tests",
]
