"""resilient_db: a self-healing database layer for SQLAlchemy 2.x and PostgreSQL."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__ = version("resilient-db")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "CircuitOpenError",
    "CommitOutcomeUnknownError",
    "Config",
    "ConfigError",
    "IllegalTransitionError",
    "ResilientDBError",
    "StaleTransitionError",
    "TransactionStateError",
    "__version__",
    "load_config",
    "reload_config",
]
