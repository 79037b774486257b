"""A unit whose own code commits its transaction with a statement (``COMMIT``, ``END``,
``COMMIT AND CHAIN`` sent as text, through SQLAlchemy or the driver's own connection).

The work before that statement is committed: the unit can't be replayed whole after it (the
replay would write it again), whatever fails later, unless the server refused the statement. And
the unit's final COMMIT, which then ends nothing (or the chained transaction), must not make a
unit that went through without a fault run again. Real server, psycopg (sync and async) and
asyncpg, with the commit markers and without them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import assert_committed_once, create_ledger, driver_connection, ledger_rows
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _statements
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

INSERT = sa.text("INSERT INTO ledger (unit) VALUES (:unit)")
#: a deferred check that fails the first COMMIT it sees with a serialization failure (the
#: sequence is not rolled back with it) and lets the next ones through
FAIL_FIRST_COMMIT = [
    "CREATE SEQUENCE commits_seen",
    "CREATE FUNCTION fail_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF nextval('commits_seen') = 1 THEN "
    "RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END IF; RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER fail_first_commit AFTER INSERT ON ledger "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_first_commit()",
]


@pytest.fixture(params=["markers", "fallback"])
def database(request: pytest.FixtureRequest, pg_server: PostgresServer, pg_database: str) -> str:
    """``pg_database`` with the ledger and (``markers``) the commit markers."""
    return create_ledger(pg_server, pg_database, markers=request.param == "markers")


def fail_first_commit(server: PostgresServer, database: str) -> None:
    for statement in FAIL_FIRST_COMMIT:
        server.execute(statement, database=database)


# -- psycopg ------------------------------------------------------------------------------------

SYNC_COMMITS: dict[str, Callable[[Session, str], object]] = {
    "text-commit": lambda s, u: s.execute(sa.text("COMMIT")),
    "text-end": lambda s, u: s.execute(sa.text("END")),
    "text-commit-and-chain": lambda s, u: s.execute(sa.text("commit and chain")),
    "driver-sql-commit": lambda s, u: s.connection().exec_driver_sql("COMMIT"),
    "raw-commit": lambda s, u: driver_connection(s).execute("COMMIT"),
    "raw-cursor-end": lambda s, u: driver_connection(s).cursor().execute("END WORK"),
    # committed midway through a text whose last statement fails
    "text-commit-midway": lambda s, u: s.connection().exec_driver_sql(
        "COMMIT; SELECT serialization_failure()"
    ),
}


@pytest.fixture
def engine(pg_server: PostgresServer, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_server.url(database))
    yield engine
    engine.dispose()


@pytest.mark.parametrize("way", sorted(SYNC_COMMITS))
def test_a_unit_that_committed_with_a_statement_is_not_replayed(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    def commits(session: Session, unit: str) -> None:
        session.execute(INSERT, {"unit": unit})
        SYNC_COMMITS[way](session, unit)

    assert_committed_once(engine, pg_server, database, service, commits)


def test_a_commit_statement_refused_by_the_server_is_replayed(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """The server's error answer to the COMMIT proves that nothing was committed."""
    fail_first_commit(pg_server, database)
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> None:
        calls.append(1)
        session.execute(INSERT, {"unit": unit})
        session.execute(sa.text("COMMIT"))

    Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_unit_whose_psycopg_transaction_block_committed_is_not_replayed(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """psycopg's ``transaction()`` on an idle connection (SQLAlchemy's transaction has sent
    nothing yet) is the outermost transaction: psycopg sends its BEGIN and COMMIT itself."""

    def commits(session: Session, unit: str) -> None:
        raw = driver_connection(session)
        with raw.transaction():
            raw.execute("INSERT INTO ledger (unit) VALUES (%s)", (unit,))

    assert_committed_once(engine, pg_server, database, service, commits)


def test_a_psycopg_transaction_block_inside_the_units_transaction_is_replayed(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """Inside a transaction, psycopg's ``transaction()`` is a savepoint: nothing committed."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> None:
        calls.append(1)
        session.execute(sa.text("SELECT 1"))
        raw = driver_connection(session)
        with raw.transaction():
            raw.execute("INSERT INTO ledger (unit) VALUES (%s)", (unit,))
        if len(calls) == 1:
            session.execute(sa.text("SELECT serialization_failure()"))

    Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_commit_the_scan_cannot_read_surely_is_still_seen(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """A text with a backslash escape (which may end an ``E''`` string anywhere) whose COMMIT
    follows a comment: the unit committed its INSERT, so it is not replayed."""

    def commits(session: Session, unit: str) -> None:
        session.connection().exec_driver_sql(
            f"INSERT INTO ledger (unit) VALUES ('{unit}'); SELECT E'a\\\\b'; -- commit now\nCOMMIT"
        )

    assert_committed_once(engine, pg_server, database, service, commits)


def test_a_commit_after_a_nested_comment_is_seen(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    def commits(session: Session, unit: str) -> None:
        session.execute(INSERT, {"unit": unit})
        session.connection().exec_driver_sql("/* a /* b */ c */ COMMIT")

    assert_committed_once(engine, pg_server, database, service, commits)


#: texts whose statement after a comment (or before one) commits
TEXTS_THAT_COMMIT_AFTER_COMMENTS = {
    "comment-ended-by-a-carriage-return": "SELECT 1; -- note\rCOMMIT",
    "unsure-end-then-a-line-comment": "SELECT 'a\\tb'; END -- done\n",
    "unsure-end-then-a-block-comment": "SELECT 'a\\tb'; END /* done */",
    "unsure-end-after-a-comment-with-a-semicolon": "SELECT 'a\\tb'; /* a; b */ END",
    "e-string-end-then-a-line-comment": "SELECT E'a\\tb'; END -- done\n",
    "atomic-body-with-case-as-a-name": (
        "CREATE OR REPLACE FUNCTION as_case() RETURNS int LANGUAGE sql "
        "BEGIN ATOMIC SELECT 1 AS case; END; COMMIT"
    ),
    "atomic-body-with-a-bare-case-label": (
        "CREATE OR REPLACE FUNCTION bare_case() RETURNS int LANGUAGE sql "
        "BEGIN ATOMIC SELECT 1 case; END; END"
    ),
}


@pytest.mark.parametrize("text", sorted(TEXTS_THAT_COMMIT_AFTER_COMMENTS))
def test_a_commit_next_to_comments_is_seen(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str, text: str
) -> None:
    """The driver's own connection sends a text whose ``COMMIT`` or ``END`` stands next to
    comments: the unit committed its INSERT, so it is not replayed."""

    def commits(session: Session, unit: str) -> None:
        session.execute(INSERT, {"unit": unit})
        driver_connection(session).execute(TEXTS_THAT_COMMIT_AFTER_COMMENTS[text])

    assert_committed_once(engine, pg_server, database, service, commits)


BODIES_THAT_COMMIT_NOTHING = {
    "do-block-with-a-backslash": ("DO $$ BEGIN IF 'a1' ~ '\\d' THEN PERFORM 1; END IF; END $$"),
    "begin-atomic": (
        "CREATE OR REPLACE FUNCTION one() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END"
    ),
}


@pytest.mark.parametrize("body", sorted(BODIES_THAT_COMMIT_NOTHING))
def test_a_unit_whose_statement_holds_a_block_end_is_replayed(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str, body: str
) -> None:
    """A block's ``END`` (a DO block's, with a backslash in its body; a SQL-standard
    ``BEGIN ATOMIC ... END`` body) commits nothing: the unit is replayed as any other."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> None:
        calls.append(1)
        session.execute(INSERT, {"unit": unit})
        session.execute(sa.text(BODIES_THAT_COMMIT_NOTHING[body]))
        if len(calls) == 1:
            session.execute(sa.text("SELECT serialization_failure()"))

    Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_psycopg_transaction_block_that_rolls_back_commits_nothing(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """An outermost ``transaction(force_rollback=True)``, or one left by psycopg's
    ``Rollback``, sends ROLLBACK: the unit is replayed as any other."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> None:
        calls.append(1)
        raw = driver_connection(session)
        with raw.transaction(force_rollback=True):
            raw.execute("SELECT 1")
        with raw.transaction():
            raw.execute("SELECT 1")
            raise psycopg.Rollback()
        session.execute(INSERT, {"unit": unit})
        if len(calls) == 1:
            session.execute(sa.text("SELECT serialization_failure()"))

    Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


def test_a_psycopg_transaction_block_left_by_a_real_conflict_is_replayed(
    engine: sa.Engine, pg_server: PostgresServer, database: str, service: str
) -> None:
    """An outermost ``transaction()`` left by the server's 40001 raised inside it: psycopg
    rolls it back and raises the error on, which commits nothing: the unit is replayed, its row
    written once."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> None:
        calls.append(1)
        raw = driver_connection(session)
        with raw.transaction():
            raw.execute("INSERT INTO ledger (unit) VALUES (%s)", (unit,))
            if len(calls) == 1:
                raw.execute("SELECT serialization_failure()")

    Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


# -- async: asyncpg and psycopg -----------------------------------------------------------------
async def _araw(session: AsyncSession) -> Any:
    return (await (await session.connection()).get_raw_connection()).driver_connection


async def _driver_sql(session: AsyncSession, statement: str) -> object:
    return await (await session.connection()).exec_driver_sql(statement)


async def _raw_execute(session: AsyncSession, statement: str) -> object:
    return await (await _araw(session)).execute(statement)


ASYNC_COMMITS: dict[str, Callable[[AsyncSession], Awaitable[object]]] = {
    "text-commit": lambda s: s.execute(sa.text("COMMIT")),
    "text-end": lambda s: s.execute(sa.text("END")),
    "text-commit-and-chain": lambda s: s.execute(sa.text("commit and chain")),
    "driver-sql-commit": lambda s: _driver_sql(s, "COMMIT"),
    "raw-commit": lambda s: _raw_execute(s, "COMMIT"),
    "raw-commit-and-chain": lambda s: _raw_execute(s, "COMMIT AND CHAIN"),
    # (asyncpg's execute sends a text without arguments as one simple query)
    "raw-commit-midway": lambda s: _raw_execute(s, "COMMIT; SELECT serialization_failure()"),
}


@pytest_asyncio.fixture(params=["asyncpg", "psycopg"])
async def async_engine(
    request: pytest.FixtureRequest, pg_server: PostgresServer, database: str
) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_server.url(database, driver=request.param))
    yield engine
    await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("way", sorted(ASYNC_COMMITS))
async def test_an_async_unit_that_committed_with_a_statement_is_not_replayed(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(INSERT, {"unit": unit})
        await ASYNC_COMMITS[way](session)
        await session.execute(sa.text("SELECT serialization_failure()"))

    # (SQLAlchemy's error, or the driver's own where the raw connection failed)
    with pytest.raises((sa.exc.DBAPIError, asyncpg.PostgresError, psycopg.Error)) as raised:
        await Sessions.run(work)
    assert rdb.sqlstate_of(raised.value) == "40001"
    assert calls == [1], "replayed after it committed part of its work"
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("way", sorted(set(ASYNC_COMMITS) - {"raw-commit-midway"}))
async def test_an_async_unit_that_committed_with_a_statement_and_went_through_runs_once(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    """No fault at all: the unit's final COMMIT, which ends nothing (asyncpg: no transaction is
    left, and a marker sent there would be written by nobody) or the chained transaction, is
    done once."""
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(INSERT, {"unit": unit})
        await ASYNC_COMMITS[way](session)
        return unit

    assert await Sessions.run(work) == unit
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
async def test_an_async_commit_statement_refused_by_the_server_is_replayed(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    fail_first_commit(pg_server, database)
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(INSERT, {"unit": unit})
        await session.execute(sa.text("COMMIT"))

    await Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("async_engine", ["psycopg"], indirect=True)
async def test_an_async_unit_whose_psycopg_transaction_block_committed_is_not_replayed(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        raw = await _araw(session)
        async with raw.transaction():
            await raw.execute("INSERT INTO ledger (unit) VALUES (%s)", (unit,))
        await session.execute(sa.text("SELECT serialization_failure()"))

    with pytest.raises(sa.exc.DBAPIError):
        await Sessions.run(work)
    assert calls == [1], "replayed after its transaction block committed"
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("async_engine", ["psycopg"], indirect=True)
async def test_an_async_psycopg_transaction_block_that_rolls_back_commits_nothing(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        raw = await _araw(session)
        async with raw.transaction(force_rollback=True):
            await raw.execute("SELECT 1")
        await session.execute(INSERT, {"unit": unit})
        if len(calls) == 1:
            await session.execute(sa.text("SELECT serialization_failure()"))

    await Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("async_engine", ["psycopg"], indirect=True)
async def test_an_async_psycopg_transaction_block_left_by_a_real_conflict_is_replayed(
    async_engine: AsyncEngine, pg_server: PostgresServer, database: str, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        raw = await _araw(session)
        async with raw.transaction():
            await raw.execute("INSERT INTO ledger (unit) VALUES (%s)", (unit,))
            if len(calls) == 1:
                await raw.execute("SELECT serialization_failure()")

    await Sessions.run(work)
    assert len(calls) == 2
    assert ledger_rows(pg_server, database, unit) == 1


#: a SQL-standard body's head, for the texts below
ATOMIC_G = "CREATE OR REPLACE FUNCTION g() RETURNS text LANGUAGE sql BEGIN ATOMIC"


# -- which statements commit --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("statement", "flags"),
    [
        ("COMMIT", _statements.COMMITS),
        ("commit;", _statements.COMMITS),
        ("END WORK", _statements.COMMITS),
        ("COMMIT AND CHAIN", _statements.COMMITS),
        ("PREPARE TRANSACTION 'unit-1'", _statements.COMMITS),
        ("COMMIT PREPARED 'unit-1'", _statements.COMMITS),
        ("INSERT INTO t VALUES (1); COMMIT", _statements.COMMITS),
        (
            "INSERT INTO t VALUES (1); COMMIT; INSERT INTO t VALUES (2)",
            _statements.COMMITS | _statements.COMMITS_MIDWAY,
        ),
        ("/* x */ END", _statements.COMMITS),
        # an escaped quote the scan can't be sure of (a plain string's backslash escapes where
        # standard_conforming_strings is off): a COMMIT is taken as one
        ("SELECT 'a\\'; COMMIT'", _statements.COMMITS),
        # an E'' string's escapes are read: its ends are sure (psycopg's client-side quoting of a
        # value with a backslash writes one)
        ("SELECT E'\\'; COMMIT'", 0),
        ("INSERT INTO t VALUES ('x' || E'\\t commit message')", 0),
        ("SELECT E'it''s \\' commit'", 0),
        ("SELECT E'a\\\\'; COMMIT", _statements.COMMITS),
        # no statement of these commits
        ("SELECT CASE WHEN a THEN 1 END FROM t", 0),
        ("DO $$ BEGIN INSERT INTO t VALUES (1); END $$", 0),
        ("DO $body$ BEGIN COMMIT; END $body$", 0),  # (a procedure's: only in autocommit)
        ("SELECT 'a; commit' AS x", 0),
        ("SELECT 1 -- ; commit", 0),
        ("SELECT endless FROM t; SELECT committed FROM t", 0),
        ("PREPARE p AS SELECT 1", 0),
        ("ROLLBACK", 0),
        # a text the scan can't be sure of: a COMMIT after a comment, or in a nested one
        ("INSERT INTO t VALUES (E'a\\b'); -- done\nCOMMIT", _statements.COMMITS),
        ("INSERT INTO t VALUES (E'a\\b'); /* done */ COMMIT", _statements.COMMITS),
        (
            "SELECT E'a\\b'; /* done */ COMMIT; SELECT 1",
            _statements.COMMITS | _statements.COMMITS_MIDWAY,
        ),
        ("/* a /* b */ c */ COMMIT", _statements.COMMITS),
        ("INSERT INTO t VALUES (1); /* a /* b */ c */ COMMIT", _statements.COMMITS),
        ("SELECT E'a\\b'; -- x\nEND", _statements.COMMITS),
        # a backslash inside a dollar-quoted body escapes nothing
        ("DO $$ BEGIN IF 'a1' ~ '\\d' THEN PERFORM 1; END IF; END $$", 0),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $b$ BEGIN "
            "RETURN E'a\\nb'; END; $b$",
            0,
        ),
        # a SQL-standard body is part of its statement
        ("CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END", 0),
        (
            "CREATE PROCEDURE p(x int) LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (x); "
            "SELECT CASE WHEN x > 1 THEN 1 END; END",
            0,
        ),
        (
            "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; COMMIT",
            _statements.COMMITS,
        ),
        # unsure text: a block's END is no statement of its own
        ("SELECT E'a\\b'; DO $$ BEGIN IF a THEN PERFORM 1; END IF; END $$", 0),
        ("SELECT 'a\\b'; DO $$ BEGIN IF a THEN PERFORM 1; END IF; END $$", 0),
        ("SELECT 'a\\b', CASE WHEN a THEN 1 END FROM t", 0),
        # an END with a comment after it, or after a comment that holds a ";"
        ("SELECT E'a\\tb'; END -- done\n", _statements.COMMITS),
        ("SELECT E'a\\tb'; END /* done */", _statements.COMMITS),
        ("SELECT E'a\\tb'; /* a; b */ END", _statements.COMMITS),
        ("SELECT 'a\\tb'; END -- done\n", _statements.COMMITS),
        ("SELECT 'a\\tb'; END /* done */", _statements.COMMITS),
        ("SELECT 'a\\tb'; /* a; b */ END", _statements.COMMITS),
        ("SELECT 'a\\tb'; -- a; b\nEND", _statements.COMMITS),
        ("SELECT 'a\\tb'; END /* x */ WORK; -- done", _statements.COMMITS),
        ("/* a /* b */ c */ END -- done", _statements.COMMITS),
        (
            "SELECT 'a\\tb'; END /* done */; SELECT 1",
            _statements.COMMITS | _statements.COMMITS_MIDWAY,
        ),
        # CASE and END as names inside a SQL-standard body
        (
            "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS case; END; "
            "COMMIT",
            _statements.COMMITS,
        ),
        (
            "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT t.case, t.end "
            "FROM t; END; END",
            _statements.COMMITS,
        ),
        ("CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS case; END", 0),
        (
            "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; COMMIT; "
            "SELECT 2",
            _statements.COMMITS | _statements.COMMITS_MIDWAY,
        ),
        # a body whose ends don't add up: read as unsure text (its END taken as a statement)
        (
            "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE 1; END; COMMIT",
            _statements.COMMITS | _statements.COMMITS_MIDWAY,
        ),
        # a -- comment ends at a carriage return too
        ("SELECT 1; -- note\rCOMMIT", _statements.COMMITS),
        ("SELECT 1; -- note\rEND", _statements.COMMITS),
        ("SELECT 'a\\b'; -- note\rEND", _statements.COMMITS),
        ("SELECT 1 -- note; COMMIT\r", 0),
        # the word before a body's CASE or END is the one right before it: a quoted name, a
        # string, a number with its dot or a sign is none of AS or "."
        (
            f"{ATOMIC_G} SELECT CASE WHEN true THEN CAST('a' AS \"text\") END; END; END",
            _statements.COMMITS,
        ),
        (
            f"{ATOMIC_G} SELECT CASE WHEN true THEN 'a'::pg_catalog.\"text\" END; END; END",
            _statements.COMMITS,
        ),
        (f"{ATOMIC_G} SELECT CASE WHEN true THEN 1. END; END; END", _statements.COMMITS),
        (f"{ATOMIC_G} SELECT t.*, CASE WHEN t.a > 0 THEN 1 END FROM t; END", 0),
        (f'{ATOMIC_G} SELECT t.a AS "A", CASE WHEN t.a > 0 THEN 1 END AS "B" FROM t; END', 0),
        # a bare column label ``case`` (after a value: a number, a name, a cast's type, ")", a
        # string) opens no CASE: the END after the body is a statement that commits
        (f"{ATOMIC_G} SELECT 1 case; END; END", _statements.COMMITS),
        (f"{ATOMIC_G} SELECT NULL::text case; END; END", _statements.COMMITS),
        (f"{ATOMIC_G} SELECT (1) case; END; END", _statements.COMMITS),
        (f"{ATOMIC_G} SELECT 'a' case; END; END", _statements.COMMITS),
        (f"{ATOMIC_G} SELECT t.a case FROM t; END; END", _statements.COMMITS),
        (f"{ATOMIC_G} SELECT 1 case; END", 0),
        # where a CASE expression starts: after a sign, a reserved word, ORDER BY, RETURN
        (f"{ATOMIC_G} RETURN CASE WHEN true THEN 'a' END; END", 0),
        (f"{ATOMIC_G} SELECT 'a' WHERE CASE WHEN true THEN true END; END", 0),
        (f"{ATOMIC_G} SELECT 'a' FROM t ORDER BY CASE WHEN t.a > 0 THEN 1 END; END", 0),
        (f"{ATOMIC_G} SELECT CASE CASE WHEN true THEN 1 END WHEN 1 THEN 'a' END; END", 0),
        (f"{ATOMIC_G} SELECT 'a' || CASE WHEN true THEN 'b' END; END", 0),
        (
            f"{ATOMIC_G} SELECT 'a'; SELECT CASE WHEN true THEN 'b' END; END; END",
            _statements.COMMITS,
        ),
    ],
)
def test_statements_that_commit_are_told_apart(statement: str, flags: int) -> None:
    verdict = _statements.verdict_of(statement)
    assert verdict & (_statements.COMMITS | _statements.COMMITS_MIDWAY) == flags
    assert bool(verdict) or not flags  # a commit may write


@pytest.mark.parametrize(
    ("statement", "plain"),
    [
        ("COMMIT", True),
        ("commit;", True),
        (" \tCommit ;\n", True),
        ("COMMIT /* done */", True),
        ("-- done\nCOMMIT;", True),
        # anything more than the word: a COMMIT as any (no marker)
        ("COMMIT AND CHAIN", False),
        ("COMMIT AND NO CHAIN", False),
        ("COMMIT WORK", False),
        ("END", False),
        ("COMMIT PREPARED 'unit-1'", False),
        ("INSERT INTO t VALUES (1); COMMIT", False),
        ("COMMIT; SELECT 1", False),
        ("COMMIT;;", False),
        ("SELECT 'COMMIT'", False),
        ("ROLLBACK", False),
    ],
)
def test_a_plain_commit_is_told_apart_in_its_verdict(statement: str, plain: bool) -> None:
    """A plain ``COMMIT`` (the word alone) goes out on psycopg as the connection's ``commit()``,
    with the marker a unit's own COMMIT midway carries: told in its cached verdict."""
    verdict = _statements.verdict_of(statement)
    assert bool(verdict & _statements.PLAIN_COMMIT) is plain
    assert not plain or verdict & _statements.COMMITS


#: texts of about 100 KB full of what opens a comment, a string or a dollar quote
LONG_TEXTS = {
    "psycopg-parameters": "SELECT " + "%(" * 50_000,
    "globs": "INSERT INTO paths (glob) VALUES " + ", ".join("('/*.py')" for _ in range(10_000)),
    "select-globs": "SELECT " + ", ".join("'/*.py'" for _ in range(12_000)),
    "dashes-in-strings": "SELECT " + ", ".join("'--a'" for _ in range(16_000)),
    "open-comments": "SELECT E'\\t' " + "/* a " * 20_000,
    "open-dollar-quotes": "SELECT " + " ".join(f"$t{i}$" for i in range(12_000)),
    "a-long-name": "SELECT " + "a" * 100_000,
    "a-long-string": "SELECT '" + "a" * 100_000 + "'",
    "ends-after-comments": "SELECT 'a\\b'" + "; END /* ; " * 8_000 + "*/" * 8_000,
    "notify-after-comments": "SELECT 1;\r" + "-- x\rx NOTIFY \r" * 6_000,
}


@pytest.mark.parametrize("name", sorted(LONG_TEXTS))
def test_a_long_text_is_judged_in_linear_time(name: str) -> None:
    """No scan goes to a text's end again from each of its ``/*``, quotes or names. (About
    50 ms of this thread's CPU each; a scan in quadratic time took seconds to minutes. The
    thread's own CPU time, not the wall clock: a busy machine does not make it longer.)"""
    text = LONG_TEXTS[name]
    started = time.thread_time()
    _statements._judge(text)
    assert time.thread_time() - started < 0.5


def test_the_verdicts_of_long_statements_are_kept_within_bounds(pg_url: str, service: str) -> None:
    """Each statement's verdict (may it write?) is kept, by its text: generated statements (an
    ``IN`` list of thousands of parameters, a text per length; a multi-row ``INSERT``) are long,
    and kept by the 4,096, they grew a long-running worker's memory by hundreds of megabytes."""
    engine = sa.create_engine(pg_url)
    padding = "x" * 1_000_000  # (a comment: quick to judge; 30,000 parameters are as long)
    statements = [f"SELECT {i} /* {padding} */" for i in range(20)]

    def unit(session: Session) -> None:
        for statement in statements:
            session.connection().exec_driver_sql(statement)

    rdb.ResilientSession(engine, service=service).run(unit)
    engine.dispose()
    kept = sum(map(len, _statements._verdicts))
    assert kept <= _statements._MAX_VERDICT_CHARS < sum(map(len, statements))
    assert statements[-1] in _statements._verdicts  # (still kept: judged once)
