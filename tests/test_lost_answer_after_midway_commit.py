"""A unit commits its writes itself (``session.commit()`` midway), then only reads, and the
answer of its final COMMIT is lost (the fault proxy swallows it after the server committed).

That final transaction wrote nothing: committed or not, it changed nothing, and unless it ran
SERIALIZABLE (where a read-only transaction can still fail at COMMIT, its reads then unproven)
its reads stand either way. The unit is done: it returns its result, once, and the lost answer
is said as a verified one. It was raised as the original error, marked partly committed (a 500
for the web layer), though every write was durable. Where the isolation level is SERIALIZABLE,
or not known for sure (a level set by a statement of the unit's or an earlier transaction's on
the connection), the answer stays the partly committed error. Real server, real lost answers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._statements import SETS_ISOLATION, verdict_of
from resilient_db.testing import FaultProxy
from resilient_db.web import problem_details

pytestmark = pytest.mark.usefixtures("no_backoff")

NOTES = sa.table("midway_notes", sa.column("who", sa.Text))
COUNT = sa.select(sa.func.count()).select_from(NOTES)
LEVEL = sa.text("SHOW transaction_isolation")


@pytest.fixture(params=["markers", "no-markers"])
def markers(request: pytest.FixtureRequest) -> bool:
    """With the commit markers installed, or without (the fallback by transaction id)."""
    return request.param == "markers"


@pytest.fixture
def direct(engine: sa.Engine, markers: bool) -> sa.Engine:
    """The test's database (not through the proxy), with its table (and the markers)."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE midway_notes (who text NOT NULL)"))
    if markers:
        rdb.install_commit_markers(engine)
    return engine


@pytest.fixture
def through_proxy(
    direct: sa.Engine, pg_database: str, fault_proxy: FaultProxy
) -> Iterator[Callable[..., sa.Engine]]:
    """Make engines on the test's database through the fault proxy (disposed of after it)."""
    made: list[sa.Engine] = []

    def make(**kw: Any) -> sa.Engine:
        made.append(sa.create_engine(fault_proxy.url(pg_database), **kw))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


def written(engine: sa.Engine, who: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(COUNT.where(NOTES.c.who == who)) or 0)


def counter(service: str, name: str) -> int:
    return int(rdb.health()["services"][service]["counters"][name])


def assert_partly_committed(exc: BaseException) -> None:
    """Today's answer where the lost COMMIT can't be shown to change nothing: the original
    error (a lost connection), not transient, the web layer's 500 ``partly-committed``."""
    assert rdb.classify(exc) is rdb.Outcome.DISCONNECT
    assert not rdb.is_transient(exc)
    problem = problem_details(exc)
    assert problem is not None
    assert (problem.status, problem.body["type"]) == (
        500,
        "urn:resilient-db:problem:partly-committed",
    )


def said_done(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "Commit outcome verified" in r.getMessage() and "wrote nothing" in r.getMessage()
    ]


# -- sync (psycopg) ----------------------------------------------------------------------------


@pytest.mark.parametrize("level", [None, "REPEATABLE READ"])
def test_reads_after_its_own_commit_then_a_lost_final_answer_the_unit_is_done(
    through_proxy: Callable[..., sa.Engine],
    *,
    direct: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    level: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Write, ``session.commit()``, read (in the server's default level, READ COMMITTED, or
    in REPEATABLE READ set as an execution option), and the final COMMIT's answer is lost:
    the unit returns what it read, once, and the lost answer is said and counted as
    verified."""
    Sessions = rdb.ResilientSession(through_proxy(), service=service)
    calls: list[str] = []

    def unit(session: Session) -> int:
        session.execute(sa.insert(NOTES).values(who="first"))
        session.commit()
        if level is not None:
            session.connection(execution_options={"isolation_level": level})
        calls.append(session.execute(LEVEL).scalar_one())
        fault_proxy.lose_commit_answer()
        return int(session.scalar(COUNT) or 0)

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        assert Sessions.run(unit) == 1
    assert calls == [(level or "read committed").lower()]  # run once
    assert fault_proxy.commits_lost == 1
    assert written(direct, "first") == 1
    assert len(said_done(caplog)) == 1
    assert counter(service, "verified_commits") == 1
    assert counter(service, "unknown_commits") == 0


def test_its_own_commit_answered_with_an_error_is_raised_unchecked(
    direct: sa.Engine, service: str
) -> None:
    """A COMMIT of the unit's own midway that the server answered with an error (a deferred
    unique constraint, 23505 at COMMIT) did not commit, and its answer was not lost: raised as
    it is (not as partly committed), after one attempt, with no check of the marker and
    nothing said verified."""
    with direct.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE midway_once (who text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        )
    once = sa.table("midway_once", sa.column("who", sa.Text))
    Sessions = rdb.ResilientSession(direct, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.insert(once).values(who="twice"))
        session.execute(sa.insert(once).values(who="twice"))
        session.commit()

    with pytest.raises(sa.exc.IntegrityError) as info:
        Sessions.run(unit)
    assert rdb.sqlstate_of(info.value) == "23505"
    assert not rdb.is_transient(info.value)
    assert problem_details(info.value) is None  # not partly committed: it saved nothing
    assert calls == [1]
    for name in ("verified_commits", "verified_not_committed"):
        assert counter(service, name) == 0
    with direct.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(once)) == 0


def test_a_write_after_its_own_commit_then_a_lost_final_answer_is_verified(
    through_proxy: Callable[..., sa.Engine],
    direct: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As before the change: a final transaction that wrote is settled by its check (the
    marker's claim, or the transaction id), found committed: done, once."""
    Sessions = rdb.ResilientSession(through_proxy(), service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.insert(NOTES).values(who="first"))
        session.commit()
        session.execute(sa.insert(NOTES).values(who="second"))
        fault_proxy.lose_commit_answer()

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        Sessions.run(unit)
    assert calls == [1]
    assert (written(direct, "first"), written(direct, "second")) == (1, 1)
    assert said_done(caplog) == []  # (checked, not taken as writing nothing)
    assert counter(service, "verified_commits") == 1


