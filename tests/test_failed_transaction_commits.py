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

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, create_ledger, driver_connection, ledger_rows
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

INSERT = sa.text("INSERT INTO ledger (unit, note) VALUES (:u, :n)")
#: fails on the server (22012): the transaction is aborted from then on
FAILING = "SELECT 1/0"
#: what a refused COMMIT raises: SQLAlchemy's error, or the driver's own for a statement sent on
#: the driver's connection
REFUSED = (sa.exc.DBAPIError, psycopg.Error, asyncpg.PostgresError)


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


def assert_refused(raised: BaseException | None, *, raw: bool = False) -> None:
    """Raised 25P02, not transient (a replay would meet the same code); ``raw``: by a
    statement sent on the driver's own connection, which raises the driver's error."""
    expected = (psycopg.Error, asyncpg.PostgresError) if raw else sa.exc.DBAPIError
    assert isinstance(raised, expected), f"reported done: {raised!r}"
    assert rdb.sqlstate_of(raised) == "25P02"
    assert not rdb.is_transient(raised)


def swallow_a_failure(session: Session) -> None:
    with contextlib.suppress(sa.exc.DBAPIError):  # "handled": the transaction failed all the same
        session.connection().exec_driver_sql(FAILING)


async def aswallow_a_failure(session: AsyncSession) -> None:
    with contextlib.suppress(sa.exc.DBAPIError):
        await (await session.connection()).exec_driver_sql(FAILING)


# -- sync ------------------------------------------------------------------------------------------
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


# -- a COMMIT sent as a statement ------------------------------------------------------------------
#: the unit's own code commits its failed transaction: ``session.commit()``, or a statement
#: (each noted as a COMMIT, see ``_statements.COMMITS``) through SQLAlchemy or psycopg's own
#: connection
SYNC_COMMIT_STATEMENTS: dict[str, Any] = {
    "session-commit": lambda s: s.commit(),
    "text-commit": lambda s: s.execute(sa.text("COMMIT")),
    "text-end": lambda s: s.execute(sa.text("END")),
    "text-commit-work": lambda s: s.execute(sa.text("commit work")),
    "text-commit-and-chain": lambda s: s.execute(sa.text("COMMIT AND CHAIN")),
    "driver-sql-commit": lambda s: s.connection().exec_driver_sql("COMMIT"),
    "raw-commit": lambda s: driver_connection(s).execute("COMMIT"),
    "raw-cursor-end": lambda s: driver_connection(s).cursor().execute("END WORK"),
}


