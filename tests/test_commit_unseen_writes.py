"""Writes the marker's condition can't see, against a real server and lost COMMIT answers.

A marker is inserted only when the transaction holds a local xid
(``pg_current_xact_id_if_assigned()``), the server's fact that it wrote. Some writes hold none
when the COMMIT message's marker statement runs, yet commit with it:

* rows of a foreign table (postgres_fdw writes them on the remote server, in a transaction it
  commits with the local COMMIT, which needs no local xid);
* a ``WITH HOLD`` cursor left unfetched: its query runs during COMMIT, after the marker's
  statement (a writing function in it writes then);
* a notification in a read-only transaction: the server assigns its xid during COMMIT, and the
  marker function writes no marker in a read-only transaction.

Each such unit whose COMMIT answer is lost was "proven" not committed and replayed: written
twice, notified twice. Now a statement that writes by its kind makes the COMMIT carry its marker
whatever the xid (the fallback without markers reads an assigned xid), and a read-only
transaction that notifies is settled by its xid: the unit runs once. Sync (psycopg) and async
(asyncpg, psycopg), with the markers installed and without (the fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from scenarios import notifications
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import resilient_db as rdb
from resilient_db import _statements
from resilient_db.testing import FaultProxy, PostgresServer, StandbyPair

pytestmark = pytest.mark.usefixtures("no_backoff")

MARKERS = "markers"
FALLBACK = "fallback"
ASYNC_DRIVERS = ["asyncpg", "psycopg"]

#: a function that writes a ledger row: a held cursor's query calls it
TAKE_TICKET = (
    "CREATE FUNCTION take_ticket(who text) RETURNS int LANGUAGE plpgsql AS $$ "
    "BEGIN INSERT INTO ledger (tag) VALUES (who); RETURN 1; END $$"
)


@pytest.fixture(params=[MARKERS, FALLBACK])
def mode(request: pytest.FixtureRequest) -> str:
    """``markers``: ``rdb.install_commit_markers`` ran; ``fallback``: nothing installed."""
    return str(request.param)


@dataclass
class Env:
    server: PostgresServer
    database: str
    remote: str
    proxy: FaultProxy
    service: str
    calls: list[str] = field(default_factory=list)
    #: psycopg's held cursors the unit made (closed after it: the one whose query runs at
    #: COMMIT can't be closed before)
    cursors: list[Any] = field(default_factory=list)

    def first_call(self, tag: str) -> bool:
        """Count a run of the unit; True on its first (whose COMMIT answer is to be lost)."""
        self.calls.append(tag)
        return len(self.calls) == 1

    def ledger(self, tag: str) -> int:
        rows = self.server.execute(
            "SELECT count(*) FROM ledger WHERE tag = %s", params=(tag,), database=self.database
        )
        return int(rows[0][0])

    def fences(self) -> list[bool]:
        """The markers' ``fence`` column: a unit's marker (False), a check's fence (True)."""
        rows = self.server.execute(
            "SELECT fence FROM resilient_db.commit_markers", database=self.database
        )
        return [bool(row[0]) for row in rows]

    def remote_rows(self, tag: str) -> int:
        rows = self.server.execute(
            "SELECT count(*) FROM remote_rows WHERE tag = %s", params=(tag,), database=self.remote
        )
        return int(rows[0][0])


