"""Work started inside a unit (a thread given a copy of its context, an asyncio task) runs its
own units: the library's per-unit context variables, which such work inherits, do not make it
part of a unit it does not run in, nor of one that has ended."""

from __future__ import annotations

import contextvars
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def rows(engine: sa.Engine) -> sa.Engine:
    """A table of names on ``engine``."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS ctx_rows (name text PRIMARY KEY)"))
        conn.execute(sa.text("TRUNCATE ctx_rows"))
    return engine


def add(session: Session, name: str) -> Session:
    session.execute(sa.text("INSERT INTO ctx_rows VALUES (:n)"), {"n": name})
    return session


def names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(sa.text("SELECT name FROM ctx_rows")))


# -- a sync unit's context copied into another thread --------------------------------------------
def test_a_unit_in_a_thread_given_a_units_context_runs_its_own(
    rows: sa.Engine, service: str
) -> None:
    """A unit's code hands a copy of its context to a thread (``copy_context().run``, as a
    thread pool that carries context does), which runs a unit of the same factory: it runs in a
    session and transaction of its own, committed by itself, not in the unit's session (a
    Session is not for two threads), so the unit rolled back afterwards does not take it."""
    Sessions = rdb.ResilientSession(rows, service=service)
    seen: dict[str, Session] = {}

    def child() -> None:
        seen["child"] = Sessions.run(add, "child")

    def unit(session: Session) -> None:
        seen["unit"] = add(session, "unit")
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(child,))
        thread.start()
        thread.join()
        raise LookupError("the unit fails after the thread's unit")

    with pytest.raises(LookupError):
        Sessions.run(unit)
    assert seen["child"] is not seen["unit"]
    assert names(rows) == {"child"}


def test_a_unit_run_in_a_units_context_after_it_ended_runs_its_own(
    rows: sa.Engine, service: str
) -> None:
    """A copy of a unit's context kept past its end (a callback's), a unit of the same factory
    run in it afterwards: it is committed in a session of its own, not run in the ended unit's
    closed session and left there uncommitted (its work lost, the connection kept checked out)."""
    Sessions = rdb.ResilientSession(rows, service=service)
    kept: list[contextvars.Context] = []

    def unit(session: Session) -> None:
        add(session, "unit")
        kept.append(contextvars.copy_context())

    Sessions.run(unit)
    kept[0].run(Sessions.run, add, "later")
    assert names(rows) == {"unit", "later"}
    assert rows.pool.checkedout() == 0
