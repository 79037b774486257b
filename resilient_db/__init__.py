"""resilient_db: a self-healing database layer for SQLAlchemy 2.x and PostgreSQL.

Units of work survive transient faults (retry with SQLSTATE classification on tenacity), a
circuit breaker per service fails fast when the database is down (pybreaker's storage and
listeners, with no lock held across I/O), and status-transition rules declared on models block
illegal state changes before commit. Every action is logged with the ``[SELF-HEAL]`` prefix.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._classify import Classifier, Outcome, classify, is_transient, sqlstate_of
from ._config import Config, load_config, reload_config
from ._errors import (
    CircuitOpenError,
    CommitOutcomeUnknownError,
    ConfigError,
    IllegalTransitionError,
    ResilientDBError,
    StaleTransitionError,
    TransactionStateError,
)
from ._observability import health
from ._retry import set_testing
from ._session import ResilientSession, with_self_healing

try:
    __version__ = version("resilient-db")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "CircuitOpenError",
    "Classifier",
    "CommitOutcomeUnknownError",
    "Config",
    "ConfigError",
    "IllegalTransitionError",
    "Outcome",
    "ResilientDBError",
    "ResilientSession",
    "StaleTransitionError",
    "TransactionStateError",
    "__version__",
    "classify",
    "health",
    "is_transient",
    "load_config",
    "reload_config",
    "set_testing",
    "sqlstate_of",
    "with_self_healing",
]
