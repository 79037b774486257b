"""The commit protocol's parts against the real server: the markers' SQL (mark, claim, fence,
expiry, prune), the client's read-only proof, the marked message on both drivers and what it
costs in round trips. The crash and fault scenarios are in test_commit_protocol*.py."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

import resilient_db as rdb
from resilient_db import _commit, _statements
from resilient_db._commit import CLAIM_HORIZON, RETENTION, marker_id
from resilient_db._statements import may_write
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

PREPARED = _commit.PREPARED_MARK
FUNCTION_FORM = '"SELECT resilient_db.mark_commit('
#: the function form of a unit that ran a statement that writes by its kind (an UPDATE, ...):
#: its xid is assigned first, so that the function writes the marker whatever the write held
#: (see ``_statements.WRITES``)
FUNCTION_FORM_AFTER_WRITE = f'"SELECT pg_catalog.pg_current_xact_id(); {FUNCTION_FORM[1:]}'
INLINE_FORM = "\"INSERT INTO resilient_db.commit_markers (id) SELECT '"


def uuid7() -> uuid.UUID:
    return uuid.UUID(marker_id())


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "marker_counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.insert(Counter).values(id=1, value=0))
    rdb.install_commit_markers(eng)
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def async_engine(engine: sa.Engine, pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    yield eng
    await eng.dispose()


def markers(engine: sa.Engine) -> list[tuple[uuid.UUID, bool]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, fence FROM resilient_db.commit_markers"))
        return [(row[0], row[1]) for row in rows]


def claim(engine: sa.Engine, marker: uuid.UUID | str, *, wait_ms: int | None = None) -> str:
    """The claim as units make it (``CLAIM_SQL``), or with another wait."""
    with engine.begin() as conn:
        if wait_ms is None:
            result = conn.execute(_commit.CLAIM_SQL, {"marker": str(marker)})
        else:
            result = conn.execute(
                sa.text("SELECT resilient_db.claim_commit(CAST(:m AS uuid), :w)"),
                {"m": str(marker), "w": wait_ms},
            )
        return str(result.scalar())


# -- the client's proof that a statement can't write ------------------------------------------
@pytest.mark.parametrize(
    "statement",
    [
        "SELECT marker_counters.id, marker_counters.value FROM marker_counters "
        "WHERE marker_counters.id = %(pk_1)s::INTEGER",
        "SELECT count(*) AS count_1 FROM t WHERE t.a IN (%(a_1_1)s, %(a_1_2)s)",
        "SELECT t.a FROM t JOIN u ON t.id = u.t_id ORDER BY t.a DESC LIMIT $1::INTEGER",
        "  (SELECT lower(t.name) FROM t) UNION (SELECT upper(u.name) FROM u)",
        "SELECT t.a FROM t FOR UPDATE",
        "SHOW transaction_read_only",
        # transaction control writes nothing itself (asyncpg sends savepoints through execute)
        "SAVEPOINT sa_savepoint_1",
        "RELEASE SAVEPOINT sa_savepoint_1",
        "ROLLBACK TO SAVEPOINT sa_savepoint_1",
        "",
        ";",  # asyncpg's ping (SQLAlchemy's pool_pre_ping)
        # built-in operators, and operator characters that are no operator
        "SELECT t.a FROM t WHERE t.j ->> %(j_1)s::TEXT = %(p)s AND t.arr @> %(a)s::INTEGER[]",
        "SELECT t.a FROM t WHERE t.a != 1 AND t.b <> 2 AND t.c ~* 'x' AND t.d=-1 AND t.e*-1 > 0",
        "SELECT '##!' AS a, \"x##y\" FROM t WHERE t.a = $1::INTEGER + $2",
        # the grammar's words before a "(" where the grammar puts them: no call
        "SELECT count(*) FILTER (WHERE t.a > 1) FROM t",
        "SELECT row_number() OVER (PARTITION BY t.a ORDER BY t.b) FROM t",
        "SELECT t.a FROM t GROUP BY (t.a) ORDER BY (t.a)",
        "SELECT t.a FROM t JOIN (SELECT u.a FROM u) AS s ON s.a = t.a",
        "SELECT t.a FROM t LEFT OUTER JOIN(values (1)) AS v ON true",
        # joins SQLAlchemy nests (a many-to-many joinedload)
        "SELECT p.id FROM posts AS p LEFT OUTER JOIN (post_tags AS pt JOIN tags AS t "
        "ON t.id = pt.tag_id) ON p.id = pt.post_id",
        "SELECT u.id FROM users AS u JOIN (posts JOIN tags ON true) ON true",
        "SELECT u.id FROM (users AS u JOIN posts AS p ON true) JOIN (tags) ON true",
        "BEGIN",
        "START TRANSACTION",
        # (one that names an isolation level may set the level SQLAlchemy knows: taken as one
        # that may write, see test_lost_answer_after_midway_commit.py)
    ],
)
def test_plain_selects_are_proven_read_only(statement: str) -> None:
    assert not may_write(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO t (a) VALUES (%(a)s)",
        "UPDATE t SET a = 1",
        "DELETE FROM t",
        "SELECT transfer(1, 2)",  # a function that may write
        "SELECT app.transfer(1, 2)",  # schema-qualified
        'SELECT "Transfer"(1)',  # quoted
        "SELECT * INTO copy FROM t",  # SELECT INTO creates a table
        "WITH moved AS (DELETE FROM t RETURNING *) SELECT * FROM moved",
        "SELECT 1; DELETE FROM t",
        "CALL do_things()",
        "select nextval('seq')",
        "SAVEPOINT a; DELETE FROM t",
        "ROLLBACK; INSERT INTO t (a) VALUES (1)",
        # comments are whitespace to PostgreSQL: these call transfer
        "SELECT transfer/**/(1, 2)",
        "SELECT transfer -- lower\n(1, 2)",
        "SELECT app.transfer/* x */(1)",
        'SELECT "Transfer"/**/(1)',
        # comments a simple scan can't tell from the rest: judged as writing
        "SELECT 1 /* a /* nested */ */",
        "SELECT $$ -- $$",
        "SELECT 1 /* unterminated",
        # an operator of the database's own calls its function, which may write
        "SELECT %(p_1)s ##! %(p_2)s",
        "SELECT t.a FROM t WHERE t.a <-% $1",
        # an escaped quote in an E'' string hides the rest from a simple scan
        "SELECT E'\\'' AS a, 1 ##! 2 AS b, '' AS c",
        # a statement after SHOW in the same text
        "SHOW search_path; DELETE FROM t",
        # an unquoted name may hold any non-ASCII character: taken whole, it is no built-in
        "SELECT записать(1)",
        "SELECT ésum(1)",  # not sum(
        "SELECT app.записать(1)",
        "SELECT sum\xa0(1)",  # a no-break space is part of the name (only ASCII space is space)
        "SELECT 1INTO t",  # SELECT 1 INTO t, to a server before PostgreSQL 15
        # words of the grammar that can name a function of yours, called as one
        "SELECT filter(1)",
        "SELECT over (1)",
        "SELECT t.a, join(t.a) FROM t",
        "SELECT by(1), is(2), ilike(3), nulls(4), similar(5), within(6)",
        "SELECT t.a FROM t WHERE t.a = filter(1)",
        "SELECT (filter(1))",
        # PostgreSQL folds only ASCII letters: the Kelvin sign makes a name of its own
        "SELECT ran\u212a(1)",
        # asyncpg (and psycopg given no parameters) send %% as it is written: an operator
        "SELECT 1 %% 2",
        # a quote inside a dollar-quoted body opens no string: the operator after it is seen
        "SELECT $$'$$ AS q, 1 ##! 2 AS w, '$$' AS r",
        "BEGIN; INSERT INTO t (a) VALUES (1)",
        # a call of a join of yours, whatever follows its "(": values may name a column
        "SELECT join(values) FROM v",
        "SELECT t.a FROM t WHERE join (values) > 0",
        "SELECT t.a FROM t JOIN join(1) AS j ON true",
        "SELECT t.a FROM t, LATERAL join(t.a) AS j",
        # psycopg's placeholders, sent as they are written (asyncpg; psycopg given no
        # parameters), can spell an operator of yours: <% on a column s
        "SELECT 1 <%s FROM (SELECT 2 AS s) q",
    ],
)
def test_anything_else_may_write(statement: str) -> None:
    assert may_write(statement)


@pytest.mark.parametrize(
    "statement",
    [
        # a comment appended to every statement (SQLCommenter, as OpenTelemetry's SQLAlchemy
        # instrumentation adds) keeps a read read-only
        "SELECT t.a FROM t WHERE t.id = %(pk)s /*traceparent='00-4bf9-00f0-01'*/",
        "/* leading */ SELECT lower(t.name) FROM t -- trailing",
        "SELECT '--' AS a, '/*' AS b FROM t",
    ],
)
def test_comments_are_whitespace_to_the_read_only_proof(statement: str) -> None:
    assert not may_write(statement)


#: writes hidden from a look at the statement's text, each once taken for a read: its COMMIT
#: went out without a marker and a lost answer was replayed (the row written twice).
#: ``w/**/(...)`` calls ``w``; ``1 ##! 2`` calls the operator's function.
HIDDEN_WRITES: dict[str, tuple[list[str], sa.Executable]] = {
    "call-behind-a-comment": (
        [],
        sa.text("SELECT hidden_write/**/(1, 2)"),
    ),
    "operator": (
        ["CREATE OPERATOR ##! (LEFTARG = int, RIGHTARG = int, FUNCTION = hidden_write)"],
        sa.select(sa.literal(1).op("##!")(2)),
    ),
    # a name with a non-ASCII letter, once read as the built-in sum(
    "non-ascii-name": (
        [
            "CREATE FUNCTION ésum(a int, b int) RETURNS int LANGUAGE sql "
            "AS 'SELECT hidden_write(a, b)'"
        ],
        sa.text("SELECT ésum(1, 2)"),
    ),
    # words of the grammar (OVER, FILTER, JOIN, ...) that can name a function of yours, once
    # taken for the grammar's wherever they stood before a "("
    "grammar-word": (
        [
            "CREATE FUNCTION filter(a int, b int) RETURNS int LANGUAGE sql "
            "AS 'SELECT hidden_write(a, b)'"
        ],
        sa.select(sa.func.filter(1, 2)),
    ),
    "type-func-keyword": (
        [
            "CREATE FUNCTION join(a int, b int) RETURNS int LANGUAGE sql "
            "AS 'SELECT hidden_write(a, b)'"
        ],
        sa.text("SELECT join(1, 2)"),
    ),
    # PostgreSQL folds only ASCII letters; Python's lower() made the Kelvin sign a "k"
    "kelvin-sign": (
        [
            "CREATE FUNCTION ran\u212a(a int, b int) RETURNS int LANGUAGE sql "
            "AS 'SELECT hidden_write(a, b)'"
        ],
        sa.text("SELECT ran\u212a(1, 2)"),
    ),
    # a function of the database's own under a built-in's name, which the call reaches (its
    # argument types match it, not the built-in): the check at connect distrusts the name
    "built-in-name": (
        [
            "CREATE FUNCTION public.lower(a int, b int) RETURNS int LANGUAGE sql "
            "AS 'SELECT hidden_write(a, b)'"
        ],
        sa.text("SELECT lower(1, 2)"),
    ),
    # an aggregate of the database's own under a built-in's name (IMMUTABLE to the catalog,
    # whatever its state function does), and a STABLE function calling one that writes
    "aggregate-under-a-built-in-name": (
        [
            "CREATE FUNCTION count_step(s int, v int) RETURNS int LANGUAGE sql "
            "AS 'SELECT hidden_write(s, v)'",
            "CREATE AGGREGATE public.count(int) (SFUNC = count_step, STYPE = int, INITCOND = '0')",
        ],
        sa.select(sa.func.count(sa.literal(3))),
    ),
    "stable-function-under-a-built-in-name": (
        [
            "CREATE FUNCTION public.upper(a int, b int) RETURNS int STABLE LANGUAGE sql "
            "AS 'SELECT hidden_write(a, b)'"
        ],
        sa.text("SELECT upper(1, 2)"),
    ),
    # a quote inside a dollar-quoted body once opened a "string" that hid the operator
    "operator-after-a-dollar-quote": (
        ["CREATE OPERATOR ##! (LEFTARG = int, RIGHTARG = int, FUNCTION = hidden_write)"],
        sa.text("SELECT w FROM (SELECT $$'$$ AS q, 1 ##! 2 AS w, '$$' AS r) s"),
    ),
}


def _hidden_writer(engine: sa.Engine, setup: list[str]) -> None:
    """``hidden_write(a, b)``, which writes a + b to ``hidden_writes``, and ``setup``."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE hidden_writes (v int)")
        conn.exec_driver_sql(
            "CREATE FUNCTION hidden_write(a int, b int) RETURNS int LANGUAGE sql "
            "AS 'INSERT INTO hidden_writes VALUES (a + b) RETURNING a + b'"
        )
        for sql in setup:
            conn.exec_driver_sql(sql)


@pytest.mark.parametrize("hidden", sorted(HIDDEN_WRITES))
@pytest.mark.usefixtures("trusted_calls")
def test_a_hidden_write_is_not_replayed_after_a_lost_answer(
    engine: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str, hidden: str
) -> None:
    setup, statement = HIDDEN_WRITES[hidden]
    _hidden_writer(engine, setup)
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    try:
        Sessions = rdb.ResilientSession(proxied, service=service)
        calls = []

        def write(session: Session) -> object:
            calls.append(1)
            return session.execute(statement).scalar()

        Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
        fault_proxy.lose_commit_answer()
        assert Sessions.run(write) == 3
        assert fault_proxy.commits_lost == 1
    finally:
        proxied.dispose()
    assert calls == [1]  # verified, not replayed
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM hidden_writes").scalar() == 1


