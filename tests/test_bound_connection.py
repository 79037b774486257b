"""A factory bound to a ``Connection`` that was checked out before the factory was made
(``conn = engine.connect(); ResilientSession(conn)``), or bound to one later with
``configure(bind=conn)``: that connection never passed the factory's checkout hook, so it is
prepared for the commit protocol when the factory is bound to it. Its units' lost COMMIT
answers are settled as any unit's: a read replayed, a write verified by its marker (once)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import async_connect_args, create_ledger, ledger_rows
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    return create_ledger(pg_server, pg_database, markers=True)


@pytest.fixture
def proxied(fault_proxy: FaultProxy, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(fault_proxy.url(database), connect_args={"connect_timeout": 2})
    yield engine
    engine.dispose()


def bound_to_an_earlier_connection(
    engine: sa.Engine, service: str, how: str
) -> tuple[sa.Connection, rdb.ResilientSession[Session]]:
    conn = engine.connect()  # checked out before the engine had any resilient factory
    if how == "constructor":
        return conn, rdb.ResilientSession(conn, service=service)
    Sessions = rdb.ResilientSession(service=service)
    Sessions.configure(bind=conn)
    return conn, Sessions


@pytest.mark.parametrize("how", ["constructor", "configure"])
def test_a_read_on_an_earlier_connection_with_a_lost_answer_is_replayed(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, how: str
) -> None:
    conn, Sessions = bound_to_an_earlier_connection(proxied, service, how)
    calls = []

    def read(session: Session) -> int:
        calls.append(1)
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    try:
        fault_proxy.lose_commit_answer()
        assert Sessions.run(read) == 1  # not CommitOutcomeUnknownError
    finally:
        conn.close()
    assert fault_proxy.commits_lost == 1
    assert calls == [1, 1]


@pytest.mark.parametrize("how", ["constructor", "configure"])
def test_a_write_on_an_earlier_connection_with_a_lost_answer_is_verified_once(
    *,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    database: str,
    service: str,
    how: str,
) -> None:
    conn, Sessions = bound_to_an_earlier_connection(proxied, service, how)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def write(session: Session) -> str:
        calls.append(1)
        session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
        return unit

    try:
        fault_proxy.lose_commit_answer()
        assert Sessions.run(write) == unit  # verified by its marker
        # the connection's transaction, whose COMMIT failed, is ended: the next unit begins
        # (it raised InvalidRequestError, "already initialized a SQLAlchemy Transaction()")
        assert Sessions.run(lambda session: session.execute(sa.text("SELECT 7")).scalar()) == 7
    finally:
        conn.close()
    assert fault_proxy.commits_lost == 1
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


# -- async: the AsyncConnection an async factory is bound to ------------------------------------
@pytest_asyncio.fixture(params=["asyncpg", "psycopg"])
async def aproxied(
    request: pytest.FixtureRequest, fault_proxy: FaultProxy, database: str
) -> AsyncIterator[AsyncEngine]:
    driver = request.param
    engine = create_async_engine(
        fault_proxy.url(database, driver=driver), connect_args=async_connect_args(driver, 2)
    )
    yield engine
    await engine.dispose()


@pytest.mark.asyncio
async def test_an_async_read_on_an_earlier_connection_with_a_lost_answer_is_replayed(
    aproxied: AsyncEngine, fault_proxy: FaultProxy, service: str
) -> None:
    conn = await aproxied.connect()  # checked out before the engine had a resilient factory
    Sessions = rdb.AsyncResilientSession(conn, service=service)
    calls = []

    async def read(session: AsyncSession) -> int:
        calls.append(1)
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    try:
        fault_proxy.lose_commit_answer()
        assert await Sessions.run(read) == 1  # not CommitOutcomeUnknownError
    finally:
        await conn.close()
    assert fault_proxy.commits_lost == 1
    assert calls == [1, 1]


@pytest.mark.asyncio
async def test_an_async_write_on_an_earlier_connection_with_a_lost_answer_is_verified_once(
    aproxied: AsyncEngine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    database: str,
    service: str,
) -> None:
    conn = await aproxied.connect()
    Sessions = rdb.AsyncResilientSession(conn, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def write(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
        return unit

    async def read(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 7"))).scalar_one())

    try:
        fault_proxy.lose_commit_answer()
        assert await Sessions.run(write) == unit  # verified by its marker
        assert await Sessions.run(read) == 7  # the failed COMMIT's transaction was ended
    finally:
        await conn.close()
    assert fault_proxy.commits_lost == 1
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1
