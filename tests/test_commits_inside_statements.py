"""Statements that commit inside themselves, and the driver's own two-phase API.

A ``CALL`` of a procedure or a ``DO`` block sent outside a transaction block (in autocommit)
may ``COMMIT`` inside, then fail: the server's error answer proves nothing of what it committed
before. A unit that sent one in autocommit is not replayed after its error (the replay would
write the committed part again), and in drop-in use its error is not transient. In a
transaction they can't commit (the server refuses their transaction control there): a unit is
replayed as before.

psycopg's own two-phase API (``tpc_begin``, ``tpc_prepare``, ``tpc_commit``) on the unit's
driver connection sends ``PREPARE TRANSACTION`` / ``COMMIT`` / ``COMMIT PREPARED`` itself, past
``commit()`` and the cursors: each counts as the unit's own COMMIT.

Real server, real SQLSTATEs raised by it (a deadlock code raised inside the procedure after its
COMMIT, a real lock timeout), psycopg (sync and async) and asyncpg.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import create_ledger, driver_connection, ledger_rows
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _statements
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

#: a batch that commits its first chunk, then (``fail``) meets a deadlock in its second
BATCH = (
    "CREATE PROCEDURE batch(tag text, fail boolean) LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO ledger (unit) VALUES (tag); COMMIT; "
    "IF fail THEN RAISE EXCEPTION 'deadlock in chunk 2' USING ERRCODE = '40P01'; END IF; "
    "INSERT INTO ledger (unit, note) VALUES (tag, 'chunk 2'); END $$"
)
#: the same batch without its COMMIT (what a CALL in a transaction may run)
BATCH_IN_ONE = (
    "CREATE PROCEDURE batch_in_one(tag text, fail boolean) LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO ledger (unit) VALUES (tag); "
    "IF fail THEN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END IF; END $$"
)
#: a batch whose second chunk waits for a row another session holds, until its lock_timeout
BATCH_LOCKED = (
    "CREATE PROCEDURE batch_locked(tag text) LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO ledger (unit) VALUES (tag); COMMIT; "
    "SET LOCAL lock_timeout = '200ms'; "
    "UPDATE ledger SET note = note WHERE unit = 'hot row'; END $$"
)
AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}
LOGGER = "resilient_db"


def do_block(unit: str, fail: bool) -> str:
    """A DO block that commits its INSERT, then (``fail``) raises a serialization failure."""
    return (
        f"DO $$ BEGIN INSERT INTO ledger (unit) VALUES ('{unit}'); COMMIT; "
        f"IF {str(fail).lower()} THEN "
        "RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END IF; END $$"
    )


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    return create_ledger(
        pg_server, pg_database, markers=True, also=(BATCH, BATCH_IN_ONE, BATCH_LOCKED)
    )


@pytest.fixture
def engine(pg_server: PostgresServer, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_server.url(database))
    yield engine
    engine.dispose()


@pytest.fixture
def autocommit_engine(pg_server: PostgresServer, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_server.url(database), isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def not_replaying_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "Not replaying" in r.getMessage() and "committed part of its work" in r.getMessage()
    ]


def run_counted(
    factory: Any, step: Callable[[Session, str, int], None]
) -> tuple[list[int], str, Exception | None]:
    """Run ``step(session, unit, attempt)`` as a unit of ``factory`` (``unit``: its ledger key,
    ``attempt``: 1, 2, ...); returns its calls, its key and the error it raised (None: it
    returned)."""
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    def work(session: Session) -> None:
        calls.append(1)
        step(session, unit, len(calls))

    try:
        factory.run(work)
    except Exception as exc:
        return calls, unit, exc
    return calls, unit, None


async def arun_counted(
    factory: Any, step: Callable[[AsyncSession, str, int], Awaitable[None]]
) -> tuple[list[int], str, Exception | None]:
    """:func:`run_counted` for an async factory."""
    unit = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        await step(session, unit, len(calls))

    try:
        await factory.run(work)
    except Exception as exc:
        return calls, unit, exc
    return calls, unit, None


# -- psycopg ------------------------------------------------------------------------------------


def _call_on_autocommit_connection(session: Session, unit: str, fail: bool) -> None:
    conn = session.connection(execution_options=AUTOCOMMIT)
    conn.execute(sa.text("CALL batch(:u, :f)"), {"u": unit, "f": fail})


def _do_block_on_autocommit_connection(session: Session, unit: str, fail: bool) -> None:
    session.connection(execution_options=AUTOCOMMIT).exec_driver_sql(do_block(unit, fail))


def _call_on_driver_connection(session: Session, unit: str, fail: bool) -> None:
    session.connection(execution_options=AUTOCOMMIT)
    driver_connection(session).execute("CALL batch(%s, %s)", (unit, fail))


def _do_block_on_driver_cursor(session: Session, unit: str, fail: bool) -> None:
    session.connection(execution_options=AUTOCOMMIT)
    driver_connection(session).cursor().execute(do_block(unit, fail))


SYNC_WAYS: dict[str, Callable[[Session, str, bool], None]] = {
    "call-autocommit-connection": _call_on_autocommit_connection,
    "do-autocommit-connection": _do_block_on_autocommit_connection,
    "call-driver-connection": _call_on_driver_connection,
    "do-driver-cursor": _do_block_on_driver_cursor,
}


@pytest.mark.parametrize("way", sorted(SYNC_WAYS))
def test_a_unit_whose_autocommit_call_committed_inside_then_failed_is_not_replayed(
    engine: sa.Engine,
    pg_server: PostgresServer,
    database: str,
    *,
    service: str,
    way: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The procedure (or DO block) committed its first chunk, then the server answered it
    with a deadlock (a serialization failure): not replayed, not transient, written once."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        calls, unit, raised = run_counted(
            Sessions, lambda session, unit, attempt: SYNC_WAYS[way](session, unit, attempt == 1)
        )
    assert isinstance(raised, (sa.exc.OperationalError, psycopg.errors.OperationalError))
    assert rdb.sqlstate_of(raised) in ("40P01", "40001")
    assert calls == [1], "replayed after it committed part of its work"
    assert ledger_rows(pg_server, database, unit) == 1
    assert not rdb.is_transient(raised)
    assert not_replaying_lines(caplog)


def _call_batch(session: Session, unit: str, attempt: int) -> None:
    """The batch procedure through the session (failing after its first chunk at the first
    attempt only)."""
    session.execute(sa.text("CALL batch(:u, :f)"), {"u": unit, "f": attempt == 1})


def test_a_unit_on_an_autocommit_engine_whose_call_committed_inside_is_not_replayed(
    autocommit_engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.ResilientSession(autocommit_engine, service=service)
    calls, unit, raised = run_counted(Sessions, _call_batch)
    assert isinstance(raised, sa.exc.OperationalError)
    assert rdb.sqlstate_of(raised) == "40P01"
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_real_lock_timeout_after_the_procedures_commit_is_not_replayed(
    autocommit_engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """The batch's second chunk waits for a row another session holds: the server's own
    lock_timeout (55P03, a conflict that is replayed) ends it after its first chunk
    committed. The conflict is gone by the time a replay would run: there must be none."""
    pg_server.execute("INSERT INTO ledger (unit, note) VALUES ('hot row', '')", database=database)
    blocker = psycopg.connect(pg_server.conninfo(database))
    try:
        blocker.execute("SELECT * FROM ledger WHERE unit = 'hot row' FOR UPDATE")

        def step(session: Session, unit: str, attempt: int) -> None:
            if attempt > 1:
                blocker.rollback()  # (were it replayed, the replay would go through)
            session.execute(sa.text("CALL batch_locked(:u)"), {"u": unit})

        Sessions = rdb.ResilientSession(autocommit_engine, service=service)
        calls, unit, raised = run_counted(Sessions, step)
    finally:
        blocker.close()
    assert isinstance(raised, sa.exc.OperationalError)
    assert rdb.sqlstate_of(raised) == "55P03"
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_call_in_the_units_transaction_is_replayed_as_before(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """In a transaction a procedure can't commit: its error rolled everything back, and the
    unit is replayed (once written)."""

    def step(session: Session, unit: str, attempt: int) -> None:
        session.execute(sa.text("CALL batch_in_one(:u, :f)"), {"u": unit, "f": attempt == 1})

    calls, unit, raised = run_counted(rdb.ResilientSession(engine, service=service), step)
    assert raised is None
    assert calls == [1, 1]
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_commit_inside_a_call_in_a_transaction_is_refused_by_the_server(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """What the item above rests on: the server refuses a procedure's COMMIT in a transaction
    block (2D000), so nothing of it was committed."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"

    def work(session: Session) -> None:
        session.execute(sa.text("CALL batch(:u, false)"), {"u": unit})

    with pytest.raises(sa.exc.DBAPIError) as raised:
        Sessions.run(work)
    assert rdb.sqlstate_of(raised.value) == "2D000"
    assert ledger_rows(pg_server, database, unit) == 0