#: writes hidden from asyncpg's statement noting, each once taken for a read: ``BEGIN;
#: INSERT ...`` sent through the raw connection's ``execute`` was taken for asyncpg's own
#: BEGIN and not looked at; ``%%`` names an operator of the database's own there (asyncpg
#: sends the text as it is written), once read as psycopg's escaped ``%``.
ASYNCPG_HIDDEN_WRITES: dict[str, tuple[list[str], str]] = {
    "begin-and-a-write": ([], "BEGIN; INSERT INTO hidden_writes VALUES (3)"),
    "percent-percent-operator": (
        # (%%%% through psycopg's exec_driver_sql: %%)
        ["CREATE OPERATOR %%%% (LEFTARG = int, RIGHTARG = int, FUNCTION = hidden_write)"],
        "SELECT 1 %% 2",
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("hidden", sorted(ASYNCPG_HIDDEN_WRITES))
async def test_asyncpg_a_hidden_write_is_not_replayed_after_a_lost_answer(
    engine: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str, hidden: str
) -> None:
    setup, statement = ASYNCPG_HIDDEN_WRITES[hidden]
    _hidden_writer(engine, setup)
    proxied = create_async_engine(fault_proxy.url(pg_database, driver="asyncpg"))
    calls = []
    try:
        Sessions = rdb.AsyncResilientSession(proxied, service=service)

        async def write(session: AsyncSession) -> None:
            calls.append(1)
            conn = await session.connection()
            await conn.execute(sa.text("SELECT 1"))  # (SQLAlchemy's BEGIN goes out)
            raw = await conn.get_raw_connection()
            await raw.driver_connection.execute(statement)  # type: ignore[union-attr]

        await Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
        fault_proxy.lose_commit_answer()
        await Sessions.run(write)
        assert fault_proxy.commits_lost == 1
    finally:
        await proxied.dispose()
    assert calls == [1]  # verified, not replayed
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM hidden_writes").scalar() == 1


@pytest.mark.asyncio
async def test_asyncpg_a_write_through_a_cursor_is_not_replayed_after_a_lost_answer(
    engine: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    """asyncpg's ``cursor()`` on the driver connection sends its statement itself: a write
    made through it (an UPDATE ... RETURNING read row by row) is noted all the same, so the
    COMMIT whose answer is lost is verified, not taken for a read-only one and replayed."""
    proxied = create_async_engine(fault_proxy.url(pg_database, driver="asyncpg"))
    calls = []
    try:
        Sessions = rdb.AsyncResilientSession(proxied, service=service)

        async def write(session: AsyncSession) -> None:
            calls.append(1)
            conn = await session.connection()
            await conn.execute(sa.text("SELECT 1"))  # (SQLAlchemy's BEGIN goes out)
            raw: Any = (await conn.get_raw_connection()).driver_connection
            query = "UPDATE marker_counters SET value = value + 1 RETURNING value"
            assert [row[0] async for row in raw.cursor(query)] == [1]

        await Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
        fault_proxy.lose_commit_answer()
        await Sessions.run(write)
        assert fault_proxy.commits_lost == 1
    finally:
        await proxied.dispose()
    assert calls == [1]  # verified, not replayed
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar_one() == 1


@pytest.mark.parametrize(
    "statement",
    [
        "NOTIFY jobs",
        "notify jobs, 'ready'",
        "SELECT pg_notify('jobs', 'ready')",
        "SELECT PG_NOTIFY ('j', '')",
        # not at the statement's head
        "SELECT 1; NOTIFY jobs, 'ready'",
        "DO $$ BEGIN NOTIFY jobs; END $$",
        "DO $$ BEGIN PERFORM pg_notify('jobs', 'ready'); END $$",
        "DO $$ BEGIN IF true THEN NOTIFY jobs; END IF; END $$",
        "DO $$ BEGIN EXECUTE 'NOTIFY jobs'; END $$",
        "-- tell the workers\nNOTIFY jobs",
        'SELECT 1; /* then */ NOTIFY "Jobs"',
        # a command put together from pieces in a string a block EXECUTEs
        "DO $$ BEGIN EXECUTE 'NOTIFY' || ' jobs, ' || quote_literal('ready'); END $$",
        "DO $$ BEGIN EXECUTE format('%s jobs, %L', 'NOTIFY', 'ready'); END $$",
        "DO $$ BEGIN EXECUTE $q$NOTIFY$q$ || ' jobs'; END $$",
        "DO $$BEGIN NOTIFY jobs; END$$",
        # a -- comment ends at a carriage return too
        "-- tell the workers\rNOTIFY jobs",
        "SELECT 1; -- then\rNOTIFY jobs",
        "SELECT 'a\\b'; -- then\rNOTIFY jobs",
        # the function spelled as a quoted name, or with a comment before its arguments
        "SELECT \"pg_notify\"('jobs', 'ready')",
        "SELECT pg_catalog.\"pg_notify\"('jobs', 'ready')",
        "SELECT pg_notify /* the queue */ ('jobs', $$ready$$)",
    ],
)
def test_notifications_are_writes_whose_xid_comes_at_commit(statement: str) -> None:
    # (a DO block also carries COMMITS_INSIDE: see tests/test_commits_inside_statements.py; a
    # text that EXECUTEs a command, WRITES too: the command may be any)
    assert _statements.verdict_of(statement) & _statements._KIND == _statements.NOTIFIES
    assert may_write(statement)


@pytest.mark.parametrize(
    ("statement", "verdict"),
    [
        ("SELECT notify FROM prefs WHERE id = 1", _statements.READ_ONLY),
        ('SELECT "notify", p.notify FROM prefs p', _statements.READ_ONLY),
        ("SELECT id FROM events WHERE kind = 'notify'", _statements.READ_ONLY),
        ("SELECT id AS notify FROM events", _statements.READ_ONLY),
        ("UPDATE prefs SET notify = true", _statements.MAY_WRITE | _statements.WRITES),
        (
            "INSERT INTO prefs (id, notify) VALUES (1, true)",
            _statements.MAY_WRITE | _statements.WRITES,
        ),
        ("SELECT id FROM events WHERE kind = 'notify' -- x\rAND 1 = 1", _statements.READ_ONLY),
        ("DO $$ BEGIN PERFORM 1 FROM prefs WHERE notify; END $$", _statements.MAY_WRITE),
    ],
)
def test_a_name_or_value_that_is_the_word_notify_is_no_notification(
    statement: str, verdict: int
) -> None:
    """Only a ``NOTIFY`` command is one: a read of a column named ``notify`` stays a read."""
    assert _statements.verdict_of(statement) & ~_statements.COMMITS_INSIDE == verdict


@pytest.mark.parametrize(
    "statement", ["DISCARD ALL", "deallocate all", f"DEALLOCATE {PREPARED}", "  Discard plans"]
)
def test_discard_and_deallocate_may_drop_the_prepared_marker(statement: str) -> None:
    assert _statements.verdict_of(statement) == _statements.DEALLOCATES
    assert may_write(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "SET TRANSACTION READ ONLY",
        "set transaction isolation level serializable, read  only, deferrable",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SET default_transaction_read_only = on",
        "SET LOCAL transaction_read_only TO off",
        "SELECT set_config('transaction_read_only', 'on', true)",
        "SET TRANSACTION READ WRITE",
        "START TRANSACTION READ ONLY",
    ],
)
def test_statements_that_may_make_transactions_read_only_stop_the_prepared_marker(
    statement: str,
) -> None:
    """In a read-only transaction the server refuses the prepared INSERT before looking at its
    condition: after such a statement the connection's COMMITs call the function."""
    # (with SETS_ISOLATION where it names a level: see test_lost_answer_after_midway_commit.py)
    verdict = _statements.verdict_of(statement) & ~_statements.SETS_ISOLATION
    assert verdict == _statements.STOPS_PREPARED


def test_uuid7_is_version_7_time_ordered_and_unique() -> None:
    ids = [uuid7() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    millis = [u.int >> 80 for u in ids]
    assert millis == sorted(millis)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_process_never_hands_out_its_parents_marker_ids() -> None:
    """The random part comes from a generator seeded from os.urandom; a forked child
    (gunicorn's workers) seeds its own, so parent and child never make the same ids."""
    random_bits = (1 << 62) - 1  # the last 62 bits are random in every id (after the variant)
    uuid7()  # the parent has a buffer
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then leave at once
        try:
            os.write(write, ",".join(str(uuid7().int & random_bits) for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = {int(x) for x in pipe.read().split(",")}
    os.waitpid(pid, 0)
    parent = {uuid7().int & random_bits for _ in range(5)}
    assert len(child) == 5
    assert not child & parent


# -- the markers' SQL -----------------------------------------------------------------------------
def test_install_is_idempotent_and_uninstall_removes_everything(engine: sa.Engine) -> None:
    rdb.install_commit_markers(engine)
    with engine.begin() as conn:
        rdb.install_commit_markers(conn)
    with Session(engine) as session:
        rdb.install_commit_markers(session)
        session.commit()
    assert markers(engine) == []
    # an install over the first version's claim_commit(uuid) replaces it, not overloads it
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION resilient_db.claim_commit(marker uuid) RETURNS text "
            "LANGUAGE sql AS $$ SELECT 'old' $$"
        )
    rdb.install_commit_markers(engine)
    with engine.connect() as conn:
        signatures = (
            conn.exec_driver_sql(
                "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n "
                "ON n.oid = p.pronamespace WHERE n.nspname = 'resilient_db' AND "
                "p.proname = 'claim_commit'"
            )
            .scalars()
            .all()
        )
    assert signatures == ["resilient_db.claim_commit(uuid,integer)"]
    public_usage = sa.text("SELECT has_schema_privilege('public', 'resilient_db', 'USAGE')")
    with engine.connect() as conn:
        assert conn.execute(public_usage).scalar() is True
    rdb.uninstall_commit_markers(engine)
    rdb.uninstall_commit_markers(engine)  # idempotent too
    with engine.connect() as conn:
        # the schema the install made goes too: nothing else was in it
        assert conn.scalar(sa.text("SELECT to_regnamespace('resilient_db')")) is None
    rdb.install_commit_markers(engine)
    assert markers(engine) == []


@pytest.mark.parametrize(
    "tables",
    [
        pytest.param(
            "CREATE TABLE resilient_db.commit_markers (id uuid NOT NULL, fence boolean)",
            id="no primary key",
        ),
        pytest.param(
            "CREATE TABLE resilient_db.commit_markers (id uuid PRIMARY KEY)", id="no fence"
        ),
        pytest.param(
            "CREATE TABLE resilient_db.commit_markers (id text PRIMARY KEY, fence boolean)",
            id="text ids",
        ),
        pytest.param(
            "CREATE TABLE resilient_db.commit_markers (id uuid, fence boolean, "
            "n int, PRIMARY KEY (id, n))",
            id="a wider key",
        ),
        pytest.param(
            "CREATE TABLE resilient_db.commit_markers (id uuid PRIMARY KEY, fence boolean); "
            "CREATE TABLE resilient_db.commit_markers_born (born timestamptz)",
            id="born of another type",
        ),
    ],
)
def test_an_install_refuses_tables_of_another_shape_and_changes_nothing(
    engine: sa.Engine, tables: str
) -> None:
    """Tables of the markers' names made by hand (or changed since) were kept by ``CREATE
    TABLE IF NOT EXISTS`` and labelled current: every check of a lost answer then failed, and
    each ended unknown, a never-committed one too, silently. The install refuses them, saying
    what they need and how to make it so, and leaves the database as it was."""
    rdb.uninstall_commit_markers(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA resilient_db; {tables}")
    try:
        for install in (rdb.install_commit_markers, _install_on_a_connection):
            with pytest.raises(sa.exc.DBAPIError) as info:
                install(engine)
            assert rdb.sqlstate_of(info.value) == "42P16"
            assert "are not the ones commit markers need" in str(info.value)
            with engine.connect() as conn:  # nothing of the install is left
                assert conn.scalar(sa.text(NO_FUNCTIONS)) is True
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA resilient_db CASCADE")
        rdb.install_commit_markers(engine)


def test_an_install_refuses_a_markers_table_changed_after_it_and_repairs_a_lost_born(
    engine: sa.Engine,
) -> None:
    """The markers installed, then their table's primary key dropped: an install again (at an
    application's start-up, by ``Engine``) took them for current and did nothing; it refuses
    them now. A ``commit_markers_born`` dropped since is made again by it."""
    rdb.install_commit_markers(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE resilient_db.commit_markers_born")
    rdb.install_commit_markers(engine)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM resilient_db.commit_markers_born")) == 1
        name = conn.scalar(
            sa.text(
                "SELECT conname FROM pg_constraint WHERE conrelid = "
                "'resilient_db.commit_markers'::regclass AND contype = 'p'"
            )
        )
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE resilient_db.commit_markers DROP CONSTRAINT {name}")
    try:
        with pytest.raises(sa.exc.DBAPIError) as info:
            rdb.install_commit_markers(engine)
        assert rdb.sqlstate_of(info.value) == "42P16"
    finally:
        rdb.uninstall_commit_markers(engine)
        rdb.install_commit_markers(engine)


NO_FUNCTIONS = (
    "SELECT to_regprocedure('resilient_db.mark_commit(uuid)') IS NULL "
    "AND to_regprocedure('resilient_db.claim_commit(uuid, integer)') IS NULL"
)


def _install_on_a_connection(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        rdb.install_commit_markers(conn)


def _uninstalled(by: sa.Engine, engine: sa.Engine) -> list[str]:
    """``uninstall_commit_markers`` run through ``by``: the markers are gone (as ``engine``
    sees); the server's notices and warnings to it, as ``"SEVERITY: message detail"``."""
    notices: list[str] = []
    with by.begin() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.add_notice_handler(
            lambda d: notices.append(f"{d.severity}: {d.message_primary} {d.message_detail}")
        )
        rdb.uninstall_commit_markers(conn)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT to_regclass('resilient_db.commit_markers')")) is None
    return notices


def test_uninstall_keeps_the_schema_when_it_holds_other_objects(engine: sa.Engine) -> None:
    """A table of the application's in schema ``resilient_db``: the uninstall removes the
    markers, keeps the schema and the table, and the server's WARNING names the table."""
    rdb.install_commit_markers(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE resilient_db.app_notes (id integer PRIMARY KEY)")
    try:
        notices = _uninstalled(engine, engine)
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT to_regclass('resilient_db.app_notes')")) is not None
        warned = [n for n in notices if n.startswith("WARNING: ")]
        assert len(warned) == 1, notices
        assert warned[0].startswith("WARNING: schema resilient_db is kept")
        assert "app_notes" in warned[0]
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS resilient_db.app_notes")
        rdb.install_commit_markers(engine)


def test_uninstall_keeps_a_schema_another_role_made_for_the_install(
    engine: sa.Engine, pg_server: Any, pg_database: str
) -> None:
    """A DBA (a superuser) made schema ``resilient_db`` and let the application's migration
    role create in it; that role installed the markers and uninstalls them: the markers go,
    the schema stays with a WARNING (it failed with "must be owner of schema", and the whole
    uninstall, an Alembic downgrade, was rolled back)."""
    role = f"rdb_installer_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    rdb.uninstall_commit_markers(engine)  # (the fixture's install, by the superuser)
    pg_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    installer = sa.create_engine(engine.url.set(username=role, password=password))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE SCHEMA resilient_db; GRANT USAGE, CREATE ON SCHEMA resilient_db TO {role}"
            )
            # (the database's owner, as the migration role often is, may create schemas)
            conn.exec_driver_sql(f'GRANT CREATE ON DATABASE "{pg_database}" TO {role}')
        rdb.install_commit_markers(installer)
        notices = _uninstalled(installer, engine)
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT to_regnamespace('resilient_db')")) is not None
        kept = [n for n in notices if "schema resilient_db is kept" in n]
        assert len(kept) == 1, notices
        assert kept[0].startswith("WARNING: schema resilient_db is kept: this role may not")
        assert f"It belongs to {engine.url.username}." in kept[0]
    finally:
        installer.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS resilient_db CASCADE")
        pg_server.execute(f"DROP OWNED BY {role}", database=pg_database)
        pg_server.execute(f"DROP ROLE {role}")
        rdb.install_commit_markers(engine)


def test_mark_commit_refuses_a_login_role_that_may_not_write_markers(engine: sa.Engine) -> None:
    """The function runs as its owner, so that a role a unit switched to can call it; it lends
    no right: the role that logged in (``session_user``) must be allowed to write markers."""
    outsider = f"rdb_outsider_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {outsider} NOLOGIN"))
        conn.execute(sa.text(f"GRANT SELECT, UPDATE ON marker_counters TO {outsider}"))
    mark = sa.text("SELECT resilient_db.mark_commit(:m)")
    insert = sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"SET SESSION AUTHORIZATION {outsider}"))
            conn.execute(sa.text("UPDATE marker_counters SET value = value + 1"))
            with pytest.raises(sa.exc.ProgrammingError, match="may not write commit markers"):
                conn.execute(mark, {"m": uuid7()})
            conn.rollback()
        with engine.begin() as conn:
            conn.execute(sa.text(f"SET SESSION AUTHORIZATION {outsider}"))
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                conn.execute(insert, {"m": uuid7()})
            conn.rollback()
    finally:
        engine.dispose()  # no pooled connection keeps the session authorization
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {outsider}"))
            conn.execute(sa.text(f"DROP ROLE {outsider}"))
    assert markers(engine) == []


def test_mark_commit_writes_a_marker_only_for_a_transaction_that_wrote(engine: sa.Engine) -> None:
    wrote, read = uuid7(), uuid7()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE marker_counters SET value = value + 1"))
        conn.execute(sa.text("SELECT resilient_db.mark_commit(:m)"), {"m": wrote})
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT value FROM marker_counters"))
        conn.execute(sa.text("SELECT resilient_db.mark_commit(:m)"), {"m": read})
    assert markers(engine) == [(wrote, False)]


def test_claim_of_a_committed_marker_says_committed_and_writes_nothing(engine: sa.Engine) -> None:
    marker = uuid7()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE marker_counters SET value = value + 1"))
        conn.execute(sa.text("SELECT resilient_db.mark_commit(:m)"), {"m": marker})
    assert claim(engine, marker) == "committed"
    assert claim(engine, marker) == "committed"
    assert markers(engine) == [(marker, False)]


def test_claim_of_a_missing_marker_fences_off_the_original(engine: sa.Engine) -> None:
    marker = uuid7()
    assert claim(engine, marker) == "fenced"
    assert claim(engine, marker) == "fenced"  # a second claim (the first one's answer was lost)
    # the original transaction, arriving late, can no longer commit
    with engine.connect() as conn:
        conn.execute(sa.text("UPDATE marker_counters SET value = value + 100"))
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("SELECT resilient_db.mark_commit(:m)"), {"m": marker})
        conn.rollback()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT value FROM marker_counters")).scalar() == 0


def test_claim_waits_for_the_original_still_committing(engine: sa.Engine) -> None:
    marker = uuid7()
    original = engine.connect()
    try:
        original.execute(sa.text("UPDATE marker_counters SET value = value + 1"))
        original.execute(sa.text("SELECT resilient_db.mark_commit(:m)"), {"m": marker})
        # the original holds the marker uncommitted: the claim waits (up to its wait), then
        # gives up with a lock timeout, which the unit treats as "check again later"
        with pytest.raises(sa.exc.OperationalError) as info:
            claim(engine, marker, wait_ms=100)
        assert rdb.sqlstate_of(info.value) == "55P03"
        original.commit()
    finally:
        original.close()
    assert claim(engine, marker) == "committed"


#: a deferred trigger that makes a counter's COMMIT wait for the ``commit_gate`` row, which a
#: test holds locked: the transaction, its marker written, is still committing meanwhile
COMMIT_GATE = [
    "CREATE TABLE commit_gate (id int PRIMARY KEY)",
    "INSERT INTO commit_gate VALUES (1)",
    "CREATE FUNCTION pass_commit_gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "PERFORM 1 FROM commit_gate WHERE id = 1 FOR SHARE; RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER pass_commit_gate AFTER UPDATE ON marker_counters "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pass_commit_gate()",
]


@contextlib.contextmanager
def commit_outlasting_a_claim(
    engine: sa.Engine, proxy: FaultProxy, database: str | None
) -> Iterator[None]:
    """The COMMIT of the counter sent through ``proxy`` in the block is held at the gate
    (``COMMIT_GATE``), its connection cut meanwhile (the answer lost), and let through only
    once a claim of it has waited, given up (55P03), and a claim waits again."""
    with engine.begin() as conn:
        for statement in COMMIT_GATE:
            conn.exec_driver_sql(statement)
    gate = engine.connect()
    gate.execute(sa.text("SELECT 1 FROM commit_gate WHERE id = 1 FOR UPDATE"))
    lock_waits = sa.text(
        "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE datname = :db "
        "AND wait_event_type = 'Lock' AND (query LIKE '%claim_commit%') = :claim"
    )

    def lose_then_release() -> None:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:

            def until(claim: bool, waits: bool) -> None:
                for _ in range(3000):  # (bounded: each comes within the claims' waits)
                    found = watch.execute(lock_waits, {"db": database, "claim": claim})
                    if (found.scalar_one() > 0) is waits:
                        return
                    time.sleep(0.01)

            until(claim=False, waits=True)  # the COMMIT waits at the gate
            proxy.cut_all()  # its answer lost: the unit checks
            until(claim=True, waits=True)  # a claim waits for the original...
            until(claim=True, waits=False)  # ...and gives up (55P03)
            until(claim=True, waits=True)  # the check runs again
            gate.commit()  # the original commits: that claim finds it

    releaser = threading.Thread(target=lose_then_release, daemon=True)
    releaser.start()
    try:
        yield
    finally:
        releaser.join(60)
        gate.close()


def test_a_lost_answer_whose_commit_outlasts_a_claims_wait_is_checked_again_and_done_once(
    engine: sa.Engine, fault_proxy: FaultProxy, pg_url: str, service: str
) -> None:
    """A unit's COMMIT reached the server, which is still committing it (a deferred trigger
    waits for a row lock) when the connection is lost. The check's claim waits for the
    original and gives up after its wait (55P03): that is no verdict, the check runs again;
    once the original commits, the next claim finds it committed. The unit is done once,
    never fenced and replayed (a second write)."""
    database = sa.make_url(pg_url).database
    proxied = sa.create_engine(fault_proxy.url(database))
    calls = []

    def bump(session: Session) -> None:
        calls.append(1)
        session.execute(sa.update(Counter).values(value=Counter.value + 1))

    try:
        Sessions = rdb.ResilientSession(proxied, service=service)
        Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
        with commit_outlasting_a_claim(engine, fault_proxy, database):
            Sessions.run(bump)
    finally:
        proxied.dispose()
    assert calls == [1], "replayed: its COMMIT, still running, was fenced"
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar_one() == 1
    assert [fence for _, fence in markers(engine)] == [False]


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_a_lost_answer_whose_commit_outlasts_a_claims_wait_is_done_once(
    engine: sa.Engine, fault_proxy: FaultProxy, pg_url: str, service: str, driver: str
) -> None:
    """:func:`test_a_lost_answer_whose_commit_outlasts_a_claims_wait_is_checked_again_and_done_once`
    on the async drivers (asyncpg's claim is sent by asyncpg itself, with a timeout of its own
    past the claim's wait)."""
    database = sa.make_url(pg_url).database
    proxied = create_async_engine(fault_proxy.url(database, driver=driver))
    calls = []

    async def bump(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(sa.update(Counter).values(value=Counter.value + 1))

    try:
        Sessions = rdb.AsyncResilientSession(proxied, service=service)
        await Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
        with commit_outlasting_a_claim(engine, fault_proxy, database):
            await Sessions.run(bump)
    finally:
        await proxied.dispose()
    assert calls == [1], "replayed: its COMMIT, still running, was fenced"
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar_one() == 1
    assert [fence for _, fence in markers(engine)] == [False]


def _marker_at(ms: int, n: int = 12345) -> uuid.UUID:
    """A marker id whose time is ``ms`` (Unix milliseconds)."""
    return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0x2 << 62) | n)


def installed_long_ago(engine: sa.Engine) -> None:
    """The markers' table as if made long ago (its ``born``): claims of markers older than the
    install are judged (tests of the ages a claim judges, with markers of made-up times)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE resilient_db.commit_markers_born "
                "SET born = '00000000-0000-7000-8000-000000000000'"
            )
        )


def test_claim_refuses_markers_older_than_the_horizon_of_the_newest(engine: sa.Engine) -> None:
    """A claim does not judge a marker CLAIM_HORIZON older than the newest marker (another
    client's, written since): it may have been pruned, so its absence proves nothing."""
    installed_long_ago(engine)
    newest = uuid7()
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": newest}
        )
    newest_ms = newest.int >> 80
    old = _marker_at(newest_ms - int((CLAIM_HORIZON + 5) * 1000))
    assert claim(engine, old) == "expired"
    assert markers(engine) == [(newest, False)]  # nothing written
    young = _marker_at(newest_ms - int((CLAIM_HORIZON - 5) * 1000))
    assert claim(engine, young) == "fenced"


@pytest.mark.parametrize("days", [-1, 1])
def test_claims_and_prunes_judge_ages_by_the_markers_not_the_servers_clock(
    engine: sa.Engine, days: int
) -> None:
    """A server whose clock is a day off the clients' (or was stepped since a prune: a failover
    to a server whose clock disagrees) judges markers as the clients wrote them: a prune by one
    clock and a claim by another could take a pruned marker for one never written, and replay a
    committed unit. Markers a day older or younger than the server's clock, the newest of them
    ten seconds ago: a claim of one of the last few minutes is judged (fenced when missing),
    the prune deletes only what is RETENTION older than the newest, and a claim of a pruned one
    is "expired". (The table made long ago: one made since the markers were written answers
    "unknown" for a missing one, see test_a_marker_written_before_the_table_was_made_...)"""
    installed_long_ago(engine)
    with engine.connect() as conn:
        server_ms = conn.execute(
            sa.text("SELECT floor(extract(epoch FROM now()) * 1000)::bigint")
        ).scalar_one()
    base = server_ms + days * 86_400_000  # the clients' "now"
    newest = _marker_at(base - 10_000, 1)
    pruned = [_marker_at(base - int((RETENTION + 60) * 1000), n) for n in range(2, 5)]
    kept = _marker_at(base - int((RETENTION - 60) * 1000), 5)
    with engine.begin() as conn:
        for marker in [newest, *pruned, kept]:
            conn.execute(
                sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": marker}
            )
    assert claim(engine, newest) == "committed"
    missing = _marker_at(base - 60_000, 6)
    assert claim(engine, missing) == "fenced"
    with engine.connect() as conn:
        assert _commit.prune(conn) == 3
    assert {m for m, _ in markers(engine)} == {newest, kept, missing}
    assert all(claim(engine, marker) == "expired" for marker in pruned)


def test_a_claim_that_waited_judges_the_markers_age_again(engine: sa.Engine) -> None:
    """A claim's fence waits for a transaction holding the marker (here one that rolls back).
    Meanwhile a newer marker committed (a prune deleting this marker would have judged by it):
    the claim judges the age again after its wait, and does not take the marker's absence for
    "never committed" ("expired": the unit's outcome is unknown, never a replay that might
    write it twice)."""
    newest_ms = uuid7().int >> 80
    marker = _marker_at(newest_ms, 7)
    holder = engine.connect()
    try:
        holder.execute(
            sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": marker}
        )
        answer: list[str] = []
        waiting = threading.Thread(
            target=lambda: answer.append(claim(engine, marker, wait_ms=10_000))
        )
        waiting.start()
        # the claim is waiting on the holder's row (bounded: 5 s)
        for _ in range(100):
            with engine.connect() as conn:
                waits = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE '%claim_commit%'"
                    )
                ).scalar_one()
            if waits:
                break
            threading.Event().wait(0.05)
        assert waits
        newer = _marker_at(newest_ms + int((CLAIM_HORIZON + 60) * 1000), 8)
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": newer}
            )
        holder.rollback()
        waiting.join(10)
    finally:
        holder.close()
    assert answer == ["expired"]


