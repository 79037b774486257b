"""Work started inside a unit (a thread given a copy of its context, an asyncio task) runs its
own units: the library's per-unit context variables, which such work inherits, do not make it
part of a unit it does not run in, nor of one that has ended."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy

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


# -- a drop-in transaction waiting for its connection ---------------------------------------------
def test_a_unit_of_another_engine_in_a_drop_in_block_connects_under_its_own_breaker(
    rows: sa.Engine, pg_url: str, service: str
) -> None:
    """A drop-in block of one factory begun, not connected yet (its breaker opened meanwhile),
    and a unit of another factory, on an engine of its own, run inside it: the unit's new
    connection is its own factory's connect, not the block's, which the other service's
    open circuit refused."""
    Blocks = rdb.ResilientSession(rows, service=service)
    other = sa.create_engine(pg_url)
    try:
        Others = rdb.ResilientSession(other, service=f"{service}-other")
        with Blocks.begin() as block:
            rdb.open_breaker(service, reason="the block's service only")
            assert Others.run(add, "other") is not block
        assert names(rows) == {"other"}
    finally:
        other.dispose()


@pytest.mark.parametrize("async_driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_a_task_of_a_drop_in_block_connects_another_engine_as_itself(
    rows: sa.Engine, pg_async_url: str, made_async_engines: list[AsyncEngine], service: str
) -> None:
    """An ``async with Session.begin()`` block (a request's), not connected yet, its breaker
    opened meanwhile, gathers tasks that use another engine's connections (Core, on an engine
    with a factory of its own): their connects are theirs, not the block's, which the block's
    service's open circuit refused (the tasks inherit the block's context)."""
    engines = [create_async_engine(pg_async_url) for _ in range(2)]
    made_async_engines.extend(engines)
    Blocks = rdb.AsyncResilientSession(engines[0], service=service)
    rdb.AsyncResilientSession(engines[1], service=f"{service}-other")

    async def task(name: str) -> None:
        async with engines[1].begin() as conn:
            await conn.execute(sa.text("INSERT INTO ctx_rows VALUES (:n)"), {"n": name})

    async with Blocks.begin():
        rdb.open_breaker(service, reason="the block's service only")
        await asyncio.gather(task("first"), task("second"))
    assert names(rows) == {"first", "second"}


@pytest.mark.parametrize("bound", ["factory's engine", "session's own bind"])
def test_a_drop_in_blocks_own_connect_is_still_put_to_its_breaker(
    rows: sa.Engine, pg_url: str, service: str, bound: str
) -> None:
    """The other side: the block's own first connect (a new connection, of the factory's
    engine or of one the session alone is bound to) is the block's, put to its breaker (open
    since the block began: refused)."""
    Blocks = rdb.ResilientSession(rows, service=service)
    other = sa.create_engine(pg_url)
    try:
        session = Blocks() if bound == "factory's engine" else Blocks(bind=other)
        rows.dispose()  # (no pooled connection: the block's connect is a new one)
        with session, session.begin():
            rdb.open_breaker(service, reason="the block's own connect")
            with pytest.raises(rdb.CircuitOpenError):
                add(session, "refused")
    finally:
        other.dispose()
    assert names(rows) == set()


# -- a task started while a unit commits -------------------------------------------------------
@pytest.mark.parametrize("where", ["after_commit", "before_commit too", "unit's code"])
@pytest.mark.parametrize("async_driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_a_task_started_in_a_unit_has_its_lost_answer_said_after_it(
    rows: sa.Engine,
    *,
    async_driver: str,
    where: str,
    pg_async_url: str,
    made_async_engines: list[AsyncEngine],
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """A unit's ``after_commit`` listener starts a task (an outbox's publisher), which writes
    in a drop-in block of another factory once the unit has returned; that block's COMMIT
    loses its answer: an unknown outcome of drop-in code, counted under its service and
    raised as one, not taken for the unit's own COMMIT (the task inherited the unit's
    context as the unit committed). Also where the unit's session has a ``before_commit``
    listener (the unit's COMMIT step then starts in SQLAlchemy's ``commit()``), and for a
    task the unit's code starts (not the unit's own COMMIT midway: its attempt has ended)."""
    rdb.install_commit_markers(rows)
    plain = create_async_engine(pg_async_url)
    proxied = create_async_engine(fault_proxy.url(pg_database, driver=async_driver))
    made_async_engines.extend((plain, proxied))
    Units = rdb.AsyncResilientSession(plain, service=service)
    Blocks = rdb.AsyncResilientSession(proxied, service=f"{service}-blocks")
    returned = asyncio.Event()
    started: list[asyncio.Task[None]] = []

    async def publish() -> None:
        await returned.wait()
        async with Blocks.begin() as session:
            await session.execute(sa.text("INSERT INTO ctx_rows VALUES ('published')"))
            fault_proxy.lose_commit_answer()

    def after_commit(session: Session) -> None:
        started.append(asyncio.get_running_loop().create_task(publish()))

    async def unit(session: AsyncSession) -> None:
        if where == "unit's code":
            started.append(asyncio.create_task(publish()))
        else:
            sa.event.listen(session.sync_session, "after_commit", after_commit)
        if where == "before_commit too":
            sa.event.listen(session.sync_session, "before_commit", lambda _: None)
        await session.execute(sa.text("INSERT INTO ctx_rows VALUES ('unit')"))

    await Units.run(unit)
    returned.set()
    with pytest.raises(sa.exc.DBAPIError) as lost:
        await started[0]
    assert fault_proxy.commits_lost == 1
    assert rdb.classify(lost.value) is rdb.Outcome.COMMIT_UNKNOWN
    counters = rdb.health()["services"][f"{service}-blocks"]["counters"]
    assert counters["unknown_commits"] == 1
    said = [(e.name, e.service) for e in events if e.name == "commit_unknown"]
    assert said == [("commit_unknown", f"{service}-blocks")]
