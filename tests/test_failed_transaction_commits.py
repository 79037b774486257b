"""A COMMIT that the code of a unit (or of a ``with_self_healing`` operation) sends itself, of a
transaction that had failed: the code caught a database error and went on.

PostgreSQL answers such a COMMIT with ROLLBACK, not an error, and both drivers take that for
done: the transaction's writes were gone while the unit went on and reported done. The unit's
final COMMIT raised 25P02 already; its own ``session.commit()`` midway, and a drop-in block's
COMMIT inside an operation, raise it now too, on psycopg (sync and async) and asyncpg. Drop-in
code outside any unit or operation keeps plain SQLAlchemy's behaviour.

Real server, real errors (a division by zero the code catches), rows counted on the server.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, create_ledger, ledger_rows
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

INSERT = sa.text("INSERT INTO ledger (unit, note) VALUES (:u, :n)")
#: fails on the server (22012): the transaction is aborted from then on
FAILING = "SELECT 1/0"


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    return create_ledger(pg_server, pg_database, markers=True)


@pytest.fixture
def engine(pg_server: PostgresServer, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_server.url(database), pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def async_engine(
    pg_server: PostgresServer, database: str, async_driver: str
) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(
        pg_server.url(database, driver=async_driver), pool_size=1, max_overflow=0
    )
    yield engine
    await engine.dispose()


def notes(server: PostgresServer, database: str, unit: str) -> list[str]:
    found = server.execute(
        "SELECT note FROM ledger WHERE unit = %s ORDER BY id", params=(unit,), database=database
    )
    return [str(row[0]) for row in found]


def assert_refused(raised: BaseException | None) -> None:
    """Raised 25P02, not transient (a replay would meet the same code)."""
    assert isinstance(raised, sa.exc.DBAPIError), f"reported done: {raised!r}"
    assert rdb.sqlstate_of(raised) == "25P02"
    assert not rdb.is_transient(raised)


def swallow_a_failure(session: Session) -> None:
    with contextlib.suppress(sa.exc.DBAPIError):  # "handled": the transaction failed all the same
        session.connection().exec_driver_sql(FAILING)


async def aswallow_a_failure(session: AsyncSession) -> None:
    with contextlib.suppress(sa.exc.DBAPIError):
        await (await session.connection()).exec_driver_sql(FAILING)


# -- sync ------------------------------------------------------------------------------------------
def test_a_units_own_commit_of_a_failed_transaction_is_not_reported_done(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """The unit writes, catches a database error, calls ``session.commit()`` and writes more:
    the COMMIT was answered ROLLBACK, the first write lost, and the unit reported done."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    def work(session: Session) -> str:
        calls.append(1)
        session.execute(INSERT, {"u": unit, "n": "first"})
        swallow_a_failure(session)
        session.commit()
        session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    with pytest.raises(sa.exc.DBAPIError) as raised:
        Sessions.run(work)
    assert_refused(raised.value)
    assert calls == [1]
    assert notes(pg_server, database, unit) == []
    # the one pooled connection is out of the failed transaction
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 7")).scalar_one()) == 7


@pytest.mark.parametrize("block", ["session", "begin"])
def test_an_operations_drop_in_commit_of_a_failed_transaction_is_not_reported_done(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str, block: str
) -> None:
    """A ``with_self_healing`` operation whose drop-in block writes, catches a database error
    and commits (``session.commit()``, or the end of a ``Session.begin()`` block)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"

    def operation() -> str:
        if block == "begin":
            with Sessions.begin() as session:
                session.execute(INSERT, {"u": unit, "n": "first"})
                swallow_a_failure(session)
        else:
            with Sessions() as session:
                session.execute(INSERT, {"u": unit, "n": "first"})
                swallow_a_failure(session)
                session.commit()
        return "done"

    with pytest.raises(sa.exc.DBAPIError) as raised:
        rdb.with_self_healing(operation, service=service)
    assert_refused(raised.value)
    assert notes(pg_server, database, unit) == []
    with Sessions() as session:
        assert session.execute(sa.text("SELECT 7")).scalar_one() == 7


def test_a_units_own_commit_of_a_sound_transaction_is_unchanged(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """A failure the unit caught inside a savepoint leaves its transaction sound: its own
    COMMIT commits."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"

    def work(session: Session) -> str:
        session.execute(INSERT, {"u": unit, "n": "first"})
        with contextlib.suppress(sa.exc.DBAPIError), session.begin_nested():
            session.connection().exec_driver_sql(FAILING)
        session.commit()
        session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    assert Sessions.run(work) == "done"
    assert notes(pg_server, database, unit) == ["first", "second"]


# -- async, both drivers ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_an_async_units_own_commit_of_a_failed_transaction_is_not_reported_done(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    async def work(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(INSERT, {"u": unit, "n": "first"})
        await aswallow_a_failure(session)
        await session.commit()
        await session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    with pytest.raises(sa.exc.DBAPIError) as raised:
        await Sessions.run(work)
    assert_refused(raised.value)
    assert calls == [1]
    assert notes(pg_server, database, unit) == []

    async def read(session: AsyncSession) -> Any:
        return (await session.execute(sa.text("SELECT 7"))).scalar_one()

    assert await Sessions.run(read) == 7


@pytest.mark.asyncio
@pytest.mark.parametrize("block", ["session", "begin"])
async def test_an_async_operations_drop_in_commit_of_a_failed_transaction_is_not_reported_done(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str, block: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"

    async def operation() -> str:
        if block == "begin":
            async with Sessions.begin() as session:
                await session.execute(INSERT, {"u": unit, "n": "first"})
                await aswallow_a_failure(session)
        else:
            async with Sessions() as session:
                await session.execute(INSERT, {"u": unit, "n": "first"})
                await aswallow_a_failure(session)
                await session.commit()
        return "done"

    with pytest.raises(sa.exc.DBAPIError) as raised:
        await rdb.with_self_healing(operation, service=service)
    assert_refused(raised.value)
    assert notes(pg_server, database, unit) == []
    assert ledger_rows(pg_server, database, unit) == 0
    async with Sessions() as session:
        assert (await session.execute(sa.text("SELECT 7"))).scalar_one() == 7