def test_the_claim_ignores_operators_planted_on_the_callers_search_path(
    engine: sa.Engine,
) -> None:
    """A role that may create objects in a schema on the caller's search_path (public, on
    many databases) plants ``numeric * integer``, which the claim's horizon uses and which has
    no exact built-in match: the claim ran it with the caller's rights (a superuser's, for an
    operator settling a unit by hand) and answered what it made up ("expired" for a marker it
    should fence). The claim's search_path is fixed: the operator never runs."""
    planted = "rdb_planted_" + uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE FUNCTION public.{planted}(numeric, integer) RETURNS numeric "
                "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'planted operator ran'; END $$"
            )
        )
        conn.execute(
            sa.text(
                f"CREATE OPERATOR public.* (LEFTARG = numeric, RIGHTARG = integer, "
                f"FUNCTION = public.{planted})"
            )
        )
    try:
        # the operator is there for anyone not pinning the path
        with engine.begin() as conn, pytest.raises(sa.exc.DBAPIError, match="planted operator"):
            conn.execute(sa.text("SELECT 1.5::numeric * 2"))
        marker = uuid7()
        assert claim(engine, marker) == "fenced"
        assert markers(engine) == [(marker, True)]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP OPERATOR public.* (numeric, integer)"))
            conn.execute(sa.text(f"DROP FUNCTION public.{planted}(numeric, integer)"))


def test_prune_deletes_expired_markers_and_keeps_recent_ones(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        now_ms = conn.execute(
            sa.text("SELECT floor(extract(epoch FROM now()) * 1000)::bigint")
        ).scalar_one()
    expired = [
        uuid.UUID(
            int=((now_ms - int((RETENTION + 60) * 1000)) << 80) | (0x7 << 76) | (0x2 << 62) | i
        )
        for i in range(50)
    ]
    recent = uuid7()
    with engine.begin() as conn:
        for marker in [*expired, recent]:
            conn.execute(
                sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": marker}
            )
    with engine.connect() as conn:
        assert _commit.prune(conn) == 50
    assert markers(engine) == [(recent, False)]


@pytest.fixture
def app_login(engine: sa.Engine, pg_url: str) -> Iterator[tuple[str, str]]:
    """(role, URL): a login role with only the grants the README lists for the application
    (USAGE on the schema, SELECT and INSERT on the markers, never DELETE; its own table's
    rights)."""
    name = f"rdb_app_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
        conn.execute(sa.text(f"GRANT USAGE ON SCHEMA resilient_db TO {name}"))
        conn.execute(sa.text(f"GRANT SELECT, INSERT ON resilient_db.commit_markers TO {name}"))
        conn.execute(sa.text(f"GRANT SELECT, UPDATE ON marker_counters TO {name}"))
    url = sa.make_url(pg_url).set(username=name, password=password)
    yield name, url.render_as_string(hide_password=False)
    engine.dispose()
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP OWNED BY {name}"))
        conn.execute(sa.text(f"DROP ROLE {name}"))


def test_the_application_role_prunes_with_the_documented_grants(
    engine: sa.Engine,
    app_login: tuple[str, str],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The prune's row locks and its DELETE need rights the documented grants don't give (and
    DELETE must not be given: a role that may delete markers can make a committed unit look
    uncommitted). The function runs as its owner and checks the login role's right to write
    markers. Refused (here EXECUTE on it revoked, a common hardening), it is said once per
    engine, naming what the role needs."""
    _, url = app_login
    _add_expired_markers(engine, 30)
    app_engine = sa.create_engine(url)
    try:
        with app_engine.connect() as conn:
            assert _commit.prune(conn) == 30
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                conn.execute(sa.text("DELETE FROM resilient_db.commit_markers"))
            conn.rollback()
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "REVOKE EXECUTE ON FUNCTION resilient_db.prune_commit_markers(integer) "
                    "FROM PUBLIC"
                )
            )
        _add_expired_markers(engine, 5)
        Sessions = rdb.ResilientSession(app_engine, service=service)
        protocol = Sessions._hooks.commit
        caplog.set_level(logging.WARNING, logger="resilient_db")
        for _ in range(2):
            protocol._next_prune = 0.0
            Sessions.run(_bump)
    finally:
        app_engine.dispose()
    assert _expired_markers(engine) == 5
    refused = [r for r in caplog.records if "can't be pruned" in r.getMessage()]
    assert len(refused) == 1
    assert "SQLSTATE 42501" in refused[0].getMessage()
    assert "EXECUTE on resilient_db.prune_commit_markers" in refused[0].getMessage()


def test_a_check_refused_for_want_of_a_right_says_so_in_the_unknown_outcome(
    *,
    engine: sa.Engine,
    app_login: tuple[str, str],
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A lost COMMIT answer whose check is refused (here EXECUTE on the claim revoked after the
    connection was made; row-level security on the markers does the same): the outcome is
    unknown, and the error and its line said only "(unknown)", nothing naming why. They name
    the check's failure and its SQLSTATE."""
    role, url = app_login
    password = sa.make_url(url).password
    proxied = sa.create_engine(
        sa.make_url(fault_proxy.url(pg_database)).set(username=role, password=password)
    )
    Sessions = rdb.ResilientSession(proxied, service=service)
    try:
        assert Sessions.run(_bump) == 1  # connected, markers usable
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "REVOKE EXECUTE ON FUNCTION resilient_db.claim_commit(uuid, integer) "
                    "FROM PUBLIC"
                )
            )
        fault_proxy.lose_commit_answer()
        with (
            caplog.at_level("ERROR", logger="resilient_db"),
            pytest.raises(rdb.CommitOutcomeUnknownError) as info,
        ):
            Sessions.run(_bump)
    finally:
        proxied.dispose()
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "GRANT EXECUTE ON FUNCTION resilient_db.claim_commit(uuid, integer) TO PUBLIC"
                )
            )
    why = "the check on a new connection failed: InsufficientPrivilege (SQLSTATE 42501)"
    assert why in str(info.value)
    assert any(why in r.getMessage() for r in caplog.records if "outcome unknown" in r.getMessage())


def test_the_application_role_may_call_the_install_once_it_is_current(
    engine: sa.Engine, app_login: tuple[str, str]
) -> None:
    """The quickstart calls ``install_commit_markers(engine)`` at startup: as an application
    role with only its grants, that failed even with everything installed (``CREATE SCHEMA IF
    NOT EXISTS`` needs CREATE on the database). Current: no DDL is sent. Not current (a
    function missing): the install runs, and only the owner can run it."""
    _, url = app_login
    app_engine = sa.create_engine(url)
    try:
        rdb.install_commit_markers(app_engine)  # current: nothing to do
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP FUNCTION resilient_db.prune_commit_markers(integer)")
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            rdb.install_commit_markers(app_engine)
    finally:
        app_engine.dispose()
    rdb.install_commit_markers(engine)  # the owner repairs it
    with engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT to_regprocedure('resilient_db.prune_commit_markers(integer)') IS NOT NULL"
        ).scalar()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_an_async_application_role_may_call_the_install_at_startup_through_its_engine(
    engine: sa.Engine, app_login: tuple[str, str], driver: str
) -> None:
    """The README's startup install for asyncio as an application role: through the sync
    Engine of the connection ``run_sync`` gives (``c.engine``), the install looks first on a
    connection of its own and sends no DDL when current, as for a sync Engine (given the
    Connection itself it always installs, which an application role may not)."""
    _, url = app_login
    aengine = create_async_engine(url.replace("postgresql+psycopg", f"postgresql+{driver}"))
    try:
        async with aengine.connect() as conn:
            await conn.run_sync(lambda c: rdb.install_commit_markers(c.engine))
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                await conn.run_sync(rdb.install_commit_markers)  # the Connection: installs
    finally:
        await aengine.dispose()


def test_an_install_by_a_role_that_may_not_create_in_the_database_says_what_it_lacks(
    engine: sa.Engine, app_login: tuple[str, str], pg_database: str
) -> None:
    """An application role (no CREATE on the database, PostgreSQL 15's default) calling the
    install at startup, as the quickstart does, before the owner installed: refused as before
    (42501, a ``ProgrammingError``), and the message names the right it lacks, on what, and
    who installs. Before, the server's "permission denied for database app" said neither
    which right nor why, from a CREATE SCHEMA the caller never wrote."""
    role, url = app_login
    rdb.uninstall_commit_markers(engine)
    app_engine = sa.create_engine(url)
    try:
        with pytest.raises(sa.exc.ProgrammingError) as raised:
            rdb.install_commit_markers(app_engine)
        with app_engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError) as through:
            rdb.install_commit_markers(conn)
    finally:
        app_engine.dispose()
    for error in (raised.value, through.value):
        assert getattr(error.orig, "sqlstate", None) == "42501"
        message = str(error.orig)
        assert f"permission denied for database {pg_database}" in message
        assert f"role {role} lacks CREATE on it" in message
        assert "as the database's owner or a superuser" in message
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT to_regnamespace('resilient_db')").scalar() is None