def test_a_unit_that_only_read_and_lost_its_answer_is_still_replayed(
    through_proxy: Callable[..., sa.Engine], fault_proxy: FaultProxy, service: str
) -> None:
    """Without a COMMIT of its own before, nothing of the unit is committed: it is replayed
    as before (a fresh read), not taken as done."""
    Sessions = rdb.ResilientSession(through_proxy(), service=service)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        if len(calls) == 1:
            fault_proxy.lose_commit_answer()
        return int(session.scalar(COUNT) or 0)

    assert Sessions.run(unit) == 0
    assert calls == [1, 1]
    assert fault_proxy.commits_lost == 1


def _alter_database(direct: sa.Engine, pg_database: str) -> None:
    with direct.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(
            f'ALTER DATABASE "{pg_database}" SET default_transaction_isolation = serializable'
        )


#: ways the unit's final transaction runs SERIALIZABLE that SQLAlchemy (or psycopg) knows of
SERIALIZABLE_KNOWN = ["engine", "execution-option", "database-default", "driver-attribute"]


@pytest.mark.parametrize("how", SERIALIZABLE_KNOWN)
def test_a_serializable_final_transaction_stays_partly_committed(
    through_proxy: Callable[..., sa.Engine],
    *,
    direct: sa.Engine,
    pg_database: str,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SERIALIZABLE: a read-only transaction can still fail at COMMIT (its reads then
    unproven), so its lost answer is not taken as done: the error, partly committed."""
    if how == "database-default":
        _alter_database(direct, pg_database)  # (before the engine first connects)
    kw = {"isolation_level": "SERIALIZABLE"} if how == "engine" else {}
    Sessions = rdb.ResilientSession(through_proxy(**kw), service=service)
    seen: list[str] = []

    def unit(session: Session) -> int:
        session.execute(sa.insert(NOTES).values(who="first"))
        session.commit()
        connection = session.connection(
            execution_options={"isolation_level": "SERIALIZABLE"}
            if how == "execution-option"
            else {}
        )
        if how == "driver-attribute":  # (your code on psycopg's own connection)
            driver = connection.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            driver.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        seen.append(session.execute(LEVEL).scalar_one())
        fault_proxy.lose_commit_answer()
        return int(session.scalar(COUNT) or 0)

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.OperationalError) as raised,
    ):
        Sessions.run(unit)
    assert seen == ["serializable"]  # run once, and SERIALIZABLE indeed
    assert fault_proxy.commits_lost == 1
    assert_partly_committed(raised.value)
    assert said_done(caplog) == []
    assert written(direct, "first") == 1


def _set_session_characteristics(session: Session) -> None:
    session.execute(
        sa.text("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    )


def _set_default(session: Session) -> None:
    session.execute(sa.text("SET default_transaction_isolation = 'serializable'"))


def _set_config(session: Session) -> None:
    session.execute(
        sa.select(sa.func.set_config("default_transaction_isolation", "serializable", False))
    )


def _set_on_the_drivers_connection(session: Session) -> None:
    driver = session.connection().connection.driver_connection
    assert driver is not None
    driver.execute("SET default_transaction_isolation TO serializable")


#: statements that set the level of the connection's later transactions: sent before the
#: unit's own COMMIT, its final transaction runs SERIALIZABLE, which SQLAlchemy doesn't know
SETS_LATER = {
    "set-session-characteristics": _set_session_characteristics,
    "set-default": _set_default,
    "set-config": _set_config,
    "drivers-connection": _set_on_the_drivers_connection,
}


@pytest.mark.parametrize("how", [*SETS_LATER, "set-transaction", "earlier-drop-in-session"])
def test_a_level_set_by_a_statement_is_not_known_and_stays_partly_committed(
    through_proxy: Callable[..., sa.Engine],
    *,
    direct: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A level set by a statement (in the unit, before its own COMMIT, in its final
    transaction, or by drop-in code before the unit on the connection the pool hands it
    again) is one SQLAlchemy doesn't know: the lost answer is not taken as done."""
    proxied = through_proxy(pool_size=1, max_overflow=1)  # (the one idle connection reused)
    Sessions = rdb.ResilientSession(proxied, service=service)
    if how == "earlier-drop-in-session":
        with Sessions() as session:
            _set_session_characteristics(session)
            session.commit()
    seen: list[str] = []

    def unit(session: Session) -> int:
        if how in SETS_LATER:
            SETS_LATER[how](session)
        session.execute(sa.insert(NOTES).values(who="first"))
        session.commit()
        if how == "set-transaction":
            session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
        seen.append(session.execute(LEVEL).scalar_one())
        fault_proxy.lose_commit_answer()
        return int(session.scalar(COUNT) or 0)

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.OperationalError) as raised,
    ):
        Sessions.run(unit)
    assert seen == ["serializable"]  # run once, and SERIALIZABLE indeed
    assert fault_proxy.commits_lost == 1
    assert_partly_committed(raised.value)
    assert said_done(caplog) == []
    assert written(direct, "first") == 1


