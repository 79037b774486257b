"""A unit whose code catches a disconnect and goes on: a statement that may fail, in a
``begin_nested()`` block (as docs/units-of-work.md advises for statements that may fail), meets a
connection the server ended (``pg_terminate_backend``). The transaction went with the
connection, so SQLAlchemy raises ``PendingRollbackError`` at the unit's next statement or at
its COMMIT: that error was raised after one attempt, not transient, with no line, though nothing
had been committed and a replay heals it. The attempt now fails with the disconnect, and is
replayed as for it. Real server, real terminated backends; psycopg and asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer

FAST = rdb.Config(initial_delay=0.001, max_delay=0.002, circuit_breaker=False)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE log (id bigserial PRIMARY KEY, unit text NOT NULL)")
    yield eng
    eng.dispose()


def logged(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT unit FROM log ORDER BY id")))


def catching_a_disconnect(session: Session, server: PostgresServer, *, first: bool) -> list[str]:
    """The code of a unit (or operation): on its first attempt the server ends the session's
    backend; a statement that may fail, in a savepoint, meets that, and the code catches the
    error and goes on. Returns how the errors it caught were classified."""
    pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
    if first:
        server.execute(f"SELECT pg_terminate_backend({int(pid)})")
    try:
        with session.begin_nested():
            session.execute(sa.text("INSERT INTO log (unit) VALUES ('maybe')"))
    except sa.exc.DBAPIError as err:
        return [rdb.classify(err).name]
    return []


@pytest.mark.parametrize("then", ["a statement", "the commit"])
def test_a_caught_disconnect_is_replayed(
    engine: sa.Engine, pg_server: PostgresServer, service: str, then: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=FAST)
    calls: list[int] = []
    caught: list[str] = []

    def unit(session: Session) -> int:
        calls.append(1)
        caught.extend(catching_a_disconnect(session, pg_server, first=len(calls) == 1))
        if then == "a statement":
            session.execute(sa.text("INSERT INTO log (unit) VALUES ('after')"))
        return len(calls)

    assert Sessions.run(unit) == 2
    assert caught == ["DISCONNECT"]
    expected = ["maybe", "after"] if then == "a statement" else ["maybe"]
    assert logged(engine) == expected
    assert rdb.health()["services"][service]["counters"]["retries"] == 1


def test_a_caught_disconnect_is_replayed_after_a_business_error_caught_since(
    engine: sa.Engine, pg_server: PostgresServer, service: str
) -> None:
    """The code catches the disconnect, then a business error (a unique violation) on another
    connection of the unit's engine, and goes on: the unit's next statement meets
    ``PendingRollbackError``. The disconnect is what ended the transaction, and a replay heals
    it, though the last error caught is no transient one (why the attempt keeps the first
    disconnect apart from its last error: ``AttemptRecord.disconnected``)."""
    Sessions = rdb.ResilientSession(engine, service=service, config=FAST)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE once (id int PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO once VALUES (1)")
    calls: list[int] = []
    caught: list[str] = []

    def unit(session: Session) -> int:
        calls.append(1)
        caught.extend(catching_a_disconnect(session, pg_server, first=len(calls) == 1))
        if len(calls) == 1:
            with contextlib.suppress(sa.exc.IntegrityError), engine.begin() as other:
                other.exec_driver_sql("INSERT INTO once VALUES (1)")
            caught.append("INTEGRITY")
        session.execute(sa.text("INSERT INTO log (unit) VALUES ('after')"))
        return len(calls)

    assert Sessions.run(unit) == 2
    assert caught == ["DISCONNECT", "INTEGRITY"]
    assert logged(engine) == ["maybe", "after"]
    assert rdb.health()["services"][service]["counters"]["retries_by_class"] == {"disconnect": 1}


def test_a_caught_disconnect_with_retries_spent_raises_the_disconnect(
    engine: sa.Engine, pg_server: PostgresServer, service: str
) -> None:
    """(The caller hears what ended the transaction, not SQLAlchemy's PendingRollbackError.)"""
    Sessions = rdb.ResilientSession(engine, service=service, config=FAST.replace(max_retries=1))

    def unit(session: Session) -> None:
        pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
        pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        with contextlib.suppress(sa.exc.DBAPIError):
            session.execute(sa.text("INSERT INTO log (unit) VALUES ('lost')"))
        session.execute(sa.text("SELECT 1"))

    with pytest.raises(sa.exc.OperationalError) as raised:
        Sessions.run(unit)
    assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
    assert logged(engine) == []


@pytest.mark.asyncio
async def test_an_async_caught_disconnect_is_replayed(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service, config=FAST)
        calls: list[int] = []

        async def unit(session: AsyncSession) -> int:
            calls.append(1)
            pid = await session.scalar(sa.text("SELECT pg_backend_pid()"))
            if len(calls) == 1:
                pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
            try:
                async with session.begin_nested():
                    await session.execute(sa.text("INSERT INTO log (unit) VALUES ('maybe')"))
            except sa.exc.DBAPIError:
                pass
            await session.execute(sa.text("INSERT INTO log (unit) VALUES ('after')"))
            return len(calls)

        assert await Sessions.run(unit) == 2
    finally:
        await aengine.dispose()
    assert logged(engine) == ["maybe", "after"]


def test_an_operation_with_a_caught_disconnect_is_replayed(
    engine: sa.Engine, pg_server: PostgresServer, service: str
) -> None:
    """The same in a ``with_self_healing`` operation's drop-in block."""
    Sessions = rdb.ResilientSession(engine, service=service, config=FAST)
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=FAST)
    def operation() -> int:
        calls.append(1)
        with Sessions.begin() as session:
            catching_a_disconnect(session, pg_server, first=len(calls) == 1)
            session.execute(sa.text("INSERT INTO log (unit) VALUES ('after')"))
        return len(calls)

    assert operation() == 2
    assert logged(engine) == ["maybe", "after"]


@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout and TaskGroup: 3.11+")
async def test_a_caught_timeout_is_no_disconnect_to_replay(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """A unit bounds part of its work with ``asyncio.timeout``, catches the ``TimeoutError``
    and goes on. SQLAlchemy takes the cancelled statement's connection for lost, and the unit's
    next statement raises ``PendingRollbackError``, as plain SQLAlchemy's does: it was put in
    the place of the disconnect "caught" (the cancellation itself), a bare ``CancelledError``
    nobody sent, which a ``TaskGroup`` took for the unit's task being cancelled: a lost write
    gone silently."""
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service, config=FAST)

        async def unit(session: AsyncSession) -> None:
            # connected first, and a deadline that a busy machine's scheduling doesn't reach
            # before the statement runs: it must cut the statement, not the connect
            await session.execute(sa.text("SELECT 1"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await session.execute(sa.text("SELECT pg_sleep(5)"))
            await session.execute(sa.text("INSERT INTO log (unit) VALUES ('after')"))

        outcome: list[BaseException] = []

        async def seen() -> None:
            try:
                await Sessions.run(unit)
            except BaseException as exc:
                outcome.append(exc)
                raise

        with pytest.raises(Exception, match="unhandled errors in a TaskGroup"):
            async with asyncio.TaskGroup() as tasks:  # (its failure reaches the group)
                tasks.create_task(seen())
        assert [type(e) for e in outcome] == [sa.exc.PendingRollbackError]
    finally:
        await aengine.dispose()
    assert logged(engine) == []