def _expired_markers(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        horizon = _commit._NEWEST_HORIZON_SQL.format(s=_commit.SCHEMA, ms=int(RETENTION * 1000))
        return int(
            conn.execute(
                sa.text(f"SELECT count(*) FROM resilient_db.commit_markers WHERE id < {horizon}")
            ).scalar_one()
        )


def _add_expired_markers(engine: sa.Engine, count: int) -> None:
    """``count`` markers 20 minutes old, and one of now (the newest, as another client's unit
    would have written it: ages are judged against the newest marker)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": uuid7()}
        )
        conn.execute(
            sa.text(
                "INSERT INTO resilient_db.commit_markers (id) SELECT (lpad(to_hex(floor(extract("
                "epoch FROM now() - interval '20 minutes') * 1000)::bigint), 12, '0') || '7' || "
                "substr(md5(g::text), 1, 3) || '8' || substr(md5(g::text), 4, 15))::uuid "
                "FROM generate_series(1, :n) g"
            ),
            {"n": count},
        )
    assert _expired_markers(engine) == count


def test_units_prune_a_backlog_of_markers_in_short_batches_until_it_is_gone(
    engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune runs after a writing unit's COMMIT, on that unit's time: at most PRUNE_BATCH
    markers. One that fills its batch makes the next due soon (PRUNE_CATCH_UP, 0 here) rather
    than after PRUNE_INTERVAL, so an engine writing faster than one batch per interval is not
    left with a table that grows (before: 5,000 every 10 s, 500 a second at most)."""
    batch = _commit.PRUNE_BATCH
    _add_expired_markers(engine, batch * 5 // 2)
    monkeypatch.setattr(_commit, "PRUNE_CATCH_UP", 0.0)
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(_bump)
    protocol = Sessions._hooks.commit
    assert not protocol.prune_due()  # the first is due an interval after the engine's start
    protocol._next_prune = 0.0  # (as if that interval had passed)
    left = []
    for _ in range(4):
        Sessions.run(_bump)
        left.append(_expired_markers(engine))
    assert left == [batch * 3 // 2, batch // 2, 0, 0]
    assert not protocol.prune_due()  # the last prune did not fill its batch: an interval
    assert len(markers(engine)) == 6  # the units' own, and the newest of the backlog's


@pytest.mark.asyncio
async def test_async_units_prune_a_backlog_of_markers_too(
    engine: sa.Engine, async_engine: AsyncEngine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same prune from an async unit (asyncpg), in a task of its own started after the
    unit's COMMIT (awaited here before the markers are counted)."""
    batch = _commit.PRUNE_BATCH
    _add_expired_markers(engine, batch * 3 // 2)
    monkeypatch.setattr(_commit, "PRUNE_CATCH_UP", 0.0)
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    await Sessions.run(_abump)
    Sessions._hooks.commit._next_prune = 0.0
    left = []
    for _ in range(2):
        await Sessions.run(_abump)
        pruning = Sessions._hooks.commit.pruning
        assert pruning is not None
        await pruning
        left.append(_expired_markers(engine))
    assert left == [batch // 2, 0]


@pytest.fixture
def read_only_by_default(engine: sa.Engine, pg_database: str) -> Iterator[None]:
    """The test's database with ``default_transaction_read_only`` on (a database written only
    by units that ask for it: ``SET TRANSACTION READ WRITE``, ``postgresql_readonly=False``)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(f'ALTER DATABASE "{pg_database}" SET default_transaction_read_only = on')
        )
    engine.dispose()
    yield
    with engine.begin() as conn:
        conn.execute(sa.text("SET TRANSACTION READ WRITE"))
        conn.execute(sa.text(f'ALTER DATABASE "{pg_database}" RESET default_transaction_read_only'))
    engine.dispose()


def _bump_read_write(session: Session) -> int:
    session.execute(sa.text("SET TRANSACTION READ WRITE"))
    return _bump(session)


async def _abump_read_write(session: AsyncSession) -> int:
    await session.execute(sa.text("SET TRANSACTION READ WRITE"))
    return await _abump(session)


def _pool_replaced(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Replacing the pooled" in r.getMessage()]


def test_units_prune_where_transactions_are_read_only_by_default(
    engine: sa.Engine, read_only_by_default: None, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The prune's DELETE is a write: it begins READ WRITE where the server reports
    transactions read-only by default, as a claim does. Before, every prune failed there
    (25006): the expired markers stayed for good, and its error, taken for a server that
    takes no writes (a failover), replaced the engine's pooled connections every 10 s."""
    _add_expired_markers(engine.execution_options(postgresql_readonly=False), 30)
    engine.dispose()  # (psycopg keeps the connection's read_only=False)
    Sessions = rdb.ResilientSession(engine, service=service)
    caplog.set_level(logging.INFO, logger="resilient_db")
    assert Sessions.run(_bump_read_write) == 1
    Sessions._hooks.commit._next_prune = 0.0
    assert Sessions.run(_bump_read_write) == 2
    assert _expired_markers(engine) == 0
    assert _pool_replaced(caplog) == []


@pytest.mark.asyncio
async def test_async_units_prune_where_transactions_are_read_only_by_default(
    engine: sa.Engine,
    read_only_by_default: None,
    async_engine: AsyncEngine,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """:func:`test_units_prune_where_transactions_are_read_only_by_default` on asyncpg."""
    _add_expired_markers(engine.execution_options(postgresql_readonly=False), 30)
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    caplog.set_level(logging.INFO, logger="resilient_db")
    assert await Sessions.run(_abump_read_write) == 1
    Sessions._hooks.commit._next_prune = 0.0
    assert await Sessions.run(_abump_read_write) == 2
    pruning = Sessions._hooks.commit.pruning
    assert pruning is not None
    await pruning
    assert _expired_markers(engine) == 0
    assert _pool_replaced(caplog) == []


# -- the marked message on both drivers -----------------------------------------------------------
def _bump(session: Session) -> int:
    row = session.get(Counter, 1)
    assert row is not None
    row.value += 1
    session.flush()
    return row.value


async def _abump(session: AsyncSession) -> int:
    """:func:`_bump` on asyncpg."""
    row = await session.get(Counter, 1)
    assert row is not None
    row.value += 1
    return row.value


async def _alost_answer_settled(
    Sessions: rdb.AsyncResilientSession[AsyncSession],
    proxy: FaultProxy,
    between: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Two bumps through ``proxy`` (``between`` them, a look at the first one's connection),
    the second one's COMMIT answer lost: it committed before the answer was lost, so the unit
    is done, not replayed (and not "unknown")."""
    calls = []

    async def bump(session: AsyncSession) -> int:
        calls.append(1)
        return await _abump(session)

    assert await Sessions.run(bump) == 1
    if between is not None:
        await between()
    proxy.lose_commit_answer()
    assert await Sessions.run(bump) == 2
    assert proxy.commits_lost == 1
    assert len(calls) == 2  # not replayed


def _round_trips(trace: str) -> list[str]:
    """The frontend messages that wait for an answer, from a libpq trace."""
    sent = []
    for line in trace.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0] == "F" and parts[2] in ("Query", "Sync"):
            sent.append(parts[3].strip() if len(parts) > 3 else parts[2])
    return sent


def _traced(engine: sa.Engine, fn: Any, *, fresh: bool = True) -> list[str]:
    """Run ``fn()`` with libpq tracing every connection of ``engine`` (one pooled connection:
    a new one, unless not ``fresh``)."""
    if fresh:
        engine.dispose()
    path = Path(tempfile.mkstemp(prefix="rdb-trace-")[1])
    handle = path.open("w")
    try:
        with engine.connect() as conn:  # make the pool's connection, then trace it
            raw: Any = conn.connection.driver_connection
            raw.pgconn.trace(handle.fileno())
            raw.pgconn.set_trace_flags(
                psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
            )
        fn()
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.pgconn.untrace()
    finally:
        handle.close()
    text = path.read_text()
    path.unlink()
    return _round_trips(text)


def test_a_writing_unit_sends_its_marker_with_commit_in_one_message(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    plain = sessionmaker(engine)

    def plain_unit() -> None:
        with plain.begin() as session:
            _bump(session)

    plain_trips = _traced(engine, plain_unit)
    ours = _traced(engine, lambda: Sessions.run(_bump))
    assert len(ours) == len(plain_trips), (plain_trips, ours)
    assert plain_trips[-1] == '"COMMIT"'
    assert ours[-1].startswith(f'"EXECUTE {PREPARED}(')
    assert ours[-1].endswith('; COMMIT"')
    assert len(markers(engine)) == 1


def test_a_read_only_unit_commits_plainly_and_leaves_no_marker(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)

    def read(session: Session) -> int:
        return session.execute(sa.select(Counter.value).where(Counter.id == 1)).scalar_one()

    trips = _traced(engine, lambda: Sessions.run(read))
    assert trips[-1] == '"COMMIT"'
    assert markers(engine) == []


def test_a_read_only_unit_with_savepoints_commits_plainly(engine: sa.Engine, service: str) -> None:
    """``begin_nested()`` sends SAVEPOINT and RELEASE / ROLLBACK TO SAVEPOINT: transaction
    control, which writes nothing itself."""
    Sessions = rdb.ResilientSession(engine, service=service)

    def read(session: Session) -> int:
        with session.begin_nested():
            value = session.execute(sa.select(Counter.value).where(Counter.id == 1)).scalar_one()
        nested = session.begin_nested()
        session.execute(sa.select(Counter.value)).all()
        nested.rollback()
        return int(value)

    trips = _traced(engine, lambda: Sessions.run(read))
    assert any("SAVEPOINT" in trip for trip in trips), trips
    assert trips[-1] == '"COMMIT"'
    assert markers(engine) == []


def test_a_rolled_back_write_leaves_no_write_flag_at_the_next_checkout(
    engine: sa.Engine, pg_url: str, service: str
) -> None:
    """The write flag of a transaction that was rolled back is cleared when its connection is
    next checked out (the driver's rollback() is not overridden), so the next transaction on
    it, if read-only, commits plainly."""
    one = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    Sessions = rdb.ResilientSession(one, service=service)
    try:
        with Sessions() as session:
            _bump(session)
            session.flush()
            raw: Any = session.connection().connection.driver_connection
            assert raw._rdb_may_write is True
            session.rollback()
        assert raw._rdb_may_write is True  # returned to the pool as it was
        with one.connect() as conn:
            assert conn.connection.driver_connection is raw  # the pool's only connection
            assert raw._rdb_may_write is False
    finally:
        one.dispose()
    assert markers(engine) == []


def test_a_unit_writing_through_a_function_is_marked(engine: sa.Engine, service: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE OR REPLACE FUNCTION marker_bump() RETURNS int LANGUAGE sql AS "
                "$$ UPDATE marker_counters SET value = value + 1 RETURNING value $$"
            )
        )
    Sessions = rdb.ResilientSession(engine, service=service)
    trips = _traced(
        engine, lambda: Sessions.run(lambda s: s.execute(sa.text("SELECT marker_bump()")).scalar())
    )
    assert trips[-1].startswith(f'"EXECUTE {PREPARED}(')
    assert len(markers(engine)) == 1


def test_without_markers_a_writing_unit_pays_one_round_trip_for_its_xid(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    rdb.uninstall_commit_markers(engine)
    Sessions = rdb.ResilientSession(engine, service=service)
    plain = sessionmaker(engine)

    def plain_unit() -> None:
        with plain.begin() as session:
            _bump(session)

    plain_trips = _traced(engine, plain_unit)
    with caplog.at_level("WARNING", logger="resilient_db"):
        ours = _traced(engine, lambda: Sessions.run(_bump))
        Sessions.run(_bump)
    assert len(ours) == len(plain_trips) + 1
    assert "pg_current_xact_id()::text" in ours[-2]  # (an UPDATE: its xid is assigned)
    assert ours[-1] == '"COMMIT"'
    warnings = [r for r in caplog.records if "Commit markers are not installed" in r.getMessage()]
    assert len(warnings) == 1  # once per engine
    said = warnings[0].getMessage()
    assert said.startswith("[SELF-HEAL] ")
    # it says that units still work, correctly, and what they pay for it
    assert "units still work and stay correct" in said
    assert "one extra round trip per writing unit" in said


@pytest.fixture
def control_data_revoked(engine: sa.Engine) -> Iterator[None]:
    """``pg_control_checkpoint()`` not executable by PUBLIC in the test's database (a
    hardening; the function is in every database's own catalog): the fallback's evidence that
    the server has not restarted can't be read by an application's role."""
    revoke = "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_control_checkpoint() FROM PUBLIC"
    with engine.begin() as conn:
        conn.execute(sa.text(revoke))
    yield
    with engine.begin() as conn:
        conn.execute(sa.text(revoke.replace("REVOKE", "GRANT").replace("FROM", "TO")))


def test_without_markers_a_role_that_may_not_read_the_control_data_still_writes(
    *,
    engine: sa.Engine,
    app_login: tuple[str, str],
    control_data_revoked: None,
    fault_proxy: FaultProxy,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fallback reads the xid before COMMIT with the server's incarnation, which comes from
    ``pg_control_checkpoint()``; its CASE on the role's right to call it did not keep the
    server from checking that right (functions are checked when the statement starts, whatever
    a CASE would evaluate): every writing unit of such a role failed (42501) before its
    COMMIT, and was replayed on a new connection of a ``NullPool`` until its retries ran out
    (with retry off, raised). The check at connect asks for the right: such a connection reads
    the xid alone from the start, so a "committed" can't be trusted (its outcome is unknown,
    as documented), while "aborted" is still proven; the warning says so."""
    _, url = app_login
    rdb.uninstall_commit_markers(engine)
    calls: list[int] = []

    def bump(session: Session) -> int:
        calls.append(1)
        return _bump(session)

    proxied_url = sa.make_url(url).set(host=fault_proxy.host, port=fault_proxy.port)
    proxied = sa.create_engine(proxied_url, pool_size=1)
    unpooled = sa.create_engine(proxied_url, poolclass=sa.pool.NullPool)
    Sessions = rdb.ResilientSession(proxied, service=service)
    Unpooled = rdb.ResilientSession(
        unpooled, service=f"{service}-nullpool", config=rdb.Config(retry=False)
    )
    try:
        with caplog.at_level("WARNING", logger="resilient_db"):
            assert [Sessions.run(bump) for _ in range(2)] == [1, 2]
            assert [Unpooled.run(bump) for _ in range(2)] == [3, 4]
        assert len(calls) == 4  # none replayed, none refused
        fault_proxy.lose_commit_answer()
        with pytest.raises(rdb.CommitOutcomeUnknownError):
            Sessions.run(bump)
        assert len(calls) == 5  # not replayed: it may have committed
    finally:
        proxied.dispose()
        unpooled.dispose()
    with engine.connect() as conn:
        assert conn.scalar(sa.select(Counter.value).where(Counter.id == 1)) == 5
    warnings = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert len(warnings) == 2  # once per engine
    assert all("may not call pg_control_checkpoint()" in w for w in warnings)


def test_without_markers_a_unit_that_switches_to_such_a_role_is_replayed_once_per_engine(
    engine: sa.Engine,
    app_login: tuple[str, str],
    control_data_revoked: None,
    pg_url: str,
    service: str,
) -> None:
    """The login role may read the control data (the check at connect says so), a unit
    switches to one that may not (``SET LOCAL ROLE``): its xid read is refused (42501) before
    COMMIT, and it is replayed. With ``NullPool`` every attempt is on a new connection, which
    the connect check found able: the refusal is remembered for the engine, else every unit
    (and each of its replays) would be refused anew."""
    role, _ = app_login
    rdb.uninstall_commit_markers(engine)
    calls: list[int] = []

    def bump_as_app(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text(f"SET LOCAL ROLE {role}"))
        return _bump(session)

    unpooled = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    Sessions = rdb.ResilientSession(unpooled, service=service)
    try:
        assert [Sessions.run(bump_as_app) for _ in range(3)] == [1, 2, 3]
    finally:
        unpooled.dispose()
    assert len(calls) == 4  # the first once more, then none
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"conflict": 1}


@pytest.mark.asyncio
async def test_async_without_markers_a_role_that_may_not_read_the_control_data_still_writes(
    engine: sa.Engine,
    app_login: tuple[str, str],
    control_data_revoked: None,
    service: str,
    async_driver: str,
) -> None:
    """:func:`test_without_markers_a_role_that_may_not_read_the_control_data_still_writes` on
    asyncpg (its xid read goes through asyncpg's ``fetchrow``)."""
    _, url = app_login
    rdb.uninstall_commit_markers(engine)
    calls: list[int] = []

    async def bump(session: AsyncSession) -> int:
        calls.append(1)
        return await _abump(session)

    app_url = sa.make_url(url).set(drivername=f"postgresql+{async_driver}")
    app_engine = create_async_engine(app_url, pool_size=1)
    unpooled = create_async_engine(app_url, poolclass=sa.pool.NullPool)
    Sessions = rdb.AsyncResilientSession(app_engine, service=service)
    Unpooled = rdb.AsyncResilientSession(
        unpooled, service=f"{service}-nullpool", config=rdb.Config(retry=False)
    )
    try:
        assert [await Sessions.run(bump) for _ in range(2)] == [1, 2]
        assert [await Unpooled.run(bump) for _ in range(2)] == [3, 4]
    finally:
        await app_engine.dispose()
        await unpooled.dispose()
    assert len(calls) == 4  # none refused


@pytest.mark.asyncio
async def test_async_without_markers_a_unit_that_switches_to_such_a_role_is_replayed_once(
    *,
    engine: sa.Engine,
    app_login: tuple[str, str],
    control_data_revoked: None,
    pg_url: str,
    service: str,
    async_driver: str,
) -> None:
    """:func:`test_without_markers_a_unit_that_switches_to_such_a_role_is_replayed_once_per_engine`
    on both async drivers (asyncpg reads the xid outside the unit's request: its refusal was
    not remembered for the engine, and every unit on a ``NullPool`` failed)."""
    role, _ = app_login
    rdb.uninstall_commit_markers(engine)
    calls: list[int] = []

    async def bump_as_app(session: AsyncSession) -> int:
        calls.append(1)
        await session.execute(sa.text(f"SET LOCAL ROLE {role}"))
        return await _abump(session)

    unpooled = create_async_engine(
        sa.make_url(pg_url).set(drivername=f"postgresql+{async_driver}"),
        poolclass=sa.pool.NullPool,
    )
    Sessions = rdb.AsyncResilientSession(unpooled, service=service)
    try:
        assert [await Sessions.run(bump_as_app) for _ in range(3)] == [1, 2, 3]
    finally:
        await unpooled.dispose()
    assert len(calls) == 4  # the first once more, then none


def test_markers_uninstalled_under_a_running_application_cost_one_replay_per_connection(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``uninstall_commit_markers`` (an Alembic downgrade) while the application runs: every
    writing unit on a pooled connection prepared with the markers failed with 42P01 until the
    process restarted. The marker statement's error proves the COMMIT did not run: the unit is
    replayed at once, and the connection verifies by transaction id from then on."""
    Sessions = rdb.ResilientSession(engine, service=service)
    first = Sessions.run(_bump)  # the pooled connection is prepared with the markers
    rdb.uninstall_commit_markers(engine)
    with caplog.at_level("WARNING", logger="resilient_db"):
        assert [Sessions.run(_bump) for _ in range(3)] == [first + 1, first + 2, first + 3]
    assert "The commit markers are gone from database" in caplog.text
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"conflict": 1}  # the first unit after, once
    with engine.connect() as conn:
        assert conn.scalar(sa.select(Counter.value).where(Counter.id == 1)) == first + 3


@pytest.mark.asyncio
async def test_async_markers_uninstalled_under_a_running_application_cost_one_replay(
    engine: sa.Engine, async_engine: AsyncEngine, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    first = await Sessions.run(_abump)
    rdb.uninstall_commit_markers(engine)
    assert [await Sessions.run(_abump) for _ in range(3)] == [first + 1, first + 2, first + 3]
    with engine.connect() as conn:
        assert conn.scalar(sa.select(Counter.value).where(Counter.id == 1)) == first + 3


@pytest.mark.parametrize("how", ["revoked", "installed again"])
def test_markers_the_application_role_may_no_longer_write_cost_replays_not_every_unit(
    how: str,
    engine: sa.Engine,
    app_login: tuple[str, str],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The application role's INSERT on the markers revoked while it runs, or the markers
    installed again by their owner (``DROP SCHEMA resilient_db CASCADE`` and install, as the
    README advises for a planted schema; a downgrade and upgrade) without granting it again:
    the marker statement is refused (42501), and so is the function it falls back to (the
    login role may not write markers). Every writing unit on a pooled connection then failed
    with 42501, "role ... may not write commit markers", until the process restarted. The
    function's refusal proves the COMMIT did not run too: the unit is replayed, and the
    connection verifies by transaction id from then on, as a new connection does."""
    role, url = app_login
    app_engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    Sessions = rdb.ResilientSession(app_engine, service=service)
    calls: list[int] = []

    def bump(session: Session) -> int:
        calls.append(1)
        return _bump(session)

    try:
        assert Sessions.run(bump) == 1  # the pooled connection is prepared with the markers
        if how == "revoked":
            with engine.begin() as conn:
                conn.execute(sa.text(f"REVOKE INSERT ON resilient_db.commit_markers FROM {role}"))
        else:
            rdb.uninstall_commit_markers(engine)
            rdb.install_commit_markers(engine)
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            assert [Sessions.run(bump) for _ in range(3)] == [2, 3, 4]
    finally:
        app_engine.dispose()
    assert len(calls) == 4 + 2  # the first unit after: the prepared form, then the function
    unusable = [r.getMessage() for r in caplog.records if "no longer usable" in r.getMessage()]
    assert len(unusable) == 1, caplog.text
    assert "INSERT on resilient_db.commit_markers" in unusable[0]
    with engine.connect() as conn:
        assert conn.scalar(sa.select(Counter.value).where(Counter.id == 1)) == 4


@pytest.mark.asyncio
async def test_async_markers_the_application_role_may_no_longer_write_cost_replays(
    engine: sa.Engine,
    app_login: tuple[str, str],
    service: str,
    async_driver: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """:func:`test_markers_the_application_role_may_no_longer_write_cost_replays_not_every_unit`
    on asyncpg."""
    role, url = app_login
    app_engine = create_async_engine(
        sa.make_url(url).set(drivername=f"postgresql+{async_driver}"), pool_size=1, max_overflow=0
    )
    Sessions = rdb.AsyncResilientSession(app_engine, service=service)
    try:
        assert await Sessions.run(_abump) == 1
        with engine.begin() as conn:
            conn.execute(sa.text(f"REVOKE INSERT ON resilient_db.commit_markers FROM {role}"))
        assert [await Sessions.run(_abump) for _ in range(3)] == [2, 3, 4]
    finally:
        await app_engine.dispose()
    assert [e.name for e in events if e.name == "commit_markers_unusable"] == [
        "commit_markers_unusable"
    ]
    with engine.connect() as conn:
        assert conn.scalar(sa.select(Counter.value).where(Counter.id == 1)) == 4


# -- the kill switch: connections stay the driver's own --------------------------------------------
@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool], None]]:
    """``switch(on)``: ``SELF_HEALING_ENABLED`` set and applied by ``reload_config()`` to the
    factories made without ``config=``; the environment's configuration is back afterwards."""

    def set_enabled(on: bool) -> None:
        monkeypatch.setenv("SELF_HEALING_ENABLED", "true" if on else "false")
        rdb.reload_config()

    yield set_enabled
    monkeypatch.undo()
    rdb.reload_config()


@contextlib.contextmanager
def _wire(engine: sa.Engine) -> Iterator[list[str]]:
    """The libpq traces of the connections ``engine`` makes meanwhile (filled in on exit), each
    from its first message after SQLAlchemy's own set-up: a ``connect`` listener that runs
    before those added later (a factory's: the engine must have none yet)."""
    traced: list[tuple[Any, Any, Path]] = []

    def trace(dbapi_connection: Any, record: Any) -> None:
        path = Path(tempfile.mkstemp(prefix="rdb-trace-")[1])
        handle = path.open("w")
        dbapi_connection.pgconn.trace(handle.fileno())
        dbapi_connection.pgconn.set_trace_flags(
            psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
        )
        traced.append((dbapi_connection, handle, path))

    event.listen(engine, "connect", trace)
    traces: list[str] = []
    try:
        yield traces
    finally:
        event.remove(engine, "connect", trace)
        for dbapi_connection, handle, path in traced:
            dbapi_connection.pgconn.untrace()
            handle.close()
            traces.append(path.read_text())
            path.unlink()


def test_with_self_healing_off_connections_stay_psycopgs_own_until_it_is_turned_on(
    pg_url: str, engine: sa.Engine, service: str, switch: Callable[[bool], None]
) -> None:
    """SELF_HEALING_ENABLED=false is a pass-through down to the connection: one made for a
    factory keeps psycopg's class and cursors, and nothing goes out on it that sessionmaker's
    would not send (no look for the markers, no PREPARE; a unit commits plainly). Turned on by
    reload_config(), the pooled connection is marked at its next checkout and units carry
    markers; turned off again, new connections are psycopg's own again. (The factory changed
    every connection's class and prepared the marker statement on it, switched off or not.)"""
    plain_engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    ours = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    try:
        with _wire(plain_engine) as plain_wire, sessionmaker(plain_engine).begin() as session:
            _bump(session)
        switch(False)
        with _wire(ours) as our_wire:
            Sessions = rdb.ResilientSession(ours, service=service)
            assert Sessions.run(_bump) == 2
            with Sessions() as session:
                raw: Any = session.connection().connection.dbapi_connection
                assert type(raw) is psycopg.Connection
                assert type(raw.cursor()) is psycopg.Cursor
        assert len(plain_wire) == len(our_wire) == 1  # one connection each
        assert _round_trips(our_wire[0]) == _round_trips(plain_wire[0])
        assert "resilient_db" not in our_wire[0]
        assert markers(engine) == []

        switch(True)
        assert Sessions.run(_bump) == 3
        with ours.connect() as conn:
            assert conn.connection.dbapi_connection is raw  # the same connection, now marked
            assert type(raw) is not psycopg.Connection
            assert isinstance(raw, psycopg.Connection)
            assert _prepared_runs(conn) == 1
        assert len(markers(engine)) == 1

        switch(False)
        ours.dispose()
        assert Sessions.run(_bump) == 4
        with ours.connect() as conn:
            assert type(conn.connection.dbapi_connection) is psycopg.Connection
            assert _prepared_runs(conn) is None
        assert len(markers(engine)) == 1
    finally:
        plain_engine.dispose()
        ours.dispose()


async def _driver_connection(session: AsyncSession) -> Any:
    return (await (await session.connection()).get_raw_connection()).driver_connection


async def _prepared_statements(session: AsyncSession) -> list[tuple[str, str]]:
    """The names and statements prepared on the session's connection (asyncpg prepares every
    statement it sends, the markers' check included)."""
    rows = await session.execute(sa.text("SELECT name, statement FROM pg_prepared_statements"))
    return [(row.name, row.statement) for row in rows]


@pytest.mark.asyncio
async def test_async_with_self_healing_off_connections_stay_asyncpgs_own_until_it_is_turned_on(
    engine: sa.Engine, async_engine: AsyncEngine, service: str, switch: Callable[[bool], None]
) -> None:
    """The same on asyncpg, whose connections are made from a marked class when the factory
    is on: switched off, a connection is asyncpg's own and nothing of resilient_db was
    prepared or sent on it; turned on, the pool replaces the pooled one with a marked one at
    its next checkout; turned off again, new connections are asyncpg's own again."""
    switch(False)
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    assert await Sessions.run(_abump) == 1
    async with Sessions() as session:
        assert type(await _driver_connection(session)) is asyncpg.Connection
        assert not [s for s in await _prepared_statements(session) if "resilient_db" in str(s)]
    assert markers(engine) == []

    switch(True)
    assert await Sessions.run(_abump) == 2
    async with Sessions() as session:
        raw = await _driver_connection(session)
        assert type(raw) is not asyncpg.Connection
        assert isinstance(raw, asyncpg.Connection)
        assert PREPARED in [name for name, _ in await _prepared_statements(session)]
    assert len(markers(engine)) == 1

    switch(False)
    await async_engine.dispose()
    assert await Sessions.run(_abump) == 3
    async with Sessions() as session:
        assert type(await _driver_connection(session)) is asyncpg.Connection
        assert not [s for s in await _prepared_statements(session) if "resilient_db" in str(s)]
    assert len(markers(engine)) == 1


# -- read-only transactions ---------------------------------------------------------------------
# A read the client can't prove read-only (a CTE): its unit may have written, for the client.
CTE_READ = sa.text("WITH c AS (SELECT value FROM marker_counters) SELECT value FROM c")
SCRATCH = "CREATE TEMP TABLE IF NOT EXISTS marker_scratch (v int)"
READ_ONLY_BY_DEFAULT = "-c default_transaction_read_only=on"


def _read_write(session: Session) -> None:
    """Begin the session's transaction as READ WRITE (psycopg sends BEGIN READ WRITE)."""
    session.connection(execution_options={"postgresql_readonly": False})


@pytest.mark.parametrize("how", ["by default", "by the driver", "by a statement"])
def test_a_read_only_transaction_that_may_have_written_commits_through_the_function(
    how: str, pg_url: str, engine: sa.Engine, service: str
) -> None:
    """The prepared INSERT would be refused in a read-only transaction (25006: the unit failed,
    its outcome "unknown"), even when the transaction holds no xid. A temporary table may be
    written there, which takes an xid: the function leaves no marker for it either."""
    options = {"options": READ_ONLY_BY_DEFAULT} if how == "by default" else {}
    eng = sa.create_engine(pg_url, pool_size=1, max_overflow=0, connect_args=options)
    Sessions = rdb.ResilientSession(eng, service=service)

    def read_only_unit(session: Session) -> int:
        if how == "by the driver":
            session.connection(execution_options={"postgresql_readonly": True})
        elif how == "by a statement":
            session.execute(sa.text("SET TRANSACTION READ ONLY"))
        session.execute(sa.text("INSERT INTO marker_scratch VALUES (1)"))
        assert session.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
        return int(session.execute(CTE_READ).scalar_one())

    def bump(session: Session) -> int:
        _read_write(session)
        return _bump(session)

    try:
        pooled = eng.raw_connection()  # the pool's only connection: its temporary table
        try:
            driver: Any = pooled.driver_connection
            driver.read_only = False
            driver.execute(SCRATCH)
            driver.commit()
            driver.read_only = None
        finally:
            pooled.close()
        trips = _traced(eng, lambda: Sessions.run(read_only_unit), fresh=False)
        assert trips[-1].startswith(FUNCTION_FORM_AFTER_WRITE), trips
        assert markers(engine) == []
        assert Sessions.run(bump) == 1  # the same connection marks a writing unit
    finally:
        eng.dispose()
    assert len(markers(engine)) == 1


def test_a_lost_answer_is_settled_where_transactions_are_read_only_by_default(
    fault_proxy: FaultProxy, pg_database: str, engine: sa.Engine, service: str
) -> None:
    """The claim's fence is a write: it begins READ WRITE, as the unit it settles did."""
    eng = sa.create_engine(
        fault_proxy.url(pg_database), connect_args={"options": READ_ONLY_BY_DEFAULT}
    )
    Sessions = rdb.ResilientSession(eng, service=service)
    calls = []

    def bump(session: Session) -> int:
        calls.append(1)
        _read_write(session)
        return _bump(session)

    try:
        assert Sessions.run(bump) == 1
        fault_proxy.lose_commit_answer()
        assert Sessions.run(bump) == 2  # committed before the answer was lost: done
        assert fault_proxy.commits_lost == 1
        assert len(calls) == 2  # not replayed
    finally:
        eng.dispose()
    assert [fence for _, fence in markers(engine)] == [False, False]


@pytest.fixture
def go_read_only(engine: sa.Engine) -> sa.TextClause:
    """A statement that makes its transaction read-only out of the client's sight (the call of
    a function it can't see into)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE OR REPLACE FUNCTION rdb_go_read_only() RETURNS void LANGUAGE sql AS "
                "$$ SELECT set_config('transaction_read_only', 'on', true) $$"
            )
        )
    return sa.text("SELECT rdb_go_read_only()")


@pytest.fixture
def deallocate(engine: sa.Engine) -> sa.TextClause:
    """A statement that drops the session's prepared marker statement out of the client's sight,
    as a transaction-mode pooler would (the call of a function it can't see into)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE OR REPLACE FUNCTION rdb_deallocate(n text) RETURNS void "
                "LANGUAGE plpgsql AS $$ BEGIN EXECUTE format('DEALLOCATE %I', n); END $$"
            )
        )
    return sa.text(f"SELECT rdb_deallocate('{PREPARED}')")


def test_a_transaction_made_read_only_out_of_sight_replays_once_on_the_same_connection(
    one_connection: sa.Engine, engine: sa.Engine, go_read_only: sa.TextClause, service: str
) -> None:
    """A function makes the transaction read-only, where the client can't see it: the server
    refuses the prepared INSERT (25006, which otherwise means a demoted primary), the COMMIT
    after it never ran, so the unit is replayed once, and the pool is not invalidated for it;
    the connection calls the function from then on."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    pids = []

    def read_only_unit(session: Session) -> int:
        session.execute(go_read_only)
        pids.append(_pid(session))
        return int(session.execute(CTE_READ).scalar_one())

    assert Sessions.run(read_only_unit) == 0
    assert Sessions.run(read_only_unit) == 0
    assert len(pids) == 3
    assert len(set(pids)) == 1
    assert markers(engine) == []


def test_a_transaction_made_read_only_on_the_raw_connection_is_seen(
    one_connection: sa.Engine, engine: sa.Engine, service: str
) -> None:
    """``SET TRANSACTION READ ONLY`` sent on the driver's connection, past SQLAlchemy, is seen
    like one sent through it: the COMMIT calls the marker function at once, nothing replays."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    pids = []

    def read_only_unit(session: Session) -> int:
        raw: Any = session.connection().connection.driver_connection
        raw.execute("SET TRANSACTION READ ONLY")  # psycopg begins the transaction with it
        pids.append(_pid(session))
        return int(session.execute(CTE_READ).scalar_one())

    assert Sessions.run(read_only_unit) == 0
    assert Sessions.run(read_only_unit) == 0
    assert len(pids) == 2
    assert markers(engine) == []


@pytest.mark.asyncio
async def test_asyncpg_read_only_transactions_commit_through_the_function(
    pg_async_url: str, engine: sa.Engine, service: str
) -> None:
    """The asyncpg twin: read-only by default (``server_settings``), and by the driver
    (``postgresql_readonly``: asyncpg begins READ ONLY). asyncpg can't begin READ WRITE: a
    writing unit says SET TRANSACTION READ WRITE, which moves its connection to the function."""
    by_default = create_async_engine(
        pg_async_url,
        pool_size=1,
        max_overflow=0,
        connect_args={"server_settings": {"default_transaction_read_only": "on"}},
    )
    eng = create_async_engine(pg_async_url, pool_size=1, max_overflow=0)

    async def prepared_runs(e: AsyncEngine) -> int | None:
        async with e.connect() as conn:
            return await conn.run_sync(_prepared_runs)

    async def read_only_unit(session: AsyncSession) -> int:
        assert (await session.execute(sa.text("SHOW transaction_read_only"))).scalar() == "on"
        return int((await session.execute(CTE_READ)).scalar_one())

    async def by_the_driver(session: AsyncSession) -> int:
        await session.connection(execution_options={"postgresql_readonly": True})
        return await read_only_unit(session)

    async def bump(session: AsyncSession) -> int:
        await session.execute(sa.text("SET TRANSACTION READ WRITE"))
        return await _abump(session)

    try:
        ByDefault = rdb.AsyncResilientSession(by_default, service=service)
        Sessions = rdb.AsyncResilientSession(eng, service=f"{service}-rw")
        assert await ByDefault.run(read_only_unit) == 0
        assert await Sessions.run(by_the_driver) == 0
        assert await prepared_runs(by_default) == 0  # prepared at connect, not run
        assert await prepared_runs(eng) == 0
        assert markers(engine) == []
        assert await Sessions.run(_abump) == 1  # read-write again: through the statement
        assert await prepared_runs(eng) == 1
        assert await ByDefault.run(bump) == 2
        assert await prepared_runs(by_default) == 0  # through the function
    finally:
        await by_default.dispose()
        await eng.dispose()
    assert len(markers(engine)) == 2


# -- units that switch roles (row-level security setups do) ------------------------------------
@pytest.fixture
def tenant(engine: sa.Engine) -> Iterator[str]:
    """A role with rights on the counters and none on the markers."""
    name = f"rdb_tenant_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {name} NOLOGIN"))
        conn.execute(sa.text(f"GRANT SELECT, UPDATE ON marker_counters TO {name}"))
    yield name
    engine.dispose()
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP OWNED BY {name}"))
        conn.execute(sa.text(f"DROP ROLE {name}"))


def test_a_role_that_may_not_write_markers_uses_the_fallback(
    pg_url: str, engine: sa.Engine, tenant: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections made as a role without rights on the markers (here set at connect) use the
    fallback, with a warning naming the rights it lacks, rather than fail every writing
    COMMIT."""
    eng = sa.create_engine(pg_url, connect_args={"options": f"-c role={tenant}"})
    Sessions = rdb.ResilientSession(eng, service=service)
    try:
        with caplog.at_level("WARNING", logger="resilient_db"):
            trips = _traced(eng, lambda: Sessions.run(_bump))
        assert "pg_current_xact_id()::text" in trips[-2]  # (an UPDATE: assigned)
        assert trips[-1] == '"COMMIT"'
    finally:
        eng.dispose()
    lacks = f"role {tenant} lacks INSERT on resilient_db.commit_markers, role {tenant} lacks SELECT"
    assert any(
        f"Commit markers are installed in database {engine.url.database} (service={service}), "
        f"but not usable here: {lacks} on resilient_db.commit_markers." in r.getMessage()
        for r in caplog.records
    )
    assert markers(engine) == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar() == 1


def _commits_through_the_function_after(
    Sessions: rdb.ResilientSession[Session], eng: sa.Engine, statement: str
) -> None:
    """A unit sending ``statement`` through SQLAlchemy, then a write: one attempt, its COMMIT
    calling the function (the statement listener saw the statement)."""
    attempts = []

    def unit(session: Session) -> int:
        attempts.append(1)
        session.execute(sa.text(statement))
        return _bump(session)

    trips = _traced(eng, lambda: Sessions.run(unit))
    assert trips[-1].startswith(FUNCTION_FORM_AFTER_WRITE)
    assert attempts == [1]


def _pid(session: Session) -> int:
    return int(session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def test_a_unit_that_switches_roles_commits_through_the_function(
    one_connection: sa.Engine, engine: sa.Engine, tenant: str, service: str
) -> None:
    """``SET LOCAL ROLE`` seen by the statement listener: the COMMIT calls the function, which
    runs as its owner; one attempt, one marker."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    _commits_through_the_function_after(Sessions, one_connection, f"SET LOCAL ROLE {tenant}")
    assert len(markers(engine)) == 1


def test_a_unit_switching_to_a_role_the_function_refuses_is_replayed_and_verified_by_xid(
    one_connection: sa.Engine,
    engine: sa.Engine,
    tenant: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hardening the README does not ask for: USAGE on schema resilient_db revoked from
    PUBLIC (granted to the login role only). A unit that switches to a role of its own then
    has its COMMIT's function call refused (42501, permission denied for schema
    resilient_db): every such unit failed, replayed or not. It is replayed once, and the
    connection verifies by transaction id from then on, saying why once."""
    with engine.begin() as conn:
        conn.execute(sa.text("REVOKE USAGE ON SCHEMA resilient_db FROM PUBLIC"))
    Sessions = rdb.ResilientSession(one_connection, service=service)
    calls: list[int] = []

    def switching(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text(f"SET LOCAL ROLE {tenant}"))
        return _bump(session)

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        assert [Sessions.run(switching) for _ in range(2)] == [1, 2]
    assert len(calls) == 3  # the first once more
    said = [r.getMessage() for r in caplog.records if "no longer usable" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "EXECUTE on resilient_db.mark_commit" in said[0]
    assert markers(engine) == []


@pytest.fixture
def become(engine: sa.Engine) -> str:
    """A function that switches the role in effect out of the client's sight (the call of a
    function it can't see into): its SQL, to call with the role as ``:role``."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE OR REPLACE FUNCTION rdb_become(r text) RETURNS void LANGUAGE sql AS "
                "$$ SELECT set_config('role', r, true) $$"
            )
        )
    return "SELECT rdb_become(:role)"


def _switching_unit(become: str, role: str, pids: list[int]) -> Callable[[Session], int]:
    """A unit that switches to ``role`` out of the client's sight (``become``), then writes;
    each attempt appends its backend's pid to ``pids``."""

    def unit(session: Session) -> int:
        pids.append(_pid(session))
        session.execute(sa.text(become), {"role": role})
        return _bump(session)

    return unit


def test_a_role_switched_out_of_sight_replays_the_unit_once_through_the_function(
    *,
    one_connection: sa.Engine,
    engine: sa.Engine,
    tenant: str,
    become: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A role switched where the client can't see it: the server refuses the prepared INSERT
    (42501) before the COMMIT in the same message, so the unit is replayed once, on the same
    connection (nothing is invalidated), which calls the function from then on."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    pids: list[int] = []
    as_tenant = _switching_unit(become, tenant, pids)

    with caplog.at_level("INFO", logger="resilient_db"):
        assert Sessions.run(as_tenant) == 1
        assert Sessions.run(as_tenant) == 2
    assert len(pids) == 3
    assert len(set(pids)) == 1  # one connection throughout
    assert len(markers(engine)) == 2
    refused = [r for r in caplog.records if "marker statement was refused" in r.getMessage()]
    assert len(refused) == 1
    assert "SQLSTATE 42501" in refused[0].getMessage()


def test_a_role_switched_out_of_sight_under_nullpool_replays_once_then_calls_the_function(
    *,
    pg_url: str,
    engine: sa.Engine,
    tenant: str,
    become: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``NullPool``: every attempt gets a new connection, so switching only the refused
    connection to the function left each new one sending the INSERT, refused again: every
    unit of such a role failed with 42501 once its retries ran out. The engine's connections
    call the function from the first refusal on: one replay, then one attempt per unit."""
    eng = sa.create_engine(pg_url, poolclass=NullPool)
    Sessions = rdb.ResilientSession(eng, service=service)
    attempts: list[int] = []
    as_tenant = _switching_unit(become, tenant, attempts)

    try:
        with caplog.at_level("INFO", logger="resilient_db"):
            assert Sessions.run(as_tenant) == 1
            assert Sessions.run(as_tenant) == 2
            assert Sessions.run(as_tenant) == 3
    finally:
        eng.dispose()
    assert len(attempts) == 4  # one replay, for the first refusal
    assert len(markers(engine)) == 3
    refused = [r for r in caplog.records if "marker statement was refused" in r.getMessage()]
    assert len(refused) == 1
    assert "the engine's (a connection serves one unit) COMMITs" in refused[0].getMessage()


def test_a_role_switched_on_the_raw_connection_is_seen(
    one_connection: sa.Engine, engine: sa.Engine, tenant: str, service: str
) -> None:
    """``SET LOCAL ROLE`` sent on psycopg's own connection, past SQLAlchemy, is seen by the
    connection's cursors: the COMMIT calls the function at once, one attempt, one marker."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    attempts = []

    def as_tenant(session: Session) -> int:
        attempts.append(1)
        raw: Any = session.connection().connection.driver_connection
        raw.execute(f"SET LOCAL ROLE {tenant}")
        return _bump(session)

    trips = _traced(one_connection, lambda: Sessions.run(as_tenant))
    assert trips[-1].startswith(FUNCTION_FORM_AFTER_WRITE)
    assert attempts == [1]
    assert len(markers(engine)) == 1


@pytest.mark.asyncio
async def test_asyncpg_units_that_switch_roles_commit_through_the_function(
    pg_async_url: str, engine: sa.Engine, tenant: str, become: str, service: str
) -> None:
    """The asyncpg twin: seen by the listener, and on the raw connection (one attempt each),
    then out of sight on a new connection (one replay)."""
    eng = create_async_engine(pg_async_url, pool_size=1, max_overflow=0)
    Sessions = rdb.AsyncResilientSession(eng, service=service)
    attempts = []

    async def as_tenant(session: AsyncSession) -> int:
        attempts.append(1)
        await session.execute(sa.text(f"SET LOCAL ROLE {tenant}"))
        return await _abump(session)

    async def as_tenant_raw(session: AsyncSession) -> int:
        attempts.append(1)
        await session.execute(sa.text("SELECT 1"))  # SQLAlchemy's adapter begins here
        raw: Any = (await (await session.connection()).get_raw_connection()).driver_connection
        await raw.execute(f"SET LOCAL ROLE {tenant}")
        return await _abump(session)

    async def as_tenant_unseen(session: AsyncSession) -> int:
        attempts.append(1)
        await session.execute(sa.text(become), {"role": tenant})
        return await _abump(session)

    try:
        assert await Sessions.run(as_tenant) == 1
        assert len(attempts) == 1
        await eng.dispose()  # a new connection, on the prepared statement again
        assert await Sessions.run(as_tenant_raw) == 2
        assert len(attempts) == 2
        await eng.dispose()
        assert await Sessions.run(as_tenant_unseen) == 3
        assert len(attempts) == 4
        assert await Sessions.run(as_tenant_unseen) == 4
        assert len(attempts) == 5
    finally:
        await eng.dispose()
    assert len(markers(engine)) == 4


# -- this host's clock ------------------------------------------------------------------------
def _clock_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "clock is" in r.getMessage()]


@pytest.fixture(params=[0.0, 300.0, 700.0])
def behind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> float:
    """How far this host's clock is behind the server's, as the clock check sees it."""
    seconds = float(request.param)
    monkeypatch.setattr(_commit, "_wall_clock", lambda: time.time() - seconds)
    return seconds


def test_a_host_clock_behind_the_servers_is_warned_once_per_engine(
    pg_url: str, engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture, behind: float
) -> None:
    """Markers carry the client's time, the server judges their age by its own: a client far
    behind gets its lost answers judged "expired" (unknown) sooner. Read at connect, in the
    query that checks the markers (no round trip of its own)."""
    eng = sa.create_engine(pg_url)
    try:
        Sessions = rdb.ResilientSession(eng, service=service)
        with caplog.at_level("WARNING", logger="resilient_db"):
            Sessions.run(_bump)
            eng.dispose()  # a new connection checks again
            Sessions.run(_bump)
    finally:
        eng.dispose()
    found = _clock_warnings(caplog)
    if not behind:
        assert found == []
        return
    assert len(found) == 1, found
    assert found[0].startswith(f"[SELF-HEAL] This host's clock is {behind:.0f} s behind")
    if behind < CLAIM_HORIZON:
        assert f"verified only within {CLAIM_HORIZON - behind:.0f} s" in found[0]
    else:
        assert "no lost COMMIT answer can be verified" in found[0]


@pytest.mark.asyncio
async def test_async_a_host_clock_behind_the_servers_is_warned(
    pg_async_url: str,
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same check on asyncpg's connections."""
    monkeypatch.setattr(_commit, "_wall_clock", lambda: time.time() - 300.0)
    aengine = create_async_engine(pg_async_url)
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        with caplog.at_level("WARNING", logger="resilient_db"):
            await Sessions.run(_abump)
    finally:
        await aengine.dispose()
    assert len(_clock_warnings(caplog)) == 1


# -- the prepared marker statement ----------------------------------------------------------------
def _prepared_runs(conn: sa.Connection) -> int | None:
    """How often the connection ran its prepared marker statement (None: not prepared)."""
    row = conn.execute(
        sa.text("SELECT generic_plans + custom_plans FROM pg_prepared_statements WHERE name = :n"),
        {"n": PREPARED},
    ).first()
    return None if row is None else int(row[0])


@pytest.fixture
def one_connection(pg_url: str, engine: sa.Engine) -> Iterator[sa.Engine]:
    """An engine whose pool holds one connection (the markers are installed by ``engine``)."""
    eng = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    yield eng
    eng.dispose()


def test_each_connection_prepares_the_marker_statement_once_and_commits_through_it(
    one_connection: sa.Engine, engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(one_connection, service=service)
    for _ in range(3):
        Sessions.run(_bump)
    with one_connection.connect() as conn:
        assert _prepared_runs(conn) == 3  # one EXECUTE per writing COMMIT, on the server's count
    assert len(markers(engine)) == 3


REPREPARE_SUFFIX = f'; COMMIT; {_commit._PREPARE_SQL}"'


@pytest.mark.parametrize(
    "statement",
    [f"DEALLOCATE {PREPARED}", "DEALLOCATE ALL", "DISCARD PLANS", f"DEALLOCATE {PREPARED}x"],
    ids=["drops it", "drops all", "leaves it", "fails"],
)
def test_a_deallocate_through_sqlalchemy_prepares_the_statement_again_in_the_next_commit(
    one_connection: sa.Engine,
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    statement: str,
) -> None:
    """The statement listener sees DEALLOCATE (or DISCARD): that connection's next COMMIT sends
    the INSERT inline and prepares the statement again after the COMMIT, in the same message;
    the COMMIT after it executes the statement. Where the statement was still there (DISCARD
    PLANS leaves it; a DEALLOCATE that failed dropped nothing) the PREPARE meets it (42P05)
    after the COMMIT, which stands: the unit runs once either way, nothing is logged. Before,
    the connection called the function for good."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    Sessions.run(_bump)
    attempts: list[int] = []
    fails = statement.endswith("x")

    def unit(session: Session) -> int:
        attempts.append(1)
        if fails:  # in a savepoint: the failure leaves the unit's transaction usable
            with pytest.raises(sa.exc.DBAPIError), session.begin_nested():
                session.execute(sa.text(statement))
        else:
            session.execute(sa.text(statement))
        return _bump(session)

    with caplog.at_level("DEBUG", logger="resilient_db"):
        trips = _traced(one_connection, lambda: Sessions.run(unit), fresh=False)
    assert attempts == [1]
    assert trips[-1].startswith(INLINE_FORM), trips
    assert trips[-1].endswith(REPREPARE_SUFFIX), trips
    still_there = statement in ("DISCARD PLANS", f"DEALLOCATE {PREPARED}x")
    after_commit = [r for r in caplog.records if "PREPARE after a COMMIT" in r.getMessage()]
    assert len(after_commit) == still_there
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    trips = _traced(one_connection, lambda: Sessions.run(_bump), fresh=False)
    assert trips[-1].startswith(f'"EXECUTE {PREPARED}('), trips
    assert len(markers(engine)) == 3
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar() == 3


def test_a_pool_that_discards_at_checkin_prepares_the_statement_in_each_commit(
    pg_url: str, engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool event of yours that resets each connection with DISCARD ALL at checkin (seen
    through the connection's marked cursor): every writing COMMIT sends the INSERT inline and
    prepares the statement after it; nothing is replayed or logged. (Measured on the server:
    about 60 % of the marker function's time, which such connections called before.)"""
    eng = sa.create_engine(pg_url, pool_size=1, max_overflow=0)

    @sa.event.listens_for(eng, "checkin")
    def discard(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.autocommit = True
        dbapi_connection.execute("DISCARD ALL")
        dbapi_connection.autocommit = False

    try:
        Sessions = rdb.ResilientSession(eng, service=service)
        attempts = []

        def bump(session: Session) -> int:
            attempts.append(1)
            return _bump(session)

        with caplog.at_level("WARNING", logger="resilient_db"):
            for _ in range(2):
                trips = _traced(eng, lambda: Sessions.run(bump), fresh=False)
                assert trips[-1] == '"DISCARD ALL"', trips  # the unit's checkin
                assert trips[-2].endswith(REPREPARE_SUFFIX), trips
        assert attempts == [1, 1]
        assert not caplog.records
    finally:
        eng.dispose()
    assert len(markers(engine)) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("statement", [f"DEALLOCATE {PREPARED}", "DISCARD PLANS"])
async def test_async_a_deallocate_prepares_the_statement_again_in_the_next_commit(
    pg_url: str, pg_async_url: str, engine: sa.Engine, service: str, statement: str
) -> None:
    """The same on both async drivers: the next COMMIT prepares the statement again after it
    (asyncpg raises the 42P05 of a statement still there after the COMMIT, which stands)."""
    kept = statement == "DISCARD PLANS"  # leaves the statement there
    for url in (pg_url, pg_async_url):  # psycopg's async connection, asyncpg
        aengine = create_async_engine(url, pool_size=1, max_overflow=0)
        try:
            Sessions = rdb.AsyncResilientSession(aengine, service=service)
            attempts: list[int] = []

            async def unit(session: AsyncSession, attempts: list[int] = attempts) -> int:
                attempts.append(1)
                await session.execute(sa.text(statement))
                return await _abump(session)

            before = len(markers(engine))
            await Sessions.run(_abump)
            await Sessions.run(unit)
            assert attempts == [1]
            async with aengine.connect() as conn:  # prepared again, not yet run (or the first)
                assert await conn.run_sync(_prepared_runs) == (1 if kept else 0), url
            await Sessions.run(_abump)
            async with aengine.connect() as conn:
                runs = await conn.run_sync(_prepared_runs)
            # executed by the third unit (DISCARD PLANS: the first statement still, run twice)
            assert runs == (2 if kept else 1), url
            assert len(markers(engine)) == before + 3, url
        finally:
            await aengine.dispose()


@pytest.mark.asyncio
async def test_asyncpg_an_own_commit_midway_whose_prepare_meets_the_statement_stands(
    pg_async_url: str, engine: sa.Engine, service: str
) -> None:
    """A unit's own ``session.commit()`` midway on asyncpg, after a DISCARD PLANS (which
    leaves the statement there): its message's PREPARE after the COMMIT meets the statement
    (42P05), which asyncpg raises for the whole message. The COMMIT stands: the unit goes on,
    runs once, and both its parts are written once."""
    aengine = create_async_engine(pg_async_url, pool_size=1, max_overflow=0)
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        attempts: list[int] = []

        async def unit(session: AsyncSession) -> int:
            attempts.append(1)
            await session.execute(sa.text("DISCARD PLANS"))
            await _abump(session)
            await session.commit()  # (its PREPARE meets the statement: 42P05)
            return await _abump(session)

        await Sessions.run(_abump)
        before = len(markers(engine))
        assert await Sessions.run(unit) == 3
        assert attempts == [1]
    finally:
        await aengine.dispose()
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar_one() == 3
    assert len(markers(engine)) == before + 2


def test_a_marker_statement_lost_out_of_sight_replays_the_unit_once(
    one_connection: sa.Engine,
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a transaction-mode pooler does to a session's prepared statements, done by hand:
    the EXECUTE fails with 26000, the COMMIT after it in the same message never runs, so the
    unit is replayed (once) and commits exactly once; the engine sends the marker's INSERT
    inline from then on, and says so once."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    attempts = []

    def bump_losing_the_statement(session: Session) -> int:
        attempts.append(1)
        if len(attempts) == 1:  # out of the client's sight, as a pooler would: through libpq
            raw: Any = session.connection().connection.driver_connection
            result = raw.pgconn.exec_(f"DEALLOCATE {PREPARED}".encode())
            assert result.status == psycopg.pq.ExecStatus.COMMAND_OK
        return _bump(session)

    with caplog.at_level("WARNING", logger="resilient_db"):
        assert Sessions.run(bump_losing_the_statement) == 1
        assert Sessions.run(_bump) == 2
    assert len(attempts) == 2
    assert len(markers(engine)) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar() == 2
    lost = [r for r in caplog.records if "commit-marker statement was missing" in r.getMessage()]
    assert len(lost) == 1
    assert lost[0].getMessage().startswith("[SELF-HEAL] ")
    one_connection.dispose()  # a new connection: the engine no longer uses the statement
    trips = _traced(one_connection, lambda: Sessions.run(_bump))
    assert trips[-1].startswith(INLINE_FORM), trips
    assert trips[-1].endswith('; COMMIT"')
    with one_connection.connect() as conn:
        assert _prepared_runs(conn) is None  # not prepared again
    assert len(markers(engine)) == 3


def _repeat_a_query(session: Session) -> None:
    for _ in range(6):  # past psycopg's prepare_threshold (5): it prepares the query itself
        session.execute(sa.select(Counter.value).where(Counter.id == 1))


@pytest.mark.parametrize("how", ["a session closed without committing", "a DROP in the unit"])
def test_psycopg_dropping_its_own_prepared_statements_keeps_the_marker_statement(
    one_connection: sa.Engine,
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """psycopg prepares a query of its own after five executions and, when it has any, sends
    DEALLOCATE ALL after a ROLLBACK (a session closed without committing, as read endpoints
    are) and after a DROP, ALTER or DISCARD ALL it ran: the marker statement goes with them.
    The connection's next writing COMMIT prepares it again in its own message (after the
    COMMIT): the unit runs once, nothing is logged, the next COMMIT executes the statement as
    before. Before, the
    EXECUTE failed, the unit was replayed and the engine sent every marker inline from then
    on. Fails loudly if psycopg's prepare manager changes (``_watch_psycopg_deallocations``)."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    Sessions.run(_bump)
    attempts = []

    def bump(session: Session) -> int:
        attempts.append(1)
        if how == "a DROP in the unit":
            _repeat_a_query(session)
            session.execute(sa.text("DROP TABLE IF EXISTS rdb_no_such_table"))
        return _bump(session)

    with caplog.at_level("WARNING", logger="resilient_db"):
        if how == "a session closed without committing":
            with Session(one_connection) as plain:  # the pool's one connection
                _repeat_a_query(plain)
            with one_connection.connect() as conn:
                assert _prepared_runs(conn) is None  # psycopg dropped it
        assert Sessions.run(bump) == 2
    assert len(attempts) == 1
    assert not [r for r in caplog.records if "commit-marker" in r.getMessage()]
    with one_connection.connect() as conn:
        assert _prepared_runs(conn) == 0  # prepared again after the COMMIT, in its message
    trips = _traced(one_connection, lambda: Sessions.run(_bump), fresh=False)
    assert trips[-1].startswith(f'"EXECUTE {PREPARED}('), trips
    with one_connection.connect() as conn:
        assert _prepared_runs(conn) == 1
    assert len(markers(engine)) == 3
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar() == 3


_DEFERRED_TABLE = "rdb_deferred_unique"
_VIOLATE_AT_COMMIT = (
    f"INSERT INTO {_DEFERRED_TABLE} VALUES (1), (1)"  # refused by the COMMIT, not before it
)


@pytest.fixture
def deferred_unique(engine: sa.Engine) -> None:
    """A table whose unique constraint is checked at COMMIT."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {_DEFERRED_TABLE} (k int, UNIQUE (k) DEFERRABLE "
                "INITIALLY DEFERRED)"
            )
        )


def test_a_commit_that_fails_before_its_prepare_leaves_it_to_the_next_commit(
    one_connection: sa.Engine, engine: sa.Engine, service: str, deferred_unique: None
) -> None:
    """The COMMIT that was to prepare the statement again fails (a deferred constraint), so the
    PREPARE after it never ran: the next COMMIT prepares it instead. Without that, the next
    unit's EXECUTE would meet no statement: replayed, and the engine inline for good."""
    Sessions = rdb.ResilientSession(one_connection, service=service)

    def violate(session: Session) -> None:
        session.execute(sa.text(f"DEALLOCATE {PREPARED}"))
        session.execute(sa.text(_VIOLATE_AT_COMMIT))

    with pytest.raises(sa.exc.IntegrityError):
        Sessions.run(violate)
    attempts = []

    def bump(session: Session) -> int:
        attempts.append(1)
        return _bump(session)

    trips = _traced(one_connection, lambda: Sessions.run(bump), fresh=False)
    assert attempts == [1]
    assert trips[-1].endswith(REPREPARE_SUFFIX), trips
    trips = _traced(one_connection, lambda: Sessions.run(_bump), fresh=False)
    assert trips[-1].startswith(f'"EXECUTE {PREPARED}('), trips
    assert len(markers(engine)) == 2


@pytest.mark.asyncio
async def test_async_a_commit_that_fails_before_its_prepare_leaves_it_to_the_next_commit(
    pg_async_url: str, engine: sa.Engine, service: str, deferred_unique: None
) -> None:
    """The same on asyncpg, which raises the COMMIT's error for the whole message."""
    aengine = create_async_engine(pg_async_url, pool_size=1, max_overflow=0)
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)

        async def violate(session: AsyncSession) -> None:
            await session.execute(sa.text(f"DEALLOCATE {PREPARED}"))
            await session.execute(sa.text(_VIOLATE_AT_COMMIT))

        with pytest.raises(sa.exc.IntegrityError):
            await Sessions.run(violate)
        attempts = []

        async def bump(session: AsyncSession) -> int:
            attempts.append(1)
            return await _abump(session)

        await Sessions.run(bump)
        await Sessions.run(bump)
        assert attempts == [1, 1]
        async with aengine.connect() as conn:
            assert await conn.run_sync(_prepared_runs) == 1  # prepared by one, run by the next
    finally:
        await aengine.dispose()
    assert len(markers(engine)) == 2


def test_a_marker_statement_prepared_again_out_of_sight_is_met_after_the_commit(
    one_connection: sa.Engine, engine: sa.Engine, service: str
) -> None:
    """psycopg dropped the statement, then something prepared it again out of the client's
    sight: the PREPARE at the end of the COMMIT's message meets it (42P05) after the COMMIT,
    which stands; the unit runs once, and the next COMMIT executes the statement."""
    Sessions = rdb.ResilientSession(one_connection, service=service)
    Sessions.run(_bump)
    with Session(one_connection) as plain:
        _repeat_a_query(plain)  # closed without committing: psycopg drops its statements
    with one_connection.connect() as conn:
        raw: Any = conn.connection.driver_connection
        result = raw.pgconn.exec_(_commit._PREPARE_SQL.encode())  # past the client, by libpq
        assert result.status == psycopg.pq.ExecStatus.COMMAND_OK
    attempts = []

    def bump(session: Session) -> int:
        attempts.append(1)
        return _bump(session)

    assert Sessions.run(bump) == 2
    assert len(attempts) == 1
    assert len(markers(engine)) == 2
    with one_connection.connect() as conn:
        assert _prepared_runs(conn) == 0  # the inline INSERT committed this one
    Sessions.run(_bump)
    with one_connection.connect() as conn:
        assert _prepared_runs(conn) == 1


@pytest.mark.asyncio
async def test_async_psycopg_dropping_its_own_prepared_statements_keeps_the_marker_statement(
    pg_url: str, engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same on psycopg's async connection, after a session closed without committing."""
    aengine = create_async_engine(pg_url, pool_size=1, max_overflow=0)
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        await Sessions.run(_abump)
        async with AsyncSession(aengine) as plain:
            for _ in range(6):
                await plain.execute(sa.select(Counter.value).where(Counter.id == 1))
        attempts = []

        async def bump(session: AsyncSession) -> int:
            attempts.append(1)
            return await _abump(session)

        with caplog.at_level("WARNING", logger="resilient_db"):
            assert await Sessions.run(bump) == 2
        assert len(attempts) == 1
        assert not [r for r in caplog.records if "commit-marker" in r.getMessage()]
        async with aengine.connect() as conn:
            runs = await conn.run_sync(_prepared_runs)
            assert runs == 0  # prepared again after the COMMIT, in its message
    finally:
        await aengine.dispose()
    assert len(markers(engine)) == 2


def test_psycopg_told_not_to_prepare_gets_no_prepared_marker(
    pg_url: str, engine: sa.Engine, service: str
) -> None:
    """``prepare_threshold=None`` (the setting behind a transaction-mode pooler): no PREPARE;
    the COMMIT message carries the marker's INSERT itself, in the same one round trip."""
    eng = sa.create_engine(
        pg_url, pool_size=1, max_overflow=0, connect_args={"prepare_threshold": None}
    )
    try:
        Sessions = rdb.ResilientSession(eng, service=service)
        trips = _traced(eng, lambda: Sessions.run(_bump))
        assert trips[-1].startswith(INLINE_FORM)
        assert trips[-1].endswith('; COMMIT"')
        with eng.connect() as conn:
            assert _prepared_runs(conn) is None
    finally:
        eng.dispose()
    assert len(markers(engine)) == 1


def test_a_pool_that_keeps_no_connection_sends_the_marker_inline(
    fault_proxy: FaultProxy, pg_database: str, engine: sa.Engine, service: str, tmp_path: Path
) -> None:
    """``NullPool``: every unit gets a new connection, so a PREPARE would cost a round trip per
    unit for one EXECUTE. Nothing is prepared; the COMMIT message carries the INSERT itself (one
    round trip, as a plain COMMIT), and a lost answer is settled by it like any marker."""
    eng = sa.create_engine(fault_proxy.url(pg_database), poolclass=NullPool)
    Sessions = rdb.ResilientSession(eng, service=service)
    trace = (tmp_path / "trace").open("w")

    @sa.event.listens_for(eng, "connect")  # after the factory's own: its set-up is not traced
    def traced(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.pgconn.trace(trace.fileno())
        dbapi_connection.pgconn.set_trace_flags(
            psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
        )

    calls = []

    def bump(session: Session) -> int:
        calls.append(1)
        return _bump(session)

    try:
        assert Sessions.run(bump) == 1
        trace.flush()
        trips = _round_trips((tmp_path / "trace").read_text())
        assert trips[-1].startswith(INLINE_FORM), trips
        assert trips[-1].endswith('; COMMIT"')
        assert not [t for t in trips if "PREPARE" in t]
        fault_proxy.lose_commit_answer()
        assert Sessions.run(bump) == 2  # committed before the answer was lost: done
        assert fault_proxy.commits_lost == 1
        assert calls == [1, 1]  # not replayed
        with eng.connect() as conn:
            assert _prepared_runs(conn) is None  # a new connection prepares nothing
    finally:
        eng.dispose()
        trace.close()
    assert len(markers(engine)) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar() == 2


def test_an_inline_marker_refused_out_of_sight_replays_once_through_the_function(
    pg_url: str, engine: sa.Engine, go_read_only: sa.TextClause, service: str
) -> None:
    """The inline INSERT is refused where the prepared one would be (25006: a transaction made
    read-only out of the client's sight): the COMMIT after it never ran, the unit is replayed
    once on the same connection, which calls the function from then on."""
    eng = sa.create_engine(
        pg_url, pool_size=1, max_overflow=0, connect_args={"prepare_threshold": None}
    )
    Sessions = rdb.ResilientSession(eng, service=service)
    pids = []

    def read_only_unit(session: Session) -> int:
        session.execute(go_read_only)
        pids.append(_pid(session))
        return int(session.execute(CTE_READ).scalar_one())

    try:
        assert Sessions.run(read_only_unit) == 0
        trips = _traced(eng, lambda: Sessions.run(_bump), fresh=False)
        assert trips[-1].startswith(FUNCTION_FORM_AFTER_WRITE), trips
    finally:
        eng.dispose()
    assert len(pids) == 2
    assert len(set(pids)) == 1
    assert len(markers(engine)) == 1


@pytest.mark.asyncio
async def test_asyncpg_prepares_the_marker_unless_told_not_to_and_replays_a_lost_one(
    engine: sa.Engine, pg_async_url: str, deallocate: sa.TextClause, service: str
) -> None:
    async def prepared_runs(eng: AsyncEngine) -> int | None:
        async with eng.connect() as conn:
            return await conn.run_sync(_prepared_runs)

    eng = create_async_engine(pg_async_url, pool_size=1, max_overflow=0)
    uncached = create_async_engine(
        pg_async_url, pool_size=1, max_overflow=0, connect_args={"statement_cache_size": 0}
    )
    try:
        Sessions = rdb.AsyncResilientSession(eng, service=service)
        assert await Sessions.run(_abump) == 1
        assert await prepared_runs(eng) == 1

        attempts = []

        async def bump_losing_the_statement(session: AsyncSession) -> int:
            attempts.append(1)
            if len(attempts) == 1:
                await session.execute(deallocate)
            return await _abump(session)

        assert await Sessions.run(bump_losing_the_statement) == 2
        assert len(attempts) == 2
        assert await prepared_runs(eng) is None  # its replay sent the INSERT inline

        Uncached = rdb.AsyncResilientSession(uncached, service=f"{service}-uncached")
        assert await Uncached.run(_abump) == 3
        assert await prepared_runs(uncached) is None
    finally:
        await eng.dispose()
        await uncached.dispose()
    assert len(markers(engine)) == 3


@pytest.mark.asyncio
async def test_asyncpg_ends_the_transaction_of_a_failed_marker(
    engine: sa.Engine, pg_async_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marker that fails (here its id is taken: what a claim's fence does to a late original)
    stops the message before its COMMIT. The transaction is ended as a failed COMMIT ends it, so
    the pool's connection takes the next unit (asyncpg refuses a BEGIN inside a transaction)."""
    taken = marker_id()
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": taken}
        )
    eng = create_async_engine(pg_async_url, pool_size=1, max_overflow=0)
    Sessions = rdb.AsyncResilientSession(eng, service=service)

    try:
        monkeypatch.setattr(_commit, "marker_id", lambda: taken)
        with pytest.raises(sa.exc.IntegrityError):
            await Sessions.run(_abump)
        monkeypatch.undo()
        assert await Sessions.run(_abump) == 1  # the same connection, the first bump rolled back
    finally:
        await eng.dispose()
    assert len(markers(engine)) == 2


@pytest.mark.asyncio
async def test_asyncpg_connections_of_your_async_creator_carry_the_marker(
    engine: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    """A connection your ``async_creator`` makes (as cloud connectors make them) is adopted at
    connect: its COMMIT carries the marker, so a lost answer is settled, not "unknown"."""
    dsn = sa.make_url(fault_proxy.url(pg_database, driver="asyncpg")).set(drivername="postgresql")

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn.render_as_string(hide_password=False))

    eng = create_async_engine("postgresql+asyncpg://", async_creator=connect)
    try:
        await _alost_answer_settled(rdb.AsyncResilientSession(eng, service=service), fault_proxy)
        async with eng.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            assert type(raw).__mro__[1] is asyncpg.Connection  # your class, adopted
            assert raw._rdb_mode == "markers"
            assert await conn.run_sync(_prepared_runs) is not None  # prepared at connect
    finally:
        await eng.dispose()
    assert len(markers(engine)) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar() == 2


@pytest.mark.asyncio
async def test_asyncpg_commits_through_the_marked_connection(
    engine: sa.Engine, async_engine: AsyncEngine, service: str
) -> None:
    """Fails loudly if asyncpg stops committing through ``Connection.execute("COMMIT;")``: the
    marked message would then never be sent, and no ticket would be taken for the COMMIT, so
    a lost answer would be taken for a plain disconnect and the unit REPLAYED (written twice
    when it had committed), not settled. ``pyproject.toml`` bounds asyncpg to the releases
    this passes with."""
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)

    assert await Sessions.run(_abump) == 1
    assert len(markers(engine)) == 1
    async with async_engine.connect() as conn:
        raw: Any = (await conn.get_raw_connection()).driver_connection
        assert getattr(type(raw), "_rdb_marked", False)
        assert raw._rdb_mode == "markers"
        assert raw._rdb_may_write is False  # the COMMIT ended the writing transaction
        assert not raw.is_in_transaction()


def test_the_markers_check_leaves_the_connection_as_the_engine_made_it(
    engine: sa.Engine, pg_url: str, service: str
) -> None:
    """The check at connect runs outside a transaction and puts autocommit back as it was."""
    for level in ("READ COMMITTED", "AUTOCOMMIT"):
        eng = sa.create_engine(pg_url, isolation_level=level)
        factory = rdb.ResilientSession(eng, service=f"{service}-{level}")
        with eng.connect() as conn:
            raw: Any = conn.connection.driver_connection
            assert raw._rdb_mode == "markers"
            assert raw.autocommit is (level == "AUTOCOMMIT")
            assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        del factory  # held until here: the engine's hooks serve live factories
        eng.dispose()


def test_the_psycopg_simple_query_behaves_as_psycopg_commit_does(engine: sa.Engine) -> None:
    """Fails loudly if the psycopg internals behind the marked COMMIT change (the generator
    for a sent query, ``error_from_result``): every statement of the message runs, the
    connection ends idle, and a server error comes back as psycopg's own exception class with
    its SQLSTATE, which SQLAlchemy then wraps as for any COMMIT. The first update committed,
    the second was rolled back."""
    with engine.connect() as conn:
        raw: Any = conn.connection.driver_connection
        raw.execute("UPDATE marker_counters SET value = value + 1 WHERE id = 1")
        _commit._psycopg_simple_query(raw, b"SELECT 1; COMMIT")
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        raw.execute("UPDATE marker_counters SET value = value + 10 WHERE id = 1")
        with pytest.raises(psycopg.errors.UndefinedFunction) as info:
            _commit._psycopg_simple_query(raw, b"SELECT resilient_db.no_such_function(); COMMIT")
        assert info.value.sqlstate == "42883"
        # the error stopped the message before its COMMIT: the transaction is failed, as the
        # server leaves it, and is rolled back as any failed COMMIT's would be
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
    with engine.connect() as conn:
        value = conn.execute(sa.text("SELECT value FROM marker_counters WHERE id = 1")).scalar()
        assert value == 1


# -- psycopg's async driver (create_async_engine("postgresql+psycopg://...")) --------------------
async def _apid(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


@pytest.mark.asyncio
async def test_psycopg_async_units_carry_the_prepared_marker_and_settle_a_lost_answer(
    engine: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    """Its connections are marked like the sync ones: a writing unit's COMMIT message carries
    the prepared marker, the connection ends idle, and a lost answer is settled as committed
    (not replayed, not "unknown")."""
    eng = create_async_engine(fault_proxy.url(pg_database), pool_size=1, max_overflow=0)
    assert eng.dialect.driver == "psycopg"
    assert eng.dialect.is_async

    async def marked() -> None:
        async with eng.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            assert isinstance(raw, psycopg.AsyncConnection)
            assert getattr(type(raw), "_rdb_marked", False)
            assert raw._rdb_mode == "markers"
            assert raw._rdb_may_write is False  # the COMMIT ended the writing transaction
            assert await conn.run_sync(_prepared_runs) == 1  # the COMMIT ran the statement

    try:
        Sessions = rdb.AsyncResilientSession(eng, service=service)
        await _alost_answer_settled(Sessions, fault_proxy, marked)
    finally:
        await eng.dispose()
    assert len(markers(engine)) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(Counter.value)).scalar() == 2


@pytest.mark.asyncio
async def test_psycopg_async_marker_refused_out_of_sight_replays_once_on_the_same_connection(
    engine: sa.Engine,
    pg_url: str,
    go_read_only: sa.TextClause,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transaction made read-only out of the client's sight: the server refuses the prepared
    INSERT (25006), the COMMIT after it never ran, the unit is replayed once on the same
    connection, which calls the function from then on. A marker that fails otherwise (its id
    taken) is the unit's error, and the connection takes the next unit."""
    eng = create_async_engine(pg_url, pool_size=1, max_overflow=0)
    Sessions = rdb.AsyncResilientSession(eng, service=service)
    pids = []

    async def read_only_unit(session: AsyncSession) -> int:
        await session.execute(go_read_only)
        pids.append(await _apid(session))
        return int((await session.execute(CTE_READ)).scalar_one())

    try:
        assert await Sessions.run(read_only_unit) == 0
        assert await Sessions.run(read_only_unit) == 0
        assert len(pids) == 3
        assert len(set(pids)) == 1
        assert markers(engine) == []

        taken = marker_id()
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": taken}
            )
        monkeypatch.setattr(_commit, "marker_id", lambda: taken)
        with pytest.raises(sa.exc.IntegrityError):
            await Sessions.run(_abump)
        monkeypatch.undo()
        assert await Sessions.run(_abump) == 1  # the same connection; the first bump undone
    finally:
        await eng.dispose()
    assert len(markers(engine)) == 2


@pytest.mark.asyncio
async def test_the_async_psycopg_simple_query_behaves_as_psycopg_commit_does(
    engine: sa.Engine, pg_url: str
) -> None:
    """The async twin of the test above, on ``psycopg.AsyncConnection``."""
    raw = await psycopg.AsyncConnection.connect(
        sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        await raw.execute("UPDATE marker_counters SET value = value + 1 WHERE id = 1")
        await _commit._psycopg_simple_query_async(raw, b"SELECT 1; COMMIT")
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        await raw.execute("UPDATE marker_counters SET value = value + 10 WHERE id = 1")
        with pytest.raises(psycopg.errors.UndefinedFunction) as info:
            await _commit._psycopg_simple_query_async(
                raw, b"SELECT resilient_db.no_such_function(); COMMIT"
            )
        assert info.value.sqlstate == "42883"
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        await raw.rollback()
    finally:
        await raw.close()
    with engine.connect() as conn:
        value = conn.execute(sa.text("SELECT value FROM marker_counters WHERE id = 1")).scalar()
        assert value == 1


def test_installing_on_a_database_that_is_not_postgresql_is_refused_before_sending_anything(
    tmp_path: Path,
) -> None:
    """The commit markers and the transition triggers are PostgreSQL objects: another database
    gets an error that says so, before any statement (before, SQLite's own syntax error)."""
    path = tmp_path / "other.db"
    eng = sa.create_engine(f"sqlite:///{path}")
    try:
        refused = r"this database is sqlite: commit markers and transition triggers need"
        with pytest.raises(ValueError, match=refused):
            rdb.install_commit_markers(eng)
        with eng.connect() as conn:
            with pytest.raises(ValueError, match=refused):
                rdb.install_commit_markers(conn)
            assert conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar() == 0
        # a Session is refused before it begins anything (it was left in a transaction of its
        # own on a connection checked out for nothing)
        with Session(eng) as session:
            with pytest.raises(ValueError, match=refused):
                rdb.install_commit_markers(session)
            with pytest.raises(ValueError, match=refused):
                rdb.uninstall_commit_markers(session)
            assert not session.in_transaction()
        assert eng.pool.checkedout() == 0
    finally:
        eng.dispose()


def _as_version_4(engine: sa.Engine) -> None:
    """The markers' table says an earlier release (version 4) installed them."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "COMMENT ON TABLE resilient_db.commit_markers IS 'resilient_db commit markers, "
                "version 4: proof that a unit of work committed, kept 900 s'"
            )
        )


@pytest.mark.parametrize("who", ["the owner", "the application role"])
def test_an_install_at_startup_leaves_a_later_releases_markers(
    who: str,
    engine: sa.Engine,
    app_login: tuple[str, str],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The migration of a later release ran (its markers, version 6 here), and an instance of
    this release starts: a rollback, or one restarting during the rollout. Its startup
    ``install_commit_markers(engine)`` sent the install: as the application role it failed
    ("permission denied for database": the instance could not start), as the owner it put
    this release's functions back over the later ones. Their functions are there: it leaves
    them, saying so, and units use them."""
    later = _commit._MARKERS_COMMENT.replace(
        f"version {_commit.MARKERS_VERSION}:", f"version {_commit.MARKERS_VERSION + 1}:"
    )
    with engine.begin() as conn:
        conn.execute(sa.text(f"COMMENT ON TABLE resilient_db.commit_markers IS '{later}'"))
    _, url = app_login
    starting = engine if who == "the owner" else sa.create_engine(url)
    try:
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            rdb.install_commit_markers(starting)
        Sessions = rdb.ResilientSession(starting, service=service)
        before = len(markers(engine))
        assert Sessions.run(_bump) == 1
        assert len(markers(engine)) == before + 1  # its COMMIT carried a marker
    finally:
        if starting is not engine:
            starting.dispose()
    with engine.connect() as conn:
        assert conn.execute(sa.text(_commit._VERSION_SQL)).scalar() == later  # not replaced
    [line] = [r for r in caplog.records if "install_commit_markers:" in r.getMessage()]
    assert (
        f"has commit markers version {_commit.MARKERS_VERSION + 1}, installed by a later release"
        in line.getMessage()
    )
    # said under no service, its fields (the event's) saying so as every event's do
    fields = line.self_heal  # type: ignore[attr-defined]
    assert (fields["event"], fields["service"]) == ("commit_markers_newer", None)
    assert fields["version"] == _commit.MARKERS_VERSION + 1


def test_an_application_role_installing_at_startup_leaves_an_earlier_releases_markers(
    engine: sa.Engine,
    app_login: tuple[str, str],
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """A rolling deploy: the new release starts before the migration ran. Its startup
    ``install_commit_markers(engine)``, as the application's role (no CREATE on the database),
    raised "permission denied for database" on an earlier release's markers (which units use):
    every instance failed to start. It leaves them, saying so and how to upgrade them; the
    owner's install upgrades them."""
    role, url = app_login
    _as_version_4(engine)
    app_engine = sa.create_engine(url)
    try:
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            rdb.install_commit_markers(app_engine)
            Sessions = rdb.ResilientSession(app_engine, service=service)
            before = len(markers(engine))
            Sessions.run(_bump)
        assert len(markers(engine)) == before + 1  # its COMMIT carried a marker
    finally:
        app_engine.dispose()
    [said] = [r.getMessage() for r in caplog.records if "install_commit_markers:" in r.getMessage()]
    assert said.startswith(
        f"[SELF-HEAL] install_commit_markers: database {engine.url.database} has commit markers "
        f"version 4, installed by an earlier release (this one installs version "
        f"{_commit.MARKERS_VERSION}), and role {role} may not create in it or replace them, so "
        "they are left"
    )
    # said by install_commit_markers() under no service; its units' own warning under theirs
    outdated = [e for e in events if e.name == "commit_markers_outdated"]
    assert [(e.service, e.fields["service"]) for e in outdated] == [
        (None, None),
        (service, service),
    ]
    rdb.install_commit_markers(engine)  # the owner's (here a superuser's) install upgrades them
    with engine.connect() as conn:
        assert conn.execute(sa.text(_commit._VERSION_SQL)).scalar() == _commit._MARKERS_COMMENT


@pytest.mark.parametrize(
    ("revoke", "lacks"),
    [
        ("REVOKE SELECT ON resilient_db.commit_markers FROM {role}", "SELECT on"),
        ("REVOKE INSERT ON resilient_db.commit_markers FROM {role}", "INSERT on"),
        (
            "REVOKE EXECUTE ON FUNCTION resilient_db.claim_commit(uuid, integer) FROM PUBLIC",
            "EXECUTE on resilient_db.claim_commit(uuid, integer)",
        ),
        ("REVOKE USAGE ON SCHEMA resilient_db FROM PUBLIC, {role}", "USAGE on schema resilient_db"),
    ],
    ids=["select", "insert", "execute", "usage"],
)
def test_markers_a_role_may_not_use_are_said_with_the_right_it_lacks(
    *,
    engine: sa.Engine,
    app_login: tuple[str, str],
    service: str,
    caplog: pytest.LogCaptureFixture,
    revoke: str,
    lacks: str,
) -> None:
    """An installed set of markers the role may not use (a grant forgotten) was said as "not
    installed, or the role may not use them ... Run install_commit_markers", pointing the
    operator at the wrong fix. The warning names the right the role lacks."""
    role, url = app_login
    with engine.begin() as conn:
        conn.execute(sa.text(revoke.format(role=role)))
    app_engine = sa.create_engine(url)
    try:
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            assert rdb.ResilientSession(app_engine, service=service).run(_bump) >= 1
    finally:
        app_engine.dispose()
    [said] = [r.getMessage() for r in caplog.records if "Commit markers" in r.getMessage()]
    assert said.startswith(
        f"[SELF-HEAL] Commit markers are installed in database {engine.url.database} "
        f"(service={service}), but not usable here: role {role} lacks {lacks}"
    )
    assert "not installed" not in said


def test_markers_installed_by_an_earlier_release_are_used_and_said_once(
    engine: sa.Engine, pg_url: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Markers of an earlier version (their table's comment says which) still serve, but the
    fixes since are not in that database: a warning per engine says so and how to install
    them again; a current install says nothing."""
    eng = sa.create_engine(pg_url)
    try:
        Sessions = rdb.ResilientSession(eng, service=service)
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            Sessions.run(_bump)
        assert not [r for r in caplog.records if "earlier release" in r.getMessage()]
    finally:
        eng.dispose()
    _as_version_4(engine)
    caplog.clear()
    eng = sa.create_engine(pg_url)
    try:
        Sessions = rdb.ResilientSession(eng, service=f"{service}-old")
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            Sessions.run(_bump)
            eng.dispose()  # a new connection checks again: said once
            Sessions.run(_bump)
    finally:
        eng.dispose()
    said = [r.getMessage() for r in caplog.records if "earlier release" in r.getMessage()]
    assert len(said) == 1, said
    assert "are version 4, installed by an earlier release" in said[0]
    assert f"(service={service}-old) are version 4" in said[0]  # the service, as lines name it
    assert "install_commit_markers" in said[0]
    assert len(markers(engine)) == 3  # used: every unit's COMMIT carried its marker


@pytest.mark.parametrize("ahead", [0.0, 0.5, 120.0])
def test_a_marker_written_before_the_table_was_made_again_is_unknown_never_fenced(
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    ahead: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A unit commits, its answer is lost, and before its check runs the markers are
    uninstalled and installed again (``alembic downgrade base`` + ``upgrade head``, or ``DROP
    SCHEMA resilient_db CASCADE`` and an install, as the README's fix for a broken install
    says): its marker went with the old table. The claim found it missing from the new one,
    fenced it and answered "not committed": the committed unit ran again, written twice. It is
    unknown now (``CommitOutcomeUnknownError``), written once. Also where this host's clock is
    ``ahead`` of the server's (marker ids carry this host's time, the table's birth the
    server's): by more than the time from the COMMIT to the new install, the marker looked
    younger than the table, and the unit was replayed. (The claim is the server's function,
    the same for every driver; psycopg's check is the one a listener can reach.)"""
    monkeypatch.setattr(_commit, "time", _ClockAhead(ahead))

    def reinstall(admin: sa.Engine) -> None:
        rdb.uninstall_commit_markers(admin)
        rdb.install_commit_markers(admin)

    error = _unknown_once_checked_after(reinstall, pg_server, pg_database, service)
    # why, for whoever settles it by hand (the claim's bare "unknown" said nothing)
    assert "commit markers were uninstalled and installed again" in str(error)


def test_a_marker_past_the_claims_horizon_is_unknown_and_says_why(
    pg_server: PostgresServer, pg_database: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost answer checked once newer markers are more than CLAIM_HORIZON younger than the
    unit's (the check came late, or a client with its clock far ahead wrote since): the claim
    answers "expired" and the outcome is unknown, not replayed, and the error and its line say
    why (they said only "unknown")."""

    def a_newer_marker_far_ahead(admin: sa.Engine) -> None:
        ahead = _marker_at((uuid7().int >> 80) + int((CLAIM_HORIZON + 60) * 1000))
        with admin.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO resilient_db.commit_markers (id) VALUES (:m)"), {"m": ahead}
            )

    with caplog.at_level(logging.ERROR, logger="resilient_db"):
        error = _unknown_once_checked_after(
            a_newer_marker_far_ahead, pg_server, pg_database, service
        )
    why = f"its commit marker is more than {CLAIM_HORIZON:g} s older than the newest one"
    assert why in str(error)
    assert error.marker is not None
    said = [r.getMessage() for r in caplog.records if "Commit outcome unknown" in r.getMessage()]
    assert len(said) == 1
    assert why in said[0]


def _unknown_once_checked_after(
    act: Callable[[sa.Engine], None], pg_server: PostgresServer, database: str, service: str
) -> rdb.CommitOutcomeUnknownError:
    """A unit writes a ledger row, its COMMIT's answer is lost, and ``act`` (given an engine
    of its own to the database, markers installed) runs just before the check's claim: the
    unit must end unknown, run once, its row written once. Its error."""
    admin = sa.create_engine(pg_server.url(database))
    with admin.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE ledger (id serial PRIMARY KEY, unit text)")
    rdb.install_commit_markers(admin)
    calls: list[int] = []
    with FaultProxy(pg_server) as proxy:
        engine = sa.create_engine(proxy.url(database))
        event.listen(engine, "before_cursor_execute", _before_claim(lambda: act(admin)))
        Sessions = rdb.ResilientSession(engine, service=service, config=FAST)

        def write(session: Session) -> None:
            calls.append(1)
            session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": service})
            proxy.lose_commit_answer()

        try:
            with pytest.raises(rdb.CommitOutcomeUnknownError) as raised:
                Sessions.run(write)
        finally:
            engine.dispose()
    with admin.connect() as conn:
        written = conn.execute(
            sa.text("SELECT count(*) FROM ledger WHERE unit = :u"), {"u": service}
        ).scalar_one()
    admin.dispose()
    assert (len(calls), written) == (1, 1)
    return raised.value


class _ClockAhead:
    """The ``time`` module as ``_commit`` sees it, on a host whose clock is ``seconds`` ahead of
    the server's (its wall clock only: marker ids; monotonic time is unchanged)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.seconds

    def time_ns(self) -> int:
        return time.time_ns() + int(self.seconds * 1e9)


def _before_claim(act: Any) -> Any:
    """A ``before_cursor_execute`` listener doing ``act`` once, just before a claim is sent."""
    done: list[bool] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "claim_commit" in statement and not done:
            done.append(True)
            act()

    return listener


FAST = rdb.Config(initial_delay=0.001, max_delay=0.002, circuit_breaker=False)