@pytest.fixture
def env(
    pg_server: PostgresServer, pg_database: str, fault_proxy: FaultProxy, mode: str, service: str
) -> Iterator[Env]:
    """The application's database (a ledger, a writing function, and a foreign table
    ``remote_ledger`` on a second database of the same server, through postgres_fdw), with the
    commit markers installed in ``markers`` mode."""
    remote = f"rdb_remote_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(remote)
    try:
        pg_server.execute(
            "CREATE TABLE remote_rows (id serial PRIMARY KEY, tag text)", database=remote
        )
        url = sa.engine.make_url(pg_server.url(pg_database))
        mapping = f"user '{url.username}'"
        if url.password:
            mapping += f", password '{url.password}'"
        for statement in (
            "CREATE TABLE ledger (id serial PRIMARY KEY, tag text)",
            TAKE_TICKET,
            "CREATE EXTENSION postgres_fdw",
            f"CREATE SERVER loop FOREIGN DATA WRAPPER postgres_fdw "
            f"OPTIONS (host '{pg_server.host}', port '{pg_server.port}', dbname '{remote}')",
            f"CREATE USER MAPPING FOR CURRENT_USER SERVER loop OPTIONS ({mapping})",
            "CREATE FOREIGN TABLE remote_ledger (tag text) SERVER loop "
            "OPTIONS (table_name 'remote_rows')",
        ):
            pg_server.execute(statement, database=pg_database)
        if mode == MARKERS:
            engine = sa.create_engine(pg_server.url(pg_database))
            try:
                rdb.install_commit_markers(engine)
            finally:
                engine.dispose()
        yield Env(pg_server, pg_database, remote, fault_proxy, service)
    finally:
        pg_server.drop_database(remote)


def run_sync(env: Env, unit: Callable[[Session], Any], **engine_options: Any) -> Any:
    """Run ``unit`` once through a resilient factory on the proxy; its result or its error."""
    engine = sa.create_engine(env.proxy.url(env.database), **engine_options)
    try:
        return rdb.ResilientSession(engine, service=env.service).run(unit)
    except Exception as exc:
        return exc
    finally:
        for cursor in env.cursors:
            with contextlib.suppress(psycopg.Error):
                cursor.close()
        engine.dispose()


