"""Checked by mypy (strict) in `make types`, never run: the test harness's public API keeps its
types in a user's project."""

from __future__ import annotations

from resilient_db.testing import DelayedStart, EmbeddedPostgres

server = EmbeddedPostgres()
restarter = server.restart_after(0.5)  # its type as inferred: the documented .error is on it
restarter.join(timeout=30)
error: BaseException | None = restarter.error  # the failed start's exception, if any
named: DelayedStart = restarter
alive: bool = named.is_alive()