@pytest.mark.parametrize(
    "statement",
    [
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "set session characteristics as transaction isolation level serializable",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET default_transaction_isolation = 'serializable'",
        "SET LOCAL transaction_isolation TO serializable",
        "SELECT set_config('default_transaction_isolation', 'serializable', false)",
        "SELECT set_config(%(name)s, %(value)s, false)",
        "SELECT set_config ( $1, $2, false)",
        "UPDATE pg_settings SET setting = %s WHERE name = %s",
        "DO $$ BEGIN SET default_transaction_isolation = serializable; END $$",
    ],
)
def test_statements_that_may_set_the_level_are_seen(statement: str) -> None:
    assert verdict_of(statement) & SETS_ISOLATION


@pytest.mark.parametrize(
    "statement",
    [
        "SHOW transaction_isolation",
        "show transaction isolation level",
        "SELECT set_config('search_path', 'public', false)",
        "SELECT count(*) FROM midway_notes",
        "BEGIN",
    ],
)
def test_statements_that_set_no_level_are_not_taken_for_one(statement: str) -> None:
    assert not verdict_of(statement) & SETS_ISOLATION


# -- async (asyncpg, psycopg) ------------------------------------------------------------------


@pytest.fixture(params=["asyncpg", "psycopg"])
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def async_through_proxy(
    direct: sa.Engine, pg_database: str, fault_proxy: FaultProxy, async_driver: str
) -> AsyncIterator[Callable[..., AsyncEngine]]:
    made: list[AsyncEngine] = []

    def make(**kw: Any) -> AsyncEngine:
        made.append(create_async_engine(fault_proxy.url(pg_database, driver=async_driver), **kw))
        return made[-1]

    yield make
    for engine in made:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("level", [None, "REPEATABLE READ"])
async def test_async_reads_after_its_own_commit_then_a_lost_final_answer_the_unit_is_done(
    async_through_proxy: Callable[..., AsyncEngine],
    *,
    direct: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    level: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sync test's twin on asyncpg and psycopg's async connection."""
    Sessions = rdb.AsyncResilientSession(async_through_proxy(), service=service)
    calls: list[str] = []

    async def unit(session: AsyncSession) -> int:
        await session.execute(sa.insert(NOTES).values(who="first"))
        await session.commit()
        if level is not None:
            await session.connection(execution_options={"isolation_level": level})
        calls.append((await session.execute(LEVEL)).scalar_one())
        fault_proxy.lose_commit_answer()
        return int(await session.scalar(COUNT) or 0)

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        assert await Sessions.run(unit) == 1
    assert calls == [(level or "read committed").lower()]
    assert fault_proxy.commits_lost == 1
    assert written(direct, "first") == 1
    assert len(said_done(caplog)) == 1
    assert counter(service, "verified_commits") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["engine", "execution-option", "set-session-characteristics"])
async def test_async_serializable_or_unknown_level_stays_partly_committed(
    async_through_proxy: Callable[..., AsyncEngine],
    *,
    direct: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SERIALIZABLE set on the engine or the connection, or by a statement of the unit before
    its own COMMIT: the lost answer stays the partly committed error."""
    kw = {"isolation_level": "SERIALIZABLE"} if how == "engine" else {}
    Sessions = rdb.AsyncResilientSession(async_through_proxy(**kw), service=service)
    seen: list[str] = []

    async def unit(session: AsyncSession) -> int:
        if how == "set-session-characteristics":
            await session.execute(
                sa.text("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            )
        await session.execute(sa.insert(NOTES).values(who="first"))
        await session.commit()
        if how == "execution-option":
            await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        seen.append((await session.execute(LEVEL)).scalar_one())
        fault_proxy.lose_commit_answer()
        return int(await session.scalar(COUNT) or 0)

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError) as raised,
    ):
        await Sessions.run(unit)
    assert seen == ["serializable"]
    assert fault_proxy.commits_lost == 1
    assert_partly_committed(raised.value)
    assert said_done(caplog) == []
    assert written(direct, "first") == 1