def run_async(env: Env, driver: str, unit: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        engine = create_async_engine(env.proxy.url(env.database, driver=driver))
        try:
            return await rdb.AsyncResilientSession(engine, service=env.service).run(unit)
        except Exception as exc:
            return exc
        finally:
            for cursor in env.cursors:
                with contextlib.suppress(psycopg.Error):
                    await cursor.close()
            await engine.dispose()

    return asyncio.run(main())


def assert_done_once(env: Env, result: Any) -> None:
    assert env.proxy.commits_lost == 1
    assert not isinstance(result, Exception), repr(result)  # no restart: known in both modes
    assert result == "done"
    assert len(env.calls) == 1, "replayed after a COMMIT that was applied"


# -- a write through a foreign table ---------------------------------------------------------------
#: how the unit's COMMIT carries its marker: the prepared statement, the INSERT inline (an
#: engine that keeps no connection), or the function (a connection that saw a statement naming
#: the transaction's read mode calls it: the transaction here stays read-write)
FORMS = {"prepared": {}, "inline": {"poolclass": NullPool}, "function": {}}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_write_through_a_foreign_table_is_verified_not_replayed(env: Env, form: str) -> None:
    """postgres_fdw's rows hold no local xid: the marker's condition found none, the check
    "proved" the unit not committed, and its replay wrote the remote rows twice."""

    def unit(session: Session) -> str:
        if form == "function":
            session.execute(sa.text("SET TRANSACTION READ WRITE"))
        session.execute(sa.text("INSERT INTO remote_ledger (tag) VALUES (:tag)"), {"tag": form})
        if env.first_call(form):
            env.proxy.lose_commit_answer()
        return "done"

    result = run_sync(env, unit, **FORMS[form])
    assert_done_once(env, result)
    assert env.remote_rows(form) == 1


def test_a_copy_into_a_foreign_table_is_verified_not_replayed(env: Env) -> None:
    """``COPY ... FROM`` on the driver's own cursor, into a foreign table."""

    def unit(session: Session) -> str:
        raw: Any = session.connection().connection.driver_connection
        with raw.cursor() as cursor, cursor.copy("COPY remote_ledger (tag) FROM STDIN") as copy:
            copy.write_row(("copied",))
        if env.first_call("copied"):
            env.proxy.lose_commit_answer()
        return "done"

    assert_done_once(env, run_sync(env, unit))
    assert env.remote_rows("copied") == 1


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_async_a_write_through_a_foreign_table_is_verified_not_replayed(
    env: Env, driver: str
) -> None:
    async def unit(session: AsyncSession) -> str:
        await session.execute(
            sa.text("INSERT INTO remote_ledger (tag) VALUES (:tag)"), {"tag": driver}
        )
        if env.first_call(driver):
            env.proxy.lose_commit_answer()
        return "done"

    assert_done_once(env, run_async(env, driver, unit))
    assert env.remote_rows(driver) == 1


def test_asyncpg_records_copied_into_a_foreign_table_are_verified_not_replayed(env: Env) -> None:
    """asyncpg's ``copy_records_to_table``: a table's name, no statement text."""

    async def unit(session: AsyncSession) -> str:
        conn = await session.connection()
        await conn.execute(sa.text("SELECT 1"))  # (SQLAlchemy's adapter begins: asyncpg's BEGIN)
        raw: Any = (await conn.get_raw_connection()).driver_connection
        await raw.copy_records_to_table(
            "remote_ledger", records=[("asyncpg-copy",)], columns=["tag"]
        )
        if env.first_call("asyncpg-copy"):
            env.proxy.lose_commit_answer()
        return "done"

    assert_done_once(env, run_async(env, "asyncpg", unit))
    assert env.remote_rows("asyncpg-copy") == 1


# -- a held cursor, whose query runs during COMMIT -------------------------------------------------
@pytest.mark.parametrize("how", ["declare", "psycopg-withhold"])
def test_a_held_cursor_left_unfetched_is_verified_not_replayed(env: Env, how: str) -> None:
    """Its query (a writing function) runs during COMMIT, after the marker's condition: the
    write went uncounted, and a lost answer was replayed (written twice). psycopg's named
    cursor declares itself: ``withhold=True`` is seen on the cursor."""

    def unit(session: Session) -> str:
        name = f"held_{len(env.calls)}"
        if how == "declare":
            session.execute(
                sa.text(f"DECLARE {name} CURSOR WITH HOLD FOR SELECT take_ticket(:tag)"),
                {"tag": how},
            )
        else:
            raw: Any = session.connection().connection.driver_connection
            env.cursors.append(raw.cursor(name=name, withhold=True))
            env.cursors[-1].execute("SELECT take_ticket(%s)", (how,))
        if env.first_call(how):
            env.proxy.lose_commit_answer()
        return "done"

    assert_done_once(env, run_sync(env, unit))
    assert env.ledger(how) == 1


@pytest.mark.parametrize(
    ("driver", "how"),
    [("asyncpg", "declare"), ("psycopg", "declare"), ("psycopg", "psycopg-withhold")],
)
def test_async_a_held_cursor_left_unfetched_is_verified_not_replayed(
    env: Env, driver: str, how: str
) -> None:
    tag = f"{driver}-{how}"

    async def unit(session: AsyncSession) -> str:
        name = f"held_{len(env.calls)}"
        if how == "declare":
            await session.execute(
                sa.text(f"DECLARE {name} CURSOR WITH HOLD FOR SELECT take_ticket(:tag)"),
                {"tag": tag},
            )
        else:
            conn = await session.connection()
            await conn.execute(sa.text("SELECT 1"))
            raw: Any = (await conn.get_raw_connection()).driver_connection
            env.cursors.append(raw.cursor(name=name, withhold=True))
            await env.cursors[-1].execute("SELECT take_ticket(%s)", (tag,))
        if env.first_call(tag):
            env.proxy.lose_commit_answer()
        return "done"

    assert_done_once(env, run_async(env, driver, unit))
    assert env.ledger(tag) == 1


# -- a notification in a read-only transaction -----------------------------------------------------
@pytest.fixture
def listener(env: Env) -> Iterator[Callable[[], list[str]]]:
    """``LISTEN`` on channel ``jobs`` in the application's database; the payloads received."""
    with psycopg.connect(env.server.conninfo(env.database), autocommit=True) as conn:
        conn.execute("LISTEN jobs")
        yield lambda: notifications(conn)


@pytest.mark.parametrize(
    "how", ["postgresql_readonly", "set-transaction-read-only", "read-write-through-the-function"]
)
def test_a_read_only_transaction_that_notifies_sends_its_notification_once(
    env: Env, mode: str, listener: Callable[[], list[str]], how: str
) -> None:
    """A read-only transaction may notify; its xid is assigned during COMMIT, and the marker
    function writes no marker in a read-only transaction: a lost answer was "proven" not
    committed and the unit replayed, notifying twice. Its xid is read before COMMIT as well:
    the check finds no marker (its claim fences the id) and settles the unit by the xid. A
    read-write transaction whose COMMIT calls the function (the client can't tell it from a
    read-only one) is proven by its marker."""

    def unit(session: Session) -> str:
        if how == "postgresql_readonly":
            conn = session.connection(execution_options={"postgresql_readonly": True})
        else:
            conn = session.connection()
            conn.exec_driver_sql(
                "SET TRANSACTION READ ONLY"
                if how == "set-transaction-read-only"
                else "SET TRANSACTION READ WRITE"
            )
        conn.execute(sa.text("SELECT pg_notify('jobs', :tag)"), {"tag": how})
        if env.first_call(how):
            env.proxy.lose_commit_answer()
        return "done"

    assert_done_once(env, run_sync(env, unit))
    assert listener() == [how]
    if mode == MARKERS:
        assert env.fences() == [how != "read-write-through-the-function"]


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_async_a_read_only_transaction_that_notifies_sends_its_notification_once(
    env: Env, listener: Callable[[], list[str]], driver: str
) -> None:
    async def unit(session: AsyncSession) -> str:
        conn = await session.connection(execution_options={"postgresql_readonly": True})
        await conn.execute(sa.text("SELECT pg_notify('jobs', :tag)"), {"tag": driver})
        if env.first_call(driver):
            env.proxy.lose_commit_answer()
        return "done"

    assert_done_once(env, run_async(env, driver, unit))
    assert listener() == [driver]


# -- what carries the flag, and what it costs ------------------------------------------------------
@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO remote_ledger (tag) VALUES ($1)",
        "update remote_ledger SET tag = 'b'",
        "DELETE FROM remote_ledger",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "TRUNCATE remote_ledger",
        "COPY remote_ledger (tag) FROM STDIN",
        "SELECT * INTO archived FROM ledger",
        "WITH moved AS (DELETE FROM ledger RETURNING tag) SELECT count(*) FROM moved",
        "DECLARE c CURSOR WITH HOLD FOR SELECT take_ticket('a')",
        "declare c no scroll cursor with\n hold for select 1 + 1 from ledger",
        "DO $$ BEGIN INSERT INTO remote_ledger VALUES ('a'); END $$",
        "SELECT 1; INSERT INTO ledger (tag) VALUES ('a')",
        "INSERT INTO ledger (tag) VALUES ('a'); NOTIFY jobs",
        "SET LOCAL ROLE tenant; UPDATE ledger SET tag = 'b'",
        # spelled with a newline, a tab or a comment after COPY, or between WITH and HOLD
        "COPY\n    remote_ledger (tag)\nFROM STDIN",
        "COPY\tremote_ledger (tag) FROM STDIN",
        "-- the day's rows ($ amounts)\nCOPY remote_ledger (tag) FROM STDIN",
        "DECLARE c CURSOR WITH /* keep */ HOLD FOR SELECT take_ticket('a' || '$')",
        "DECLARE c CURSOR WITH -- keep\n HOLD FOR SELECT 1",
        # a command EXECUTEd may be put together from pieces or read from a table
        "DO $$ BEGIN EXECUTE (SELECT cmd FROM jobs WHERE id = 1); END $$",
    ],
)
def test_statements_that_write_by_their_kind_carry_the_flag(statement: str) -> None:
    verdict = _statements.verdict_of(statement)
    assert verdict & _statements.WRITES
    assert _statements.may_write(statement)


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ("DO $$ BEGIN EXECUTE 'NOT' || 'IFY ch, ''pieces'''; END $$", _statements.NOTIFIES),
        (
            "DO $$ DECLARE c text; BEGIN FOR c IN SELECT cmd FROM outbox LOOP EXECUTE c; "
            "END LOOP; END $$",
            _statements.NOTIFIES,
        ),
        ("DISCARD SEQUENCES; NOTIFY ch", _statements.NOTIFIES),
        ("DEALLOCATE ALL; SELECT pg_notify('ch', 'a')", _statements.NOTIFIES),
        ("DEALLOCATE ALL; SET ROLE tenant", _statements.STOPS_PREPARED),
        ("DEALLOCATE ALL", _statements.DEALLOCATES),
    ],
)
def test_what_a_text_may_do_besides_is_not_hidden_by_what_it_does_first(
    statement: str, kind: int
) -> None:
    """A notification (delivered at COMMIT, with an xid only then) or a role switch in a text
    that also drops prepared statements, or whose command an EXECUTE puts together."""
    assert _statements.verdict_of(statement) & _statements._KIND == kind


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT take_ticket('a')",  # a function may write: the server decides (its xid)
        "SELECT tag FROM ledger WHERE tag = 'update'",  # a read stays a read
        "SELECT tag FROM ledger FOR UPDATE",
        "COPY (SELECT tag FROM ledger) TO STDOUT",
        "COPY ledger TO STDOUT",
        "DECLARE c CURSOR WITHOUT HOLD FOR SELECT take_ticket('a')",
        "DECLARE c CURSOR FOR SELECT take_ticket('a')",  # runs as it is fetched, before COMMIT
        "SELECT pg_notify('jobs', 'a')",  # NOTIFIES: settled on its own
        "CALL refresh_ledger()",
    ],
)
def test_statements_that_may_write_only_through_a_function_leave_the_condition_to_the_server(
    statement: str,
) -> None:
    assert not _statements.verdict_of(statement) & _statements.WRITES


