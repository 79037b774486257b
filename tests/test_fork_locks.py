"""A worker forked (gunicorn's preload) while another thread of the parent held one of the
library's locks must not inherit it held: that thread does not exist in the child, and the
child's first use would wait for good. A child forked while a config watcher thread was inside
``reload_config()`` hung in its own first ``reload_config()``, on the engine's commit
protocol's lock (taken on every reload and on every connect made while self-healing is off)."""

from __future__ import annotations

import os
import select
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import held_by_another_thread

import resilient_db as rdb
from resilient_db import _commit, _retry, _statements
from resilient_db._state import STATE
from resilient_db.transitions import _rules
from resilient_db.web import Recorder, _dashboard, _handlers
from resilient_db.web._recorder import recorder

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

#: where each lock lives, read again in the child (a renewed lock is a new object)
LOCKS: dict[str, Callable[[sa.Engine], Any]] = {
    "commit protocol (reload)": lambda e: STATE.engine_hooks[e].commit._made_off_lock,
    "commit protocol (prune)": lambda e: STATE.engine_hooks[e].commit._prune_lock,
    "engine's pool lines": lambda e: STATE.engine_hooks[e]._pool_lines._lock,
    "marked connection classes": lambda e: _commit._marked_lock,
    "statement cursors": lambda e: _statements._cursor_lock,
    "compiled guards": lambda e: _rules._cache_lock,
    "machinery lines": lambda e: _retry._MACHINERY_LINES._lock,
    # the web layer's rate-limited lines (a pool exhausted answered 503, a failed health check)
    "web pool-exhausted lines": lambda e: _handlers.POOL_LINES._lock,
    "dashboard's health-check lines": lambda e: _dashboard.HEALTH_LINES._lock,
    # the dashboard's (a hook on every self-healing event; a snapshot for each data.json)
    "dashboard's recorder": lambda e: recorder()._lock,
}


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def in_child(
    work: Callable[[], bool],
    timeout: float = 15.0,
    parent: Callable[[], None] | None = None,
) -> bytes:
    """Fork; the child runs ``work`` and reports whether it returned True (b"\\x00"), failed
    (b"\\x01") or hung (b"": killed after ``timeout``); ``parent()``, if given, is called
    by the parent once the child exists."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if work() else 1
        finally:
            os.write(write_end, bytes([code]))
            os._exit(code)
    os.close(write_end)
    try:
        if parent is not None:
            parent()
        ready, _, _ = select.select([read_end], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        answer = os.read(read_end, 1) if ready else b""
        os.waitpid(pid, 0)
        return answer
    finally:
        os.close(read_end)


@pytest.mark.parametrize("where", list(LOCKS))
def test_a_child_forked_while_a_thread_held_a_lock_gets_it_free(
    engine: sa.Engine, service: str, where: str
) -> None:
    Session = rdb.ResilientSession(engine, service=service)
    assert Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1

    def child() -> bool:
        engine.dispose(close=False)  # the parent's connections are the parent's
        lock = LOCKS[where](engine)
        if not lock.acquire(timeout=5):
            return False
        lock.release()
        rdb.reload_config()  # takes the commit protocol's lock, as the reviewer's child did
        return bool(Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1)

    with held_by_another_thread(LOCKS[where](engine)):
        assert in_child(child) == b"\x00", f"the child hung or failed on the {where} lock"


def test_a_forked_childs_dashboard_cursor_is_its_own() -> None:
    """A worker forked with the parent's recorder (gunicorn's preload, a dashboard made at
    import) records its own events from the same count on: a cursor of the parent (or of
    another worker behind the same URL) must get the child's full answer, never a delta the
    page would add to another process's data."""
    rec = Recorder(clock=lambda: 1_000_000.0)
    event = rdb.SelfHealEvent(name="retry", service="svc", level=30, message="", fields={})
    rec(event)
    parents = rec.snapshot()["cursor"]
    rec(event)  # the parent goes on

    def child() -> bool:
        rec(event)  # and so does the child, from the same count
        return rec.snapshot(after=parents)["delta"] is False

    assert rec.snapshot(after=parents)["delta"] is True
    assert in_child(child) == b"\x00", "the child took the parent's cursor as its own"