@pytest.mark.parametrize("way", sorted(SYNC_COMMIT_STATEMENTS))
def test_a_units_commit_statement_of_a_failed_transaction_is_not_reported_done(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    """The unit writes, catches a database error, commits (``session.commit()`` or a COMMIT
    statement) and writes more: the server answered ROLLBACK, the first write lost, and the
    unit reported done. The one pooled connection is out of the failed transaction after."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    def work(session: Session) -> str:
        calls.append(1)
        session.execute(INSERT, {"u": unit, "n": "first"})
        swallow_a_failure(session)
        SYNC_COMMIT_STATEMENTS[way](session)
        session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    with pytest.raises(REFUSED) as raised:
        Sessions.run(work)
    assert_refused(raised.value, raw=way.startswith("raw"))
    assert calls == [1]
    assert notes(pg_server, database, unit) == []
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 7")).scalar_one()) == 7


@pytest.mark.parametrize("way", ["text-commit", "raw-commit"])
def test_an_operations_commit_statement_of_a_failed_transaction_is_not_reported_done(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"

    def operation() -> str:
        with Sessions() as session:
            session.execute(INSERT, {"u": unit, "n": "first"})
            swallow_a_failure(session)
            SYNC_COMMIT_STATEMENTS[way](session)
            session.commit()
        return "done"

    with pytest.raises(REFUSED) as raised:
        rdb.with_self_healing(operation, service=service)
    assert_refused(raised.value, raw=way.startswith("raw"))
    assert notes(pg_server, database, unit) == []
    with Sessions() as session:
        assert session.execute(sa.text("SELECT 7")).scalar_one() == 7


@pytest.mark.parametrize("way", ["text-commit", "raw-commit"])
def test_a_commit_statement_of_a_failed_transaction_outside_units_is_plain(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    """Drop-in code outside any unit or operation: answered ROLLBACK, raised nothing, as
    plain SQLAlchemy and psycopg do."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    with Sessions() as session:
        session.execute(INSERT, {"u": unit, "n": "first"})
        swallow_a_failure(session)
        SYNC_COMMIT_STATEMENTS[way](session)
        session.rollback()
        session.execute(INSERT, {"u": unit, "n": "second"})
        session.commit()
    assert notes(pg_server, database, unit) == ["second"]


def test_a_units_commit_statement_of_a_sound_transaction_is_unchanged(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"

    def work(session: Session) -> str:
        session.execute(INSERT, {"u": unit, "n": "first"})
        with contextlib.suppress(sa.exc.DBAPIError), session.begin_nested():
            session.connection().exec_driver_sql(FAILING)
        session.execute(sa.text("COMMIT"))
        session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    assert Sessions.run(work) == "done"
    assert notes(pg_server, database, unit) == ["first", "second"]


@pytest.mark.parametrize("way", ["driver-sql", "raw"])
def test_a_units_commit_statement_after_a_rollback_to_a_savepoint_commits(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    """A text that rolls the failed transaction back to a savepoint before its COMMIT, sent in
    the failed transaction: the transaction is sound again when the COMMIT comes, which
    commits."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    recover = "ROLLBACK TO SAVEPOINT before_failure; /* then */ COMMIT"

    def work(session: Session) -> str:
        session.execute(INSERT, {"u": unit, "n": "first"})
        session.connection().exec_driver_sql("SAVEPOINT before_failure")
        swallow_a_failure(session)
        if way == "raw":
            driver_connection(session).execute(recover)
        else:
            session.connection().exec_driver_sql(recover)
        session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    assert Sessions.run(work) == "done"
    assert notes(pg_server, database, unit) == ["first", "second"]


async def _araw(session: AsyncSession) -> Any:
    return (await (await session.connection()).get_raw_connection()).driver_connection


async def _driver_sql(session: AsyncSession, statement: str) -> object:
    return await (await session.connection()).exec_driver_sql(statement)


async def _raw_execute(session: AsyncSession, statement: str) -> object:
    return await (await _araw(session)).execute(statement)


ASYNC_COMMIT_STATEMENTS: dict[str, Any] = {
    "session-commit": lambda s: s.commit(),
    "text-commit": lambda s: s.execute(sa.text("COMMIT")),
    "text-end": lambda s: s.execute(sa.text("END")),
    "text-commit-work": lambda s: s.execute(sa.text("commit work")),
    "text-commit-and-chain": lambda s: s.execute(sa.text("COMMIT AND CHAIN")),
    "driver-sql-commit": lambda s: _driver_sql(s, "COMMIT"),
    "raw-commit": lambda s: _raw_execute(s, "COMMIT"),
    "raw-end-work": lambda s: _raw_execute(s, "END WORK"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("way", sorted(ASYNC_COMMIT_STATEMENTS))
async def test_an_async_units_commit_statement_of_a_failed_transaction_is_not_reported_done(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    async def work(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(INSERT, {"u": unit, "n": "first"})
        await aswallow_a_failure(session)
        await ASYNC_COMMIT_STATEMENTS[way](session)
        await session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    with pytest.raises(REFUSED) as raised:
        await Sessions.run(work)
    assert_refused(raised.value, raw=way.startswith("raw"))
    assert calls == [1]
    assert notes(pg_server, database, unit) == []

    async def read(session: AsyncSession) -> Any:
        return (await session.execute(sa.text("SELECT 7"))).scalar_one()

    assert await Sessions.run(read) == 7


ASYNCPG_ROW_METHODS: dict[str, Any] = {
    "fetch": lambda raw, statement: raw.fetch(statement),
    "fetchrow": lambda raw, statement: raw.fetchrow(statement),
    "fetchval": lambda raw, statement: raw.fetchval(statement, timeout=30),
    "fetchmany": lambda raw, statement: raw.fetchmany(statement, [()]),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("async_driver", ["asyncpg"])
@pytest.mark.parametrize("method", sorted(ASYNCPG_ROW_METHODS))
async def test_an_async_units_commit_through_asyncpgs_row_methods_of_a_failed_transaction(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str, method: str
) -> None:
    """asyncpg's ``fetch``, ``fetchrow``, ``fetchval`` and ``fetchmany`` on the driver's own
    connection return rows, not the command tag: a COMMIT of a failed transaction sent through
    them, answered ROLLBACK, was taken for done, and the unit reported done with its writes
    lost. Such a COMMIT of a unit's code is sent through a statement prepared for it, whose
    tag is read: refused (25P02) as ``execute("COMMIT")``'s is, and not replayed."""
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    async def work(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(INSERT, {"u": unit, "n": "first"})
        await aswallow_a_failure(session)
        await ASYNCPG_ROW_METHODS[method](await _araw(session), "COMMIT")
        await session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    with pytest.raises(REFUSED) as raised:
        await Sessions.run(work)
    assert_refused(raised.value, raw=True)
    assert calls == [1]
    assert notes(pg_server, database, unit) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("async_driver", ["asyncpg"])
@pytest.mark.parametrize("method", sorted(ASYNCPG_ROW_METHODS))
async def test_an_async_units_commit_through_asyncpgs_row_methods_of_a_sound_transaction(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str, method: str
) -> None:
    """The same COMMIT of a sound transaction commits, returns what the method returns for it
    (no rows), and the unit goes on in a new transaction (its part committed: not replayable)."""
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    returned: list[Any] = []

    async def work(session: AsyncSession) -> str:
        await session.execute(INSERT, {"u": unit, "n": "first"})
        returned.append(await ASYNCPG_ROW_METHODS[method](await _araw(session), "COMMIT"))
        await session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    assert await Sessions.run(work) == "done"
    assert returned == [{"fetch": [], "fetchmany": []}.get(method)]
    assert notes(pg_server, database, unit) == ["first", "second"]


@pytest.mark.asyncio
@pytest.mark.parametrize("way", ["text-commit", "raw-commit"])
async def test_an_async_operations_commit_statement_of_a_failed_transaction_is_not_reported_done(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"

    async def operation() -> str:
        async with Sessions() as session:
            await session.execute(INSERT, {"u": unit, "n": "first"})
            await aswallow_a_failure(session)
            await ASYNC_COMMIT_STATEMENTS[way](session)
            await session.commit()
        return "done"

    with pytest.raises(REFUSED) as raised:
        await rdb.with_self_healing(operation, service=service)
    assert_refused(raised.value, raw=way.startswith("raw"))
    assert notes(pg_server, database, unit) == []
    async with Sessions() as session:
        assert (await session.execute(sa.text("SELECT 7"))).scalar_one() == 7


@pytest.mark.asyncio
@pytest.mark.parametrize("way", ["text-commit", "raw-commit"])
async def test_an_async_commit_statement_of_a_failed_transaction_outside_units_is_plain(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    async with Sessions() as session:
        await session.execute(INSERT, {"u": unit, "n": "first"})
        await aswallow_a_failure(session)
        await ASYNC_COMMIT_STATEMENTS[way](session)
        await session.rollback()
        await session.execute(INSERT, {"u": unit, "n": "second"})
        await session.commit()
    assert notes(pg_server, database, unit) == ["second"]


# -- a failed transaction that wrote nothing, without markers --------------------------------------
#: the unit's own COMMIT of a transaction that sent nothing judged to write asks the server
#: first whether it holds a transaction id (see ``_commit._XID_ASSIGNED_SQL``); without the
#: markers no ticket settles it. In a failed transaction that question fails itself
#: (asyncpg's InFailedSQLTransactionError) or is not asked (psycopg's status): either way the
#: COMMIT, answered ROLLBACK, raises 25P02 and nothing the transaction did is kept
READ = sa.text("SELECT count(*) FROM ledger")


@pytest.mark.parametrize("way", ["session-commit", "raw-commit"])
def test_a_units_own_commit_of_a_failed_reading_transaction_without_markers_is_refused(
    pg_server: PostgresServer, pg_database: str, service: str, way: str
) -> None:
    database = create_ledger(pg_server, pg_database, markers=False)
    engine = sa.create_engine(pg_server.url(database), pool_size=1, max_overflow=0)
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    def work(session: Session) -> str:
        calls.append(1)
        session.execute(READ)
        swallow_a_failure(session)
        SYNC_COMMIT_STATEMENTS[way](session)
        session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    try:
        with pytest.raises(REFUSED) as raised:
            Sessions.run(work)
        assert_refused(raised.value, raw=way.startswith("raw"))
        assert calls == [1]
        assert notes(pg_server, database, unit) == []
        assert Sessions.run(lambda s: s.execute(sa.text("SELECT 7")).scalar_one()) == 7
    finally:
        engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("way", ["session-commit", "raw-commit"])
async def test_an_async_units_own_commit_of_a_failed_reading_transaction_without_markers(
    pg_server: PostgresServer, pg_database: str, async_driver: str, service: str, way: str
) -> None:
    database = create_ledger(pg_server, pg_database, markers=False)
    engine = create_async_engine(
        pg_server.url(database, driver=async_driver), pool_size=1, max_overflow=0
    )
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    async def work(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(READ)
        await aswallow_a_failure(session)
        await ASYNC_COMMIT_STATEMENTS[way](session)
        await session.execute(INSERT, {"u": unit, "n": "second"})
        return "done"

    async def read(session: AsyncSession) -> Any:
        return (await session.execute(sa.text("SELECT 7"))).scalar_one()

    try:
        with pytest.raises(REFUSED) as raised:
            await Sessions.run(work)
        assert_refused(raised.value, raw=way.startswith("raw"))
        assert calls == [1]
        assert notes(pg_server, database, unit) == []
        assert await Sessions.run(read) == 7
    finally:
        await engine.dispose()
