"""``resilient-db demo``: a live self-healing workload on PostgreSQL with real faults injected,
every unit of work verified against the database at the end.

* :mod:`._run` - setup (server, scratch database, the Alembic migrations shipped in
  ``migrations/`` here as package data), the run and the report;
* :mod:`._workload_async` - the workers and their units, written once: ``--async`` runs them as
  asyncio tasks on asyncpg, and :mod:`._workload` (the worker threads on psycopg) is generated
  from it by ``scripts/async_to_sync.py``; :mod:`._ledger`, what they did; :mod:`._loop`, the
  event loop of a process of ``--async``;
* :mod:`._faults` - the fault schedule;
* :mod:`._verify` - the invariants, checked against the database;
* :mod:`._view` - progress and report, plain or with rich;
* :mod:`._fleet` and :mod:`._member` - the workers in several processes sharing breaker and
  retry budget through Redis (``--processes``), a primary and standby with a failover (``--ha``).
"""

from __future__ import annotations

from ._run import (
    APPLICATION_NAME,
    SERVICE,
    DemoError,
    DemoOptions,
    alembic_config,
    apply_migrations,
    demo_config,
    downgrade_migrations,
    migrations_dir,
    run_demo,
)

__all__ = [
    "APPLICATION_NAME",
    "SERVICE",
    "DemoError",
    "DemoOptions",
    "alembic_config",
    "apply_migrations",
    "demo_config",
    "downgrade_migrations",
    "migrations_dir",
    "run_demo",
]