@pytest.mark.parametrize("mode", [MARKERS], indirect=True)
def test_the_marker_is_written_whatever_the_xid_only_after_a_write_by_kind(env: Env) -> None:
    """A unit that only calls a function that writes nothing keeps its COMMIT free of a marker;
    one whose UPDATE matched no row, which holds no xid either, gets one (a statement that
    writes by its kind may hold none: a foreign table's)."""

    def markers() -> int:
        rows = env.server.execute(
            "SELECT count(*) FROM resilient_db.commit_markers", database=env.database
        )
        return int(rows[0][0])

    engine = sa.create_engine(env.server.url(env.database))
    try:
        Sessions = rdb.ResilientSession(engine, service=env.service)
        Sessions.run(lambda s: s.execute(sa.text("SELECT pg_sleep(0)")))
        assert markers() == 0
        Sessions.run(lambda s: s.execute(sa.text("UPDATE ledger SET tag = 'x' WHERE id < 0")))
        assert markers() == 1
    finally:
        engine.dispose()


# -- a hot standby ---------------------------------------------------------------------------------
@pytest.mark.parametrize("markers", [True, False], ids=["markers", "fallback"])
def test_a_held_cursor_on_a_hot_standby_commits_plainly(
    pg_standby: StandbyPair, markers: bool
) -> None:
    """A held cursor may be declared on a read replica, where nothing can be written and no
    xid assigned (``pg_current_xact_id()`` is refused there): its unit commits plainly, as
    every unit there does, the fallback asking for no xid. Both drivers."""
    pair = pg_standby
    pair.create_database("replica")
    engine = sa.create_engine(pair.primary.url("replica"))
    try:
        if markers:
            rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    pair.wait_replayed()
    held = "DECLARE held CURSOR WITH HOLD FOR SELECT pg_sleep(0)"
    config = rdb.Config(retry=False, circuit_breaker=False)

    def unit(session: Session) -> str:
        session.execute(sa.text(held))
        return "done"

    standby = sa.create_engine(pair.standby.url("replica"))
    try:
        assert rdb.ResilientSession(standby, service="replica", config=config).run(unit) == "done"
    finally:
        standby.dispose()

    async def async_unit(session: AsyncSession) -> str:
        await session.execute(sa.text(held))
        return "done"

    async def main() -> Any:
        async_standby = create_async_engine(pair.standby.url("replica", driver="asyncpg"))
        try:
            factory = rdb.AsyncResilientSession(async_standby, service="replica-a", config=config)
            return await factory.run(async_unit)
        finally:
            await async_standby.dispose()

    assert asyncio.run(main()) == "done"