def test_in_drop_in_use_the_error_of_a_call_that_committed_inside_is_not_transient(
    autocommit_engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.ResilientSession(autocommit_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    with Sessions() as session, pytest.raises(sa.exc.OperationalError) as raised:
        session.execute(sa.text("CALL batch(:u, true)"), {"u": unit})
    assert rdb.sqlstate_of(raised.value) == "40P01"
    assert not rdb.is_transient(raised.value), "a caller told to retry writes chunk 1 twice"
    with Sessions() as session:
        raw = driver_connection(session)
        with pytest.raises(psycopg.errors.SerializationFailure) as raw_raised:
            raw.execute(do_block(unit, True))
    assert not rdb.is_transient(raw_raised.value)
    assert ledger_rows(pg_server, database, unit) == 2  # (one row by each)


def test_a_with_self_healing_operation_whose_call_committed_inside_is_not_called_again(
    autocommit_engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.ResilientSession(autocommit_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def operation() -> None:
        calls.append(1)
        with Sessions() as session:
            session.execute(sa.text("CALL batch(:u, :f)"), {"u": unit, "f": len(calls) == 1})

    with pytest.raises(sa.exc.OperationalError) as raised:
        rdb.with_self_healing(operation, service=service)
    assert not rdb.is_transient(raised.value)
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


# -- async: asyncpg and psycopg -----------------------------------------------------------------


@pytest_asyncio.fixture(params=["asyncpg", "psycopg"])
async def async_engine(
    request: pytest.FixtureRequest, pg_server: PostgresServer, database: str
) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_server.url(database, driver=request.param))
    yield engine
    await engine.dispose()


async def _araw(session: AsyncSession) -> Any:
    conn = await session.connection(execution_options=AUTOCOMMIT)
    return (await conn.get_raw_connection()).driver_connection


async def _acall_on_autocommit_connection(session: AsyncSession, unit: str, fail: bool) -> None:
    conn = await session.connection(execution_options=AUTOCOMMIT)
    await conn.execute(sa.text("CALL batch(:u, :f)"), {"u": unit, "f": fail})


async def _ado_block_on_autocommit_connection(session: AsyncSession, unit: str, fail: bool) -> None:
    conn = await session.connection(execution_options=AUTOCOMMIT)
    await conn.exec_driver_sql(do_block(unit, fail))


async def _acall_on_driver_connection(session: AsyncSession, unit: str, fail: bool) -> None:
    raw = await _araw(session)
    if isinstance(raw, asyncpg.Connection):
        await raw.execute("CALL batch($1, $2)", unit, fail)
    else:
        await raw.execute("CALL batch(%s, %s)", (unit, fail))


async def _ado_block_on_driver_connection(session: AsyncSession, unit: str, fail: bool) -> None:
    await (await _araw(session)).execute(do_block(unit, fail))


ASYNC_WAYS: dict[str, Callable[[AsyncSession, str, bool], Awaitable[None]]] = {
    "call-autocommit-connection": _acall_on_autocommit_connection,
    "do-autocommit-connection": _ado_block_on_autocommit_connection,
    "call-driver-connection": _acall_on_driver_connection,
    "do-driver-connection": _ado_block_on_driver_connection,
}
ASYNC_ERRORS = (sa.exc.DBAPIError, asyncpg.PostgresError, psycopg.Error)


@pytest.mark.asyncio
@pytest.mark.parametrize("way", sorted(ASYNC_WAYS))
async def test_an_async_unit_whose_autocommit_call_committed_inside_is_not_replayed(
    async_engine: AsyncEngine,
    pg_server: PostgresServer,
    database: str,
    *,
    service: str,
    way: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)

    async def step(session: AsyncSession, unit: str, attempt: int) -> None:
        await ASYNC_WAYS[way](session, unit, attempt == 1)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        calls, unit, raised = await arun_counted(Sessions, step)
    assert isinstance(raised, ASYNC_ERRORS)
    assert rdb.sqlstate_of(raised) in ("40P01", "40001")
    assert calls == [1], "replayed after it committed part of its work"
    assert ledger_rows(pg_server, database, unit) == 1
    assert not rdb.is_transient(raised)
    assert not_replaying_lines(caplog)


@pytest.mark.asyncio
async def test_an_async_call_in_the_units_transaction_is_replayed_as_before(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    async def step(session: AsyncSession, unit: str, attempt: int) -> None:
        params = {"u": unit, "f": attempt == 1}
        await session.execute(sa.text("CALL batch_in_one(:u, :f)"), params)

    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    calls, unit, raised = await arun_counted(Sessions, step)
    assert raised is None
    assert calls == [1, 1]
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
async def test_in_async_drop_in_use_the_error_of_a_call_that_committed_inside_is_not_transient(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    async with Sessions() as session:
        with pytest.raises(ASYNC_ERRORS) as raised:
            await _acall_on_autocommit_connection(session, unit, True)
    assert rdb.sqlstate_of(raised.value) == "40P01"
    assert not rdb.is_transient(raised.value)
    async with Sessions() as session:
        with pytest.raises(ASYNC_ERRORS) as raw_raised:
            await _acall_on_driver_connection(session, unit, True)
    assert rdb.sqlstate_of(raw_raised.value) == "40P01"
    assert not rdb.is_transient(raw_raised.value)
    assert ledger_rows(pg_server, database, unit) == 2  # (one row by each)


# -- psycopg2 and pg8000 (statements seen by the engine's listener) -----------------------------


@pytest.mark.parametrize("driver", ["psycopg2", "pg8000"])
def test_other_drivers_a_call_that_committed_inside_is_not_replayed_nor_transient(
    pg_server: PostgresServer, database: str, service: str, driver: str
) -> None:
    engine = sa.create_engine(pg_server.url(database, driver=driver), isolation_level="AUTOCOMMIT")
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        calls, unit, raised = run_counted(Sessions, _call_batch)
        assert isinstance(raised, sa.exc.DBAPIError)
        assert rdb.sqlstate_of(raised) == "40P01"
        assert calls == [1]
        with Sessions() as session, pytest.raises(sa.exc.DBAPIError) as dropped_in:
            session.execute(sa.text("CALL batch(:u, true)"), {"u": unit})
        assert rdb.sqlstate_of(dropped_in.value) == "40P01"
        assert not rdb.is_transient(dropped_in.value)
        assert ledger_rows(pg_server, database, unit) == 2  # (one row by each)
    finally:
        engine.dispose()


# -- which statements may commit inside ---------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "inside"),
    [
        ("CALL batch('a', true)", True),
        ("call batch(%s, %s)", True),
        ("CALL batch($1, $2)", True),
        ("DO $$ BEGIN INSERT INTO t VALUES (1); COMMIT; END $$", True),
        ("do language plpgsql $x$ begin commit; end $x$", True),
        ("DO 'BEGIN COMMIT; END'", True),
        ("/* batch */ CALL batch('a', true)", True),
        ("-- batch\nCALL batch('a', true)", True),
        ("SET lock_timeout = '1s'; CALL batch('a', true)", True),
        ("SELECT 'a\\'; CALL batch(1)", True),  # (unsure text: a statement may start there)
        ("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING", False),
        ("INSERT INTO t VALUES (1) ON CONFLICT -- none\nDO NOTHING", False),
        ("SELECT 'CALL batch(1); DO $$ $$'", False),
        ("SELECT callback(1), do_it(2)", False),
        ("CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", False),
        ("UPDATE t SET done = true", False),
    ],
)
def test_which_statements_may_commit_inside(statement: str, inside: bool) -> None:
    verdict = _statements.verdict_of(statement)
    assert bool(verdict & _statements.COMMITS_INSIDE) is inside
    assert verdict  # (any of them may write)


# -- a COMMIT midway through a text in autocommit, or in drop-in use -----------------------------
#: the unit's row committed by the text's COMMIT, then a serialization failure (in autocommit the
#: server runs the text in a transaction block of its own, which that COMMIT ends)
MIDWAY = "INSERT INTO ledger (unit) VALUES ('{}'); COMMIT; SELECT serialization_failure()"


def _midway_on_autocommit_connection(session: Session, unit: str) -> None:
    session.connection(execution_options=AUTOCOMMIT).exec_driver_sql(MIDWAY.format(unit))


def _midway_on_driver_connection(session: Session, unit: str) -> None:
    session.connection(execution_options=AUTOCOMMIT)
    driver_connection(session).execute(MIDWAY.format(unit))


@pytest.mark.parametrize(
    "send", [_midway_on_autocommit_connection, _midway_on_driver_connection], ids=["sa", "raw"]
)
def test_a_unit_whose_autocommit_text_committed_midway_is_not_replayed(
    engine: sa.Engine,
    pg_server: PostgresServer,
    database: str,
    service: str,
    send: Callable[[Session, str], None],
) -> None:
    def step(session: Session, unit: str, attempt: int) -> None:
        if attempt == 1:
            send(session, unit)
        else:  # (what a replay would write again)
            session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})

    calls, unit, raised = run_counted(rdb.ResilientSession(engine, service=service), step)
    assert isinstance(raised, (sa.exc.OperationalError, psycopg.errors.SerializationFailure))
    assert rdb.sqlstate_of(raised) == "40001"
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
async def test_an_async_unit_whose_autocommit_text_committed_midway_is_not_replayed(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """On the driver's own connection (asyncpg's ``execute`` without arguments, psycopg's:
    one simple query)."""

    async def step(session: AsyncSession, unit: str, attempt: int) -> None:
        raw = await _araw(session)
        if attempt == 1:
            await raw.execute(MIDWAY.format(unit))
        else:
            await raw.execute(f"INSERT INTO ledger (unit) VALUES ('{unit}')")

    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    calls, unit, raised = await arun_counted(Sessions, step)
    assert isinstance(raised, ASYNC_ERRORS)
    assert rdb.sqlstate_of(raised) == "40001"
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


def _midway_in_transaction(session: Session, unit: str) -> None:
    session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
    session.connection().exec_driver_sql("COMMIT; SELECT serialization_failure()")


def _midway_in_transaction_on_driver_connection(session: Session, unit: str) -> None:
    session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
    driver_connection(session).execute("COMMIT; SELECT serialization_failure()")


@pytest.mark.parametrize(
    "send",
    [
        _midway_in_transaction,
        _midway_in_transaction_on_driver_connection,
        _midway_on_autocommit_connection,
        _midway_on_driver_connection,
    ],
    ids=["transaction-sa", "transaction-raw", "autocommit-sa", "autocommit-raw"],
)
def test_in_drop_in_use_the_error_of_a_text_that_committed_midway_is_not_transient(
    engine: sa.Engine,
    pg_server: PostgresServer,
    database: str,
    service: str,
    send: Callable[[Session, str], None],
) -> None:
    """A caller told to retry would write the committed row again."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    with (
        Sessions() as session,
        pytest.raises((sa.exc.OperationalError, psycopg.Error)) as raised,
    ):
        send(session, unit)
    assert rdb.sqlstate_of(raised.value) == "40001"
    assert not rdb.is_transient(raised.value)
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
async def test_in_async_drop_in_use_the_error_of_a_text_that_committed_midway_is_not_transient(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    async with Sessions() as session:
        with pytest.raises(ASYNC_ERRORS) as raised:
            await (await _araw(session)).execute(MIDWAY.format(unit))
    assert rdb.sqlstate_of(raised.value) == "40001"
    assert not rdb.is_transient(raised.value)
    assert ledger_rows(pg_server, database, unit) == 1


def test_psycopg2_in_drop_in_use_the_error_of_a_text_that_committed_midway_is_not_transient(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    engine = sa.create_engine(pg_server.url(database, driver="psycopg2"))
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        unit = f"unit-{uuid.uuid4()}"
        with Sessions() as session:
            session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
            with pytest.raises(sa.exc.OperationalError) as raised:
                session.connection().exec_driver_sql("COMMIT; SELECT serialization_failure()")
        assert not rdb.is_transient(raised.value)
        assert ledger_rows(pg_server, database, unit) == 1
    finally:
        engine.dispose()


# -- psycopg's own two-phase API on the unit's driver connection ---------------------------------


@pytest.fixture
def two_phase_database(two_phase_server: PostgresServer) -> Iterator[str]:
    """A database of the test's own, with the ledger, on ``two_phase_server`` (conftest's)."""
    name = f"tpc_{uuid.uuid4().hex[:10]}"
    two_phase_server.create_database(name)
    create_ledger(two_phase_server, name, markers=True)
    yield name
    for (gid,) in two_phase_server.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()", database=name
    ):  # (a test may leave one prepared: it would block the drop)
        two_phase_server.execute(f"ROLLBACK PREPARED '{gid}'", database=name)
    two_phase_server.drop_database(name)


def pending_prepared(server: PostgresServer, database: str) -> int:
    found = server.execute(
        "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
        database=database,
    )
    return int(found[0][0])


INSERT_RAW = "INSERT INTO ledger (unit) VALUES (%s)"


def run_two_phase_unit(
    server: PostgresServer,
    database: str,
    service: str,
    finish: Callable[[Any, Session, int], None],
) -> tuple[list[int], str, Exception | None]:
    """Run a unit that begins a two-phase transaction on its driver connection (psycopg's own
    API), inserts a ledger row there and calls ``finish(raw, session, attempt)``; returns its
    calls, its ledger key and the error it raised (None: it returned)."""
    engine = sa.create_engine(server.url(database))

    def step(session: Session, unit: str, attempt: int) -> None:
        raw = driver_connection(session)
        raw.tpc_begin(raw.xid(1, f"{unit}-{attempt}", "b"))
        raw.execute(INSERT_RAW, (unit,))
        finish(raw, session, attempt)

    try:
        calls, unit, raised = run_counted(rdb.ResilientSession(engine, service=service), step)
    finally:
        engine.dispose()
    assert raised is None or isinstance(raised, sa.exc.OperationalError), raised
    return calls, unit, raised


@pytest.mark.parametrize("prepare", [True, False], ids=["prepare-commit", "one-phase-commit"])
def test_a_unit_that_committed_with_psycopgs_two_phase_api_is_not_replayed(
    two_phase_server: PostgresServer,
    two_phase_database: str,
    service: str,
    prepare: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def commit_then_fail(raw: Any, session: Session, attempt: int) -> None:
        if prepare:
            raw.tpc_prepare()
        raw.tpc_commit()
        session.execute(sa.text("SELECT serialization_failure()"))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        calls, unit, raised = run_two_phase_unit(
            two_phase_server, two_phase_database, service, commit_then_fail
        )
    assert raised is not None
    assert rdb.sqlstate_of(raised) == "40001"
    assert calls == [1], "replayed after it committed part of its work"
    assert not rdb.is_transient(raised)
    assert not_replaying_lines(caplog)
    assert ledger_rows(two_phase_server, two_phase_database, unit) == 1
    assert pending_prepared(two_phase_server, two_phase_database) == 0


def test_a_unit_that_left_a_transaction_prepared_is_not_replayed(
    two_phase_server: PostgresServer, two_phase_database: str, service: str
) -> None:
    """Its prepared transaction is committed by whoever ends it: a replay would write it again."""

    def prepare_then_fail(raw: Any, session: Session, attempt: int) -> None:
        raw.tpc_prepare()
        session.execute(sa.text("SELECT serialization_failure()"))

    calls, _, raised = run_two_phase_unit(
        two_phase_server, two_phase_database, service, prepare_then_fail
    )
    assert raised is not None
    assert rdb.sqlstate_of(raised) == "40001"
    assert calls == [1]
    assert pending_prepared(two_phase_server, two_phase_database) == 1


def test_a_unit_whose_prepared_transaction_was_rolled_back_is_replayed(
    two_phase_server: PostgresServer, two_phase_database: str, service: str
) -> None:
    """``tpc_rollback`` of what the attempt prepared: nothing of it was committed."""

    def roll_back_first(raw: Any, session: Session, attempt: int) -> None:
        raw.tpc_prepare()
        if attempt == 1:
            raw.tpc_rollback()
            session.execute(sa.text("SELECT serialization_failure()"))
        raw.tpc_commit()

    calls, unit, raised = run_two_phase_unit(
        two_phase_server, two_phase_database, service, roll_back_first
    )
    assert raised is None
    assert calls == [1, 1]
    assert ledger_rows(two_phase_server, two_phase_database, unit) == 1
    assert pending_prepared(two_phase_server, two_phase_database) == 0


#: a deferred trigger that makes a ledger row's transaction wait, as it prepares (or commits),
#: for the ``prepare_gate`` row, which a test holds locked
PREPARE_GATE = (
    "CREATE TABLE prepare_gate (id int PRIMARY KEY); INSERT INTO prepare_gate VALUES (1); "
    "CREATE FUNCTION pass_gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "PERFORM 1 FROM prepare_gate WHERE id = 1 FOR SHARE; RETURN NULL; END $$; "
    "CREATE CONSTRAINT TRIGGER pass_gate AFTER INSERT ON ledger DEFERRABLE INITIALLY DEFERRED "
    "FOR EACH ROW EXECUTE FUNCTION pass_gate()"
)


@contextlib.contextmanager
def answer_lost_once_prepared(
    server: PostgresServer, database: str, proxy: FaultProxy
) -> Iterator[None]:
    """Lose the answer of the PREPARE TRANSACTION sent in the block on ``database`` (which has
    none prepared yet), once the server has prepared it: the prepare is held at the gate
    (``PREPARE_GATE``) until the proxy holds back every answer, then let through; once the
    server shows it prepared, the proxy resets the connection."""
    prepared = "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
    gate = server.connect(database)
    gate.execute("BEGIN")
    gate.execute("SELECT 1 FROM prepare_gate WHERE id = 1 FOR UPDATE")
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE 'PREPARE TRANSACTION%%'"
    )

    def release_then_cut() -> None:
        with server.connect(database) as watch:
            for _ in range(3000):  # (bounded: each step comes within a few polls)
                if watch.execute(waiting).fetchone()[0]:  # type: ignore[index]
                    break
                time.sleep(0.01)
            proxy.latency(600)  # (the answer is held back far past the test)
            gate.execute("COMMIT")
            for _ in range(3000):
                if watch.execute(prepared).fetchone()[0]:  # type: ignore[index]
                    proxy.cut_all()
                    return
                time.sleep(0.01)

    thread = threading.Thread(target=release_then_cut, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=60)
        proxy.restore()
        gate.close()


def test_a_unit_whose_tpc_prepare_answer_was_lost_is_not_replayed(
    two_phase_server: PostgresServer, two_phase_database: str, service: str
) -> None:
    """``tpc_prepare`` whose answer is lost once the server prepared: the transaction is
    prepared (whoever ends it commits it), so the unit is not replayed, and its error is not
    transient (a caller told to retry would write it twice)."""
    two_phase_server.execute(PREPARE_GATE, database=two_phase_database)
    with FaultProxy(two_phase_server) as proxy:
        engine = sa.create_engine(proxy.url(two_phase_database))

        def step(session: Session, unit: str, attempt: int) -> None:
            raw = driver_connection(session)
            raw.tpc_begin(raw.xid(1, f"{unit}-{attempt}", "b"))
            raw.execute(INSERT_RAW, (unit,))
            lost = answer_lost_once_prepared(two_phase_server, two_phase_database, proxy)
            with lost if attempt == 1 else contextlib.nullcontext():
                raw.tpc_prepare()
            raw.tpc_commit()

        try:
            Sessions = rdb.ResilientSession(engine, service=service)
            calls, unit, raised = run_counted(Sessions, step)
            assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
        finally:
            engine.dispose()
    assert raised is not None, "a lost PREPARE TRANSACTION answer taken for a success"
    assert calls == [1], "replayed after its transaction was prepared"
    assert not rdb.is_transient(raised)
    assert rdb.classify(raised) is rdb.Outcome.COMMIT_UNKNOWN
    assert pending_prepared(two_phase_server, two_phase_database) == 1
    assert ledger_rows(two_phase_server, two_phase_database, unit) == 0  # (prepared, not yet)


def test_in_drop_in_use_a_lost_answer_of_tpc_commit_is_an_unknown_outcome(
    two_phase_server: PostgresServer, two_phase_database: str, service: str
) -> None:
    """As one of ``commit()``: never transient (a caller told to retry would write twice)."""
    with FaultProxy(two_phase_server) as proxy:
        engine = sa.create_engine(proxy.url(two_phase_database))
        try:
            Sessions = rdb.ResilientSession(engine, service=service)
            unit = f"unit-{uuid.uuid4()}"
            with Sessions() as session:
                raw = driver_connection(session)
                raw.tpc_begin(raw.xid(1, unit, "b"))
                raw.execute(INSERT_RAW, (unit,))
                raw.tpc_prepare()
                proxy.lose_commit_answer()
                with pytest.raises(psycopg.OperationalError) as raised:
                    raw.tpc_commit()
                session.invalidate()
        finally:
            engine.dispose()
        assert proxy.commits_lost == 1
    assert rdb.classify(raised.value) is rdb.Outcome.COMMIT_UNKNOWN
    assert not rdb.is_transient(raised.value)
    assert ledger_rows(two_phase_server, two_phase_database, unit) == 1


@pytest_asyncio.fixture
async def two_phase_async_engine(
    two_phase_server: PostgresServer, two_phase_database: str
) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(two_phase_server.url(two_phase_database, driver="psycopg"))
    yield engine
    await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("prepare", [True, False], ids=["prepare-commit", "one-phase-commit"])
async def test_an_async_unit_that_committed_with_psycopgs_two_phase_api_is_not_replayed(
    two_phase_async_engine: AsyncEngine,
    two_phase_server: PostgresServer,
    two_phase_database: str,
    service: str,
    prepare: bool,
) -> None:
    async def step(session: AsyncSession, unit: str, attempt: int) -> None:
        raw = (await (await session.connection()).get_raw_connection()).driver_connection
        await raw.tpc_begin(raw.xid(1, f"{unit}-{attempt}", "b"))
        await raw.execute(INSERT_RAW, (unit,))
        if prepare:
            await raw.tpc_prepare()
        await raw.tpc_commit()
        await session.execute(sa.text("SELECT serialization_failure()"))

    Sessions = rdb.AsyncResilientSession(two_phase_async_engine, service=service)
    calls, unit, raised = await arun_counted(Sessions, step)
    assert isinstance(raised, sa.exc.OperationalError)
    assert rdb.sqlstate_of(raised) == "40001"
    assert calls == [1]
    assert not rdb.is_transient(raised)
    assert ledger_rows(two_phase_server, two_phase_database, unit) == 1


@pytest.mark.asyncio
async def test_an_async_unit_whose_tpc_prepare_answer_was_lost_is_not_replayed(
    two_phase_server: PostgresServer, two_phase_database: str, service: str
) -> None:
    """:func:`test_a_unit_whose_tpc_prepare_answer_was_lost_is_not_replayed` on psycopg's
    async connection."""
    two_phase_server.execute(PREPARE_GATE, database=two_phase_database)
    with FaultProxy(two_phase_server) as proxy:
        engine = create_async_engine(proxy.url(two_phase_database, driver="psycopg"))

        async def step(session: AsyncSession, unit: str, attempt: int) -> None:
            raw = (await (await session.connection()).get_raw_connection()).driver_connection
            await raw.tpc_begin(raw.xid(1, f"{unit}-{attempt}", "b"))
            await raw.execute(INSERT_RAW, (unit,))
            lost = answer_lost_once_prepared(two_phase_server, two_phase_database, proxy)
            with lost if attempt == 1 else contextlib.nullcontext():
                await raw.tpc_prepare()
            await raw.tpc_commit()

        try:
            Sessions = rdb.AsyncResilientSession(engine, service=service)
            calls, unit, raised = await arun_counted(Sessions, step)
            one = await Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))
            assert one.scalar() == 1
        finally:
            await engine.dispose()
    assert raised is not None, "a lost PREPARE TRANSACTION answer taken for a success"
    assert calls == [1], "replayed after its transaction was prepared"
    assert not rdb.is_transient(raised)
    assert rdb.classify(raised) is rdb.Outcome.COMMIT_UNKNOWN
    assert pending_prepared(two_phase_server, two_phase_database) == 1
    assert ledger_rows(two_phase_server, two_phase_database, unit) == 0  # (prepared, not yet)


@pytest.mark.asyncio
async def test_asyncpgs_two_phase_statements_on_the_driver_connection_are_the_units_commit(
    two_phase_server: PostgresServer, two_phase_database: str, service: str
) -> None:
    """asyncpg has no two-phase API: its ``PREPARE TRANSACTION`` and ``COMMIT PREPARED`` go out
    as statements (``execute``), which count as the unit's own COMMIT."""

    async def step(session: AsyncSession, unit: str, attempt: int) -> None:
        await session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
        raw = (await (await session.connection()).get_raw_connection()).driver_connection
        gid = f"{unit}-{attempt}"
        await raw.execute(f"PREPARE TRANSACTION '{gid}'")
        await raw.execute(f"COMMIT PREPARED '{gid}'")
        await session.execute(sa.text("SELECT serialization_failure()"))

    engine = create_async_engine(two_phase_server.url(two_phase_database, driver="asyncpg"))
    try:
        calls, unit, raised = await arun_counted(
            rdb.AsyncResilientSession(engine, service=service), step
        )
    finally:
        await engine.dispose()
    assert isinstance(raised, sa.exc.DBAPIError)
    assert rdb.sqlstate_of(raised) == "40001"
    assert calls == [1]
    assert ledger_rows(two_phase_server, two_phase_database, unit) == 1
