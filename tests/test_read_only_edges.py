"""Edges of a 25006 whose server is asked whether it takes writes (``takes_writes_asked``):
the failed transaction is rolled back to ask, then made failed again. Tried for real:

- in autocommit, a transaction the application began itself (``BEGIN READ ONLY``): the
  rollback ended it, and the statement sent next committed on its own where PostgreSQL refuses
  it (25P02) and the application's ``COMMIT`` commits nothing (psycopg, sync and async);
- a two-phase unit (``twophase=True``: psycopg's ``tpc_begin``, asyncpg's plain BEGIN);
- read-only by the session's own setting in autocommit, and ``postgresql_readonly=True`` there
  (which no driver applies outside a transaction: the write commits, as without the library);
- inside a savepoint (``begin_nested()``), where the savepoint is rolled back to instead, the
  server asked in the transaction and the savepoint failed again: the application rolls back
  to it and goes on, its transaction's other work kept (savepoints inside savepoints, and in
  autocommit a transaction begun by statement, too).

Each compared with a plain engine (no factory hooks it): the library commits nothing that
PostgreSQL alone would not have. Real server, real drivers, exact SQLSTATEs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import (
    ASYNC_DRIVERS,
    Base,
    assert_breaker_untouched,
    async_metadata_engine,
    metadata_engine,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")

WRITE = sa.text("INSERT INTO items (name) VALUES (:name)")
COUNT = sa.text("SELECT count(*) FROM items")
CONFIG = rdb.Config(failure_threshold=2, reset_timeout=60.0)
FAILED_TRANSACTION = "25P02"
SESSION_READ_ONLY = [
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET default_transaction_read_only = on",
]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from metadata_engine(pg_url, Base)


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(COUNT).scalar_one())


# -- sync (psycopg) --------------------------------------------------------------------------------
@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "factory"])
def test_a_transaction_begun_by_statement_in_autocommit_stays_failed(
    engine: sa.Engine, service: str, hooked: bool
) -> None:
    if hooked:
        rdb.ResilientSession(engine, service=service, config=CONFIG)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("BEGIN READ ONLY")
        with pytest.raises(sa_exc.DBAPIError) as refused:
            conn.execute(WRITE, {"name": "refused"})
        assert rdb.sqlstate_of(refused.value) == "25006"
        assert rdb.classify(refused.value) is rdb.Outcome.NOT_TRANSIENT
        with pytest.raises(sa_exc.DBAPIError) as after:
            conn.execute(WRITE, {"name": "after"})  # committed on its own before the fix
        assert rdb.sqlstate_of(after.value) == FAILED_TRANSACTION
        conn.exec_driver_sql("COMMIT")  # PostgreSQL: ROLLBACK
        conn.execute(WRITE, {"name": "autocommitted"})  # the connection is sound
    assert _count(engine) == 1


def test_a_two_phase_unit_refused_read_only_is_raised_at_once_and_stays_failed(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG, twophase=True)
    calls: list[rdb.Outcome] = []

    def unit(session: Session) -> None:
        session.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa_exc.DBAPIError) as refused:  # (swallowed by the unit)
            session.execute(WRITE, {"name": "refused"})
        assert rdb.sqlstate_of(refused.value) == "25006"
        calls.append(rdb.classify(refused.value))
        session.execute(WRITE, {"name": "after"})

    with pytest.raises(sa_exc.DBAPIError) as info:
        Sessions.run(unit)
    assert rdb.sqlstate_of(info.value) == FAILED_TRANSACTION
    assert calls == [rdb.Outcome.NOT_TRANSIENT]  # one attempt
    assert_breaker_untouched(service)
    assert _count(engine) == 0


@pytest.mark.parametrize("statement", SESSION_READ_ONLY)
def test_a_unit_read_only_by_its_sessions_setting_in_autocommit_is_raised_at_once(
    engine: sa.Engine, service: str, statement: str
) -> None:
    """The server reports the session's setting on, which the library takes for a server
    that takes no writes (docs/units-of-work.md, 25006): the pool is replaced, but an
    autocommit unit that sent a setting is not replayed, and nothing is committed."""
    Sessions = rdb.ResilientSession(
        engine.execution_options(isolation_level="AUTOCOMMIT"), service=service, config=CONFIG
    )
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.text(statement))
        session.execute(WRITE, {"name": "refused"})

    with pytest.raises(sa_exc.DBAPIError) as info:
        Sessions.run(unit)
    assert rdb.sqlstate_of(info.value) == "25006"
    assert calls == [1]
    assert rdb.health()["services"][service]["counters"]["retries"] == 0
    assert _count(engine) == 0


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "factory"])
def test_postgresql_readonly_in_autocommit_is_the_drivers_as_without_the_library(
    engine: sa.Engine, service: str, hooked: bool
) -> None:
    """psycopg begins no transaction in autocommit, so its read-only mode is not applied: the
    write commits, with the library as without it."""
    Sessions = (rdb.ResilientSession if hooked else sa.orm.sessionmaker)(
        engine.execution_options(isolation_level="AUTOCOMMIT"),
        **({"service": service} if hooked else {}),
    )
    with Sessions() as session:
        session.connection(execution_options={"postgresql_readonly": True})
        session.execute(WRITE, {"name": "written"})
    assert _count(engine) == 1


def refused_in_savepoints(conn: sa.Connection) -> None:
    """A write refused in a read-only savepoint inside another savepoint of ``conn``'s
    transaction, the refusal followed by a statement (25P02, the savepoint failed as
    PostgreSQL leaves it), then the savepoint rolled back to and the work gone on with: in
    the outer savepoint, after it, and in a new savepoint. Four rows written."""
    conn.execute(WRITE, {"name": "before"})
    with conn.begin_nested():
        conn.execute(WRITE, {"name": "in the outer savepoint"})
        inner = conn.begin_nested()
        conn.execute(sa.text("SET TRANSACTION READ ONLY"))  # (the savepoint's only)
        with pytest.raises(sa_exc.DBAPIError) as refused:
            conn.execute(WRITE, {"name": "refused"})
        assert rdb.sqlstate_of(refused.value) == "25006"
        assert rdb.classify(refused.value) is rdb.Outcome.NOT_TRANSIENT
        assert not refused.value.connection_invalidated
        with pytest.raises(sa_exc.DBAPIError) as after:
            conn.execute(WRITE, {"name": "after the refusal"})
        assert rdb.sqlstate_of(after.value) == FAILED_TRANSACTION
        inner.rollback()
        conn.execute(WRITE, {"name": "after the rollback"})
    with conn.begin_nested():
        conn.execute(WRITE, {"name": "in a new savepoint"})


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "factory"])
@pytest.mark.parametrize("autocommit", [False, True], ids=["transaction", "autocommit"])
def test_a_write_refused_in_a_savepoint_fails_the_savepoint_only(
    engine: sa.Engine, service: str, hooked: bool, autocommit: bool
) -> None:
    """Drop-in use: as PostgreSQL alone leaves it (a plain engine), with the server asked
    whether it takes writes in the savepoint (it does: the write is the application's)."""
    if hooked:
        rdb.ResilientSession(engine, service=service, config=CONFIG)
    with engine.connect() as opened:
        conn = opened.execution_options(isolation_level="AUTOCOMMIT") if autocommit else opened
        if autocommit:
            conn.exec_driver_sql("BEGIN")
        refused_in_savepoints(conn)
        if autocommit:
            conn.exec_driver_sql("COMMIT")
        else:
            conn.commit()
    assert _count(engine) == 4
    if hooked:
        assert_breaker_untouched(service)


def test_a_unit_whose_write_is_refused_in_a_savepoint_goes_on_from_it(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        refused_in_savepoints(session.connection())

    Sessions.run(unit)
    assert calls == [1]
    assert rdb.health()["services"][service]["counters"]["retries"] == 0
    assert _count(engine) == 4


# -- async (asyncpg, psycopg) ----------------------------------------------------------------------
@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def aengine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    async for engine in async_metadata_engine(pg_async_url, Base):
        yield engine


async def _acount(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(COUNT)).scalar_one())


@pytest.fixture(params=[False, True], ids=["plain", "factory"])
def ahooked(request: pytest.FixtureRequest, aengine: AsyncEngine, service: str) -> bool:
    """Whether the case runs with a factory made on ``aengine`` (its hooks on the engine) or
    on the plain engine, as PostgreSQL alone leaves it."""
    if request.param:
        rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    return bool(request.param)


@pytest.mark.asyncio
async def test_async_a_transaction_begun_by_statement_in_autocommit_stays_failed(
    aengine: AsyncEngine, service: str, ahooked: bool
) -> None:
    async with aengine.connect() as opened:
        conn = await opened.execution_options(isolation_level="AUTOCOMMIT")
        await conn.exec_driver_sql("BEGIN READ ONLY")
        with pytest.raises(sa_exc.DBAPIError) as refused:
            await conn.execute(WRITE, {"name": "refused"})
        assert rdb.sqlstate_of(refused.value) == "25006"
        assert rdb.classify(refused.value) is rdb.Outcome.NOT_TRANSIENT
        with pytest.raises(sa_exc.DBAPIError) as after:
            await conn.execute(WRITE, {"name": "after"})
        assert rdb.sqlstate_of(after.value) == FAILED_TRANSACTION
        await conn.exec_driver_sql("COMMIT")
        await conn.execute(WRITE, {"name": "autocommitted"})
    assert await _acount(aengine) == 1


@pytest.mark.asyncio
async def test_async_a_two_phase_unit_refused_read_only_is_raised_at_once_and_stays_failed(
    aengine: AsyncEngine, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG, twophase=True)
    calls: list[rdb.Outcome] = []

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa_exc.DBAPIError) as refused:
            await session.execute(WRITE, {"name": "refused"})
        assert rdb.sqlstate_of(refused.value) == "25006"
        calls.append(rdb.classify(refused.value))
        await session.execute(WRITE, {"name": "after"})

    with pytest.raises(sa_exc.DBAPIError) as info:
        await Sessions.run(unit)
    assert rdb.sqlstate_of(info.value) == FAILED_TRANSACTION
    assert calls == [rdb.Outcome.NOT_TRANSIENT]
    assert_breaker_untouched(service)
    assert await _acount(aengine) == 0


@pytest.mark.asyncio
async def test_async_a_write_refused_in_a_savepoint_fails_the_savepoint_only(
    aengine: AsyncEngine, service: str, ahooked: bool
) -> None:
    async with aengine.connect() as conn:
        await conn.run_sync(refused_in_savepoints)
        await conn.commit()
    assert await _acount(aengine) == 4
    if ahooked:
        assert_breaker_untouched(service)


@pytest.mark.asyncio
async def test_async_a_unit_whose_write_is_refused_in_a_savepoint_goes_on_from_it(
    aengine: AsyncEngine, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> None:
        calls.append(1)
        await session.run_sync(lambda s: refused_in_savepoints(s.connection()))

    await Sessions.run(unit)
    assert calls == [1]
    assert rdb.health()["services"][service]["counters"]["retries"] == 0
    assert await _acount(aengine) == 4
