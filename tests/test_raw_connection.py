"""Statements sent on the driver's own connection, past SQLAlchemy, inside a unit.

SQLAlchemy hands out its DBAPI connection (``session.connection().connection``, its
``driver_connection``) for what it can't do itself: COPY, asyncpg's record copies, psycopg's
``sql`` compositions, server-side cursors. A unit's retry replays that code too, so a write sent
there must be seen like one sent through SQLAlchemy: after a lost COMMIT answer the unit is
settled by its marker (done once, never replayed blindly), and a write sent in autocommit makes
the attempt impossible to replay. Real server, real lost answers (the fault proxy), on psycopg
(sync and async) and asyncpg.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from psycopg import sql
from scenarios import (
    assert_committed_once,
    async_connect_args,
    create_ledger,
    driver_connection,
    ledger_rows,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._statements import statement_connection
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

INSERT = "INSERT INTO ledger (unit, note) VALUES (%s, %s)"
WRITE_FUNCTION = (
    "CREATE FUNCTION write_ledger(u text, n text) RETURNS bigint LANGUAGE sql AS "
    "$$ INSERT INTO ledger (unit, note) VALUES (u, n) RETURNING id $$"
)


@pytest.fixture(params=["markers", "fallback"])
def mode(request: pytest.FixtureRequest) -> str:
    """``markers``: ``rdb.install_commit_markers`` ran; ``fallback``: nothing installed."""
    return str(request.param)


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str, mode: str) -> str:
    """``pg_database`` with the ledger, its writing functions and (``markers``) the markers."""
    return create_ledger(pg_server, pg_database, markers=mode == "markers", also=(WRITE_FUNCTION,))


# -- psycopg -------------------------------------------------------------------------------------


def _cursor_execute(session: Session, unit: str) -> None:
    with driver_connection(session).cursor() as cursor:
        cursor.execute(INSERT, (unit, "cursor"))


def _dbapi_cursor(session: Session, unit: str) -> None:
    cursor = session.connection().connection.cursor()  # the pool's proxy of the connection
    cursor.execute(INSERT, (unit, "dbapi-cursor"))
    cursor.close()


def _connection_execute(session: Session, unit: str) -> None:
    driver_connection(session).execute(INSERT, (unit, "connection"))


def _executemany(session: Session, unit: str) -> None:
    with driver_connection(session).cursor() as cursor:
        cursor.executemany(INSERT, [(unit, "many")])


def _composed(session: Session, unit: str) -> None:
    query = sql.SQL("INSERT INTO {} (unit, note) VALUES (%s, %s)").format(sql.Identifier("ledger"))
    driver_connection(session).execute(query, (unit, "composed"))


def _copy(session: Session, unit: str) -> None:
    cursor = driver_connection(session).cursor()
    with cursor, cursor.copy("COPY ledger (unit, note) FROM STDIN") as copy:
        copy.write_row((unit, "copy"))


def _stream(session: Session, unit: str) -> None:
    with driver_connection(session).cursor() as cursor:
        assert len(list(cursor.stream(INSERT + " RETURNING id", (unit, "stream")))) == 1


def _server_cursor(session: Session, unit: str) -> None:
    with driver_connection(session).cursor(name=f"c_{uuid.uuid4().hex}") as cursor:
        cursor.execute("SELECT write_ledger(%s, 'server-cursor')", (unit,))
        assert cursor.fetchone() is not None


SYNC_WRITES: dict[str, Callable[[Session, str], None]] = {
    "cursor-execute": _cursor_execute,
    "dbapi-cursor": _dbapi_cursor,
    "connection-execute": _connection_execute,
    "executemany": _executemany,
    "sql-composed": _composed,
    "copy": _copy,
    "stream": _stream,
    "server-cursor": _server_cursor,
}


@pytest.fixture
def proxied(fault_proxy: FaultProxy, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(fault_proxy.url(database), connect_args={"connect_timeout": 2})
    yield engine
    engine.dispose()


@pytest.mark.parametrize("path", sorted(SYNC_WRITES))
def test_a_raw_psycopg_write_with_a_lost_commit_answer_is_done_once(
    *,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    database: str,
    service: str,
    path: str,
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> str:
        calls.append(1)
        SYNC_WRITES[path](session, unit)
        return unit

    fault_proxy.lose_commit_answer()
    assert Sessions.run(work) == unit
    assert fault_proxy.commits_lost == 1
    assert len(calls) == 1, "replayed blindly after a COMMIT that was applied"
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_raw_psycopg_read_is_no_write(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    """A plain SELECT on the raw connection proves nothing was written: a lost COMMIT answer
    is simply replayed (a possible write would be settled by its marker instead, once)."""
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls = []

    def work(session: Session) -> int:
        calls.append(1)
        return int(driver_connection(session).execute("SELECT count(*) FROM ledger").fetchone()[0])

    fault_proxy.lose_commit_answer()
    assert Sessions.run(work) == 0
    assert fault_proxy.commits_lost == 1
    assert calls == [1, 1]


@pytest.fixture
def autocommit(pg_server: PostgresServer, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_server.url(database), isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def test_a_raw_psycopg_write_in_autocommit_is_never_replayed(
    autocommit: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """The raw INSERT committed on its own; a retried error after it must not replay it."""
    assert_committed_once(autocommit, pg_server, database, service, _cursor_execute)


def test_a_raw_psycopg_autocommit_statement_refused_by_the_server_is_replayed(
    autocommit: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """The server's error answer proves the raw statement committed nothing: replayed."""
    Sessions = rdb.ResilientSession(autocommit, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> None:
        calls.append(1)
        if len(calls) == 1:
            driver_connection(session).execute("SELECT serialization_failure()")
        _cursor_execute(session, unit)

    Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_cursor_factory_assigned_after_connect_still_has_its_writes_verified(
    fault_proxy: FaultProxy, pg_server: PostgresServer, database: str, service: str
) -> None:
    """Your ``connect`` listener, added after the factory's, gives the connection another
    cursor class: the marked connection keeps it as one whose cursors note their statements,
    so the unit's write is seen, its COMMIT carries a marker and a lost answer is settled, not
    replayed."""
    engine = sa.create_engine(fault_proxy.url(database), connect_args={"connect_timeout": 2})
    Sessions = rdb.ResilientSession(engine, service=service)

    @sa.event.listens_for(engine, "connect")
    def client_cursors(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.cursor_factory = psycopg.ClientCursor

    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> str:
        calls.append(1)
        _cursor_execute(session, unit)
        return unit

    try:
        fault_proxy.lose_commit_answer()
        assert Sessions.run(work) == unit
        assert fault_proxy.commits_lost == 1
        assert len(calls) == 1
        assert ledger_rows(pg_server, database, unit) == 1
        with engine.connect() as conn:  # the connection's cursors are noting ones
            driver = conn.connection.driver_connection
            cursor = driver.cursor()
            assert isinstance(cursor, psycopg.ClientCursor)
            assert getattr(cursor, "_rdb_notes", False)
            driver.cursor_factory = psycopg.RawCursor  # assigned later still: marked at once
            assert issubclass(driver.cursor_factory, psycopg.RawCursor)
            assert getattr(driver.cursor(), "_rdb_notes", False)
    finally:
        engine.dispose()


# -- async: asyncpg and psycopg ------------------------------------------------------------------
async def _araw(session: AsyncSession) -> Any:
    await session.execute(sa.text("SELECT 1"))  # SQLAlchemy's adapter begins the transaction
    return (await (await session.connection()).get_raw_connection()).driver_connection


async def _asyncpg_execute(session: AsyncSession, unit: str) -> None:
    await (await _araw(session)).execute(
        "INSERT INTO ledger (unit, note) VALUES ($1, 'execute')", unit
    )


async def _asyncpg_execute_script(session: AsyncSession, unit: str) -> None:
    quoted = unit.replace("'", "''")
    await (await _araw(session)).execute(
        f"INSERT INTO ledger (unit, note) VALUES ('{quoted}', 'script')"
    )


async def _asyncpg_fetchval(session: AsyncSession, unit: str) -> None:
    raw = await _araw(session)
    assert await raw.fetchval("SELECT write_ledger($1, 'fetchval')", unit) is not None


async def _asyncpg_fetch(session: AsyncSession, unit: str) -> None:
    raw = await _araw(session)
    query = "INSERT INTO ledger (unit, note) VALUES ($1, 'fetch') RETURNING id"
    assert len(await raw.fetch(query, unit)) == 1


async def _asyncpg_executemany(session: AsyncSession, unit: str) -> None:
    raw = await _araw(session)
    await raw.executemany("INSERT INTO ledger (unit, note) VALUES ($1, $2)", [(unit, "many")])


async def _asyncpg_copy_records(session: AsyncSession, unit: str) -> None:
    raw = await _araw(session)
    await raw.copy_records_to_table("ledger", records=[(unit, "copy")], columns=["unit", "note"])


async def _asyncpg_prepared(session: AsyncSession, unit: str) -> None:
    raw = await _araw(session)
    statement = await raw.prepare("INSERT INTO ledger (unit, note) VALUES ($1, 'prepared')")
    await statement.fetch(unit)


async def _apsycopg_execute(session: AsyncSession, unit: str) -> None:
    await (await _araw(session)).execute(INSERT, (unit, "connection"))


async def _apsycopg_cursor(session: AsyncSession, unit: str) -> None:
    async with (await _araw(session)).cursor() as cursor:
        await cursor.execute(INSERT, (unit, "cursor"))


async def _apsycopg_copy(session: AsyncSession, unit: str) -> None:
    cursor = (await _araw(session)).cursor()
    async with cursor, cursor.copy("COPY ledger (unit, note) FROM STDIN") as copy:
        await copy.write_row((unit, "copy"))


AsyncWrite = Callable[[AsyncSession, str], Awaitable[None]]
ASYNC_WRITES: dict[str, AsyncWrite] = {
    "asyncpg-execute": _asyncpg_execute,
    "asyncpg-execute-script": _asyncpg_execute_script,
    "asyncpg-fetchval": _asyncpg_fetchval,
    "asyncpg-fetch": _asyncpg_fetch,
    "asyncpg-executemany": _asyncpg_executemany,
    "asyncpg-copy-records": _asyncpg_copy_records,
    "asyncpg-prepared": _asyncpg_prepared,
    "psycopg-execute": _apsycopg_execute,
    "psycopg-cursor": _apsycopg_cursor,
    "psycopg-copy": _apsycopg_copy,
}


def _driver(path: str) -> str:
    return path.partition("-")[0]


@pytest_asyncio.fixture
async def aproxied(
    fault_proxy: FaultProxy, database: str, request: pytest.FixtureRequest
) -> AsyncIterator[AsyncEngine]:
    driver = _driver(request.node.callspec.params["path"])
    engine = create_async_engine(
        fault_proxy.url(database, driver=driver), connect_args=async_connect_args(driver, 2)
    )
    yield engine
    await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("path", sorted(ASYNC_WRITES))
async def test_a_raw_async_write_with_a_lost_commit_answer_is_done_once(
    *,
    aproxied: AsyncEngine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    database: str,
    service: str,
    path: str,
) -> None:
    Sessions = rdb.AsyncResilientSession(aproxied, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> str:
        calls.append(1)
        await ASYNC_WRITES[path](session, unit)
        return unit

    fault_proxy.lose_commit_answer()
    assert await Sessions.run(work) == unit
    assert fault_proxy.commits_lost == 1
    assert len(calls) == 1, "replayed blindly after a COMMIT that was applied"
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["asyncpg-execute", "psycopg-execute"])
async def test_a_raw_async_write_in_autocommit_is_never_replayed(
    pg_server: PostgresServer, database: str, service: str, path: str
) -> None:
    driver = _driver(path)
    engine = create_async_engine(
        pg_server.url(database, driver=driver), isolation_level="AUTOCOMMIT"
    )
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        await ASYNC_WRITES[path](session, unit)
        await session.execute(sa.text("SELECT serialization_failure()"))

    try:
        with pytest.raises(sa.exc.DBAPIError):
            await Sessions.run(work)
    finally:
        await engine.dispose()
    assert len(calls) == 1
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
async def test_an_asyncpg_statement_prepared_in_one_unit_is_noted_when_run_in_another(
    fault_proxy: FaultProxy, pg_server: PostgresServer, database: str, service: str
) -> None:
    """A writing statement you prepared earlier (kept for the pooled connection it belongs to)
    and run in a later unit: each execution is noted, so a lost COMMIT answer is settled."""
    engine = create_async_engine(
        fault_proxy.url(database, driver="asyncpg"),
        connect_args=async_connect_args("asyncpg", 2),
        pool_size=1,
        max_overflow=0,
    )
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    kept: dict[str, Any] = {}

    async def prepare(session: AsyncSession) -> None:
        raw = await _araw(session)
        kept["raw"] = raw
        kept["insert"] = await raw.prepare(
            "INSERT INTO ledger (unit, note) VALUES ($1, 'kept') RETURNING id"
        )

    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def write(session: AsyncSession) -> str:
        calls.append(1)
        assert await _araw(session) is kept["raw"]  # the one pooled connection
        assert len(await kept["insert"].fetch(unit)) == 1
        return unit

    try:
        await Sessions.run(prepare)
        fault_proxy.lose_commit_answer()
        assert await Sessions.run(write) == unit
    finally:
        await engine.dispose()
    assert fault_proxy.commits_lost == 1
    assert len(calls) == 1, "replayed blindly after a COMMIT that was applied"
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
async def test_an_asyncpg_prepared_statement_names_its_connection(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """asyncpg has no public accessor for a prepared statement's connection; the library
    reads a private attribute in one place. This fails loudly if asyncpg changes it."""
    conn = await asyncpg.connect(pg_server.url(pg_database, driver=""))
    try:
        statement = await conn.prepare("SELECT 1")
        assert statement_connection(statement) is conn
    finally:
        await conn.close()
