"""resilient_db: a self-healing database layer for SQLAlchemy 2.x and PostgreSQL.

Units of work survive transient faults (retry with SQLSTATE classification on tenacity), a
circuit breaker per service fails fast when the database is down (pybreaker's storage and
listeners, with no lock held across I/O), and status-transition rules declared on models block
illegal state changes before commit. Every action is logged with the ``[SELF-HEAL]`` prefix.
"""

from __future__ import annotations

# first: the resilient-db command interrupted (or terminated) while the rest imports says so
from . import _startup  # noqa: F401

# isort: split
import importlib.metadata as _metadata

from ._asyncio import AsyncResilientSession
from ._classify import Classifier, Outcome, classify, is_transient, sqlstate_of
from ._commit import install_commit_markers, uninstall_commit_markers
from ._config import Config, load_config, reload_config
from ._errors import (
    BypassRefusedError,
    CircuitOpenError,
    CommitOutcomeUnknownError,
    ConfigError,
    IllegalTransitionError,
    ResilientDBError,
    ResponseValidationError,
    StaleTransitionError,
    TransactionStateError,
)
from ._manual import close_breaker, open_breaker
from ._observability import (
    BreakerHealth,
    BudgetHealth,
    FleetBudgetHealth,
    FleetTimelineHealth,
    HealthReport,
    SelfHealEvent,
    SelfHealHook,
    ServiceCounters,
    ServiceHealth,
    SharedBreakerHealth,
    StorageBreakerHealth,
    TransitionCounters,
    UnavailableHealth,
    add_hook,
    health,
    remove_hook,
)
from ._retry import set_testing
from ._session import ResilientSession
from ._state import reset_state
from ._validation import ResponseValidator
from ._wrapper import SelfHealingDecorator, with_self_healing
from .transitions import (
    ANY_STATE,
    BYPASS_ROLE,
    BYPASS_SETTING,
    TRANSITION_SQLSTATE,
    ScriptOnPreparedStatementError,
    TransitionRules,
    TransitionRulesError,
    TransitionTrigger,
    TriggerInstallRefusedError,
    allowed_transitions,
    bypass_transitions,
    bypass_transitions_async,
    install_transition_trigger,
    rules_to_dot,
    rules_to_mermaid,
    transition_rules,
    transition_trigger_drop_sql,
    transition_trigger_sql,
    trigger_drift,
    uninstall_transition_trigger,
)

try:
    __version__ = _metadata.version("resilient-db")
except _metadata.PackageNotFoundError:  # pragma: no cover - a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "ANY_STATE",
    "BYPASS_ROLE",
    "BYPASS_SETTING",
    "TRANSITION_SQLSTATE",
    "AsyncResilientSession",
    "BreakerHealth",
    "BudgetHealth",
    "BypassRefusedError",
    "CircuitOpenError",
    "Classifier",
    "CommitOutcomeUnknownError",
    "Config",
    "ConfigError",
    "FleetBudgetHealth",
    "FleetTimelineHealth",
    "HealthReport",
    "IllegalTransitionError",
    "Outcome",
    "ResilientDBError",
    "ResilientSession",
    "ResponseValidationError",
    "ResponseValidator",
    "ScriptOnPreparedStatementError",
    "SelfHealEvent",
    "SelfHealHook",
    "SelfHealingDecorator",
    "ServiceCounters",
    "ServiceHealth",
    "SharedBreakerHealth",
    "StaleTransitionError",
    "StorageBreakerHealth",
    "TransactionStateError",
    "TransitionCounters",
    "TransitionRules",
    "TransitionRulesError",
    "TransitionTrigger",
    "TriggerInstallRefusedError",
    "UnavailableHealth",
    "__version__",
    "add_hook",
    "allowed_transitions",
    "bypass_transitions",
    "bypass_transitions_async",
    "classify",
    "close_breaker",
    "health",
    "install_commit_markers",
    "install_transition_trigger",
    "is_transient",
    "load_config",
    "open_breaker",
    "reload_config",
    "remove_hook",
    "reset_state",
    "rules_to_dot",
    "rules_to_mermaid",
    "set_testing",
    "sqlstate_of",
    "transition_rules",
    "transition_trigger_drop_sql",
    "transition_trigger_sql",
    "trigger_drift",
    "uninstall_commit_markers",
    "uninstall_transition_trigger",
    "with_self_healing",
]
