"""A unit's own COMMIT midway sent through the driver's connection, on the three drivers (psycopg
sync, psycopg's async connection, asyncpg), against a real server and the fault proxy.

The driver's own commit of the unit's connection (psycopg's ``commit()``, sync or async, and
asyncpg's ``execute("COMMIT")`` without arguments, the way asyncpg's own transaction commits)
carries a marker as ``session.commit()`` does: a lost answer is settled by its claim (committed
here: the unit is partly committed, never replayed) and a WARNING answered with it is proven on
a new connection. So does a plain ``COMMIT`` psycopg sends as a statement (the connection's
``execute("COMMIT")``, a cursor's, ``text("COMMIT")`` through SQLAlchemy): it goes out as the
connection's ``commit()``. What carries none stays an unknown outcome when its answer is lost:
a ``COMMIT AND CHAIN`` (or any COMMIT with more than the word), and on asyncpg a
``text("COMMIT")`` through SQLAlchemy (a prepared statement, not the connection's ``execute``).
Two lost answers in one attempt (two ``session.commit()`` midway, or one and the final COMMIT)
never make a replay: each part is written once. As docs/units-of-work.md says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy
from resilient_db.web import problem_details

pytestmark = pytest.mark.usefixtures("no_backoff")

DRIVERS = ["psycopg", "psycopg_async", "asyncpg"]
#: the ways of the driver's own commit midway, which carry a marker: psycopg's ``commit()``
#: (``commit``), a plain COMMIT psycopg sends as a statement (``statement``: the connection's
#: ``execute``, ``cursor``: a cursor's, ``text``: SQLAlchemy's ``text("COMMIT")``), asyncpg's
#: ``execute("COMMIT")`` (``statement``)
MARKED_WAYS = [
    *((driver, way) for driver in DRIVERS[:2] for way in ("commit", "statement", "cursor", "text")),
    ("asyncpg", "statement"),
]
#: the ways that carry none: psycopg's ``execute("COMMIT AND CHAIN")`` (``chain``), asyncpg's
#: ``text("COMMIT")`` through SQLAlchemy
UNMARKED_WAYS = [("psycopg", "chain"), ("psycopg_async", "chain"), ("asyncpg", "text")]

NOTES = sa.table("driver_notes", sa.column("who", sa.Text))

#: a deferred trigger that answers the COMMIT of a row of ``warned_notes`` with a WARNING
WARNED = (
    "CREATE TABLE warned_notes (who text NOT NULL)",
    "CREATE FUNCTION warn_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN RAISE WARNING 'deferred check'; RETURN NULL; END$$",
    "CREATE CONSTRAINT TRIGGER warned AFTER INSERT ON warned_notes "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION warn_at_commit()",
)


@pytest.fixture
def direct(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE driver_notes (who text NOT NULL)"))
        for statement in WARNED:
            conn.execute(sa.text(statement))
    rdb.install_commit_markers(engine)
    yield engine
    engine.dispose()


def written(engine: sa.Engine, table: str, who: str) -> int:
    with engine.connect() as conn:
        query = sa.text(f"SELECT count(*) FROM {table} WHERE who = :who")
        return int(conn.scalar(query, {"who": who}) or 0)


def run_unit(
    driver: str, url: str, service: str, *, commit: str, lose: FaultProxy | None, table: str
) -> tuple[list[int], BaseException | None]:
    """A unit that writes ``first`` into ``table``, commits it through the driver's connection
    (``commit``: ``"commit"`` psycopg's ``commit()``, ``"statement"`` the connection's
    ``execute("COMMIT")``, ``"cursor"`` a psycopg cursor's, ``"text"`` SQLAlchemy's
    ``text("COMMIT")``, ``"chain"`` psycopg's ``execute("COMMIT AND CHAIN")``), the answer lost
    through ``lose`` when given, then writes ``second``. Its calls and the error it raised."""
    calls: list[int] = []
    insert_first = sa.text(f"INSERT INTO {table} VALUES ('first')")
    insert_second = sa.insert(NOTES).values(who="second")
    if driver == "psycopg":
        engine = sa.create_engine(url)
        Sessions = rdb.ResilientSession(engine, service=service)

        def unit(session: Session) -> None:
            calls.append(1)
            session.execute(insert_first)
            raw: Any = session.connection().connection.driver_connection
            if lose is not None:
                lose.lose_commit_answer()
            if commit == "commit":
                raw.commit()
            elif commit == "statement":
                assert raw.execute("COMMIT").connection is raw  # (a cursor, as psycopg's)
            elif commit == "cursor":
                cursor = raw.cursor()
                assert cursor.execute("COMMIT") is cursor
            elif commit == "chain":
                raw.execute("COMMIT AND CHAIN")
            else:
                session.execute(sa.text("COMMIT"))
            session.execute(insert_second)

        try:
            Sessions.run(unit)
        except Exception as exc:
            return calls, exc
        finally:
            engine.dispose()
        return calls, None

    async def main() -> BaseException | None:
        engine = create_async_engine(url)
        Sessions = rdb.AsyncResilientSession(engine, service=service)

        async def unit(session: AsyncSession) -> None:
            calls.append(1)
            await session.execute(insert_first)
            conn = await session.connection()
            raw: Any = (await conn.get_raw_connection()).driver_connection
            if lose is not None:
                lose.lose_commit_answer()
            if commit == "text":
                await session.execute(sa.text("COMMIT"))
            elif commit == "cursor":
                cursor = raw.cursor()
                assert await cursor.execute("COMMIT") is cursor
            elif commit == "chain":
                await raw.execute("COMMIT AND CHAIN")
            elif commit == "statement":
                await raw.execute("COMMIT")
            else:
                await raw.commit()
            await session.execute(insert_second)

        try:
            await Sessions.run(unit)
        except Exception as exc:
            return exc
        finally:
            await engine.dispose()
        return None

    return calls, asyncio.run(main())


def url_of(source: Any, database: str, driver: str) -> str:
    return str(source.url(database, driver="asyncpg" if driver == "asyncpg" else "psycopg"))


@pytest.mark.parametrize(("driver", "way"), MARKED_WAYS)
def test_the_drivers_own_commit_midway_whose_answer_is_lost_is_settled_by_its_marker(
    *,
    direct: sa.Engine,
    pg_database: str,
    fault_proxy: FaultProxy,
    service: str,
    driver: str,
    way: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    url = url_of(fault_proxy, pg_database, driver)
    calls, error = run_unit(
        driver, url, service, commit=way, lose=fault_proxy, table="driver_notes"
    )
    assert fault_proxy.commits_lost == 1
    assert calls == [1]  # never replayed
    assert error is not None
    assert rdb.classify(error) is rdb.Outcome.DISCONNECT  # proven committed: not unknown
    assert not rdb.is_transient(error)
    problem = problem_details(error)
    assert problem is not None
    assert problem.body["type"] == "urn:resilient-db:problem:partly-committed"
    assert [e.name for e in events] == ["commit_verified", "partly_committed"]
    assert written(direct, "driver_notes", "first") == 1
    assert written(direct, "driver_notes", "second") == 0


@pytest.mark.parametrize(("driver", "way"), UNMARKED_WAYS)
def test_a_commit_statement_midway_without_a_marker_whose_answer_is_lost_stays_unknown(
    *,
    direct: sa.Engine,
    pg_database: str,
    fault_proxy: FaultProxy,
    service: str,
    driver: str,
    way: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    url = url_of(fault_proxy, pg_database, driver)
    calls, error = run_unit(
        driver, url, service, commit=way, lose=fault_proxy, table="driver_notes"
    )
    assert fault_proxy.commits_lost == 1
    assert calls == [1]
    assert error is not None
    assert rdb.classify(error) is rdb.Outcome.COMMIT_UNKNOWN
    problem = problem_details(error)
    assert problem is not None
    assert problem.body["type"] == "urn:resilient-db:problem:commit-outcome-unknown"
    assert [e.name for e in events] == ["partly_committed"]
    assert written(direct, "driver_notes", "first") == 1


@pytest.mark.parametrize(("driver", "way"), MARKED_WAYS)
def test_a_warning_at_the_drivers_own_commit_midway_is_proven_and_the_unit_goes_on(
    *,
    direct: sa.Engine,
    pg_server: Any,
    pg_database: str,
    service: str,
    driver: str,
    way: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    url = url_of(pg_server, pg_database, driver)
    calls, error = run_unit(driver, url, service, commit=way, lose=None, table="warned_notes")
    assert error is None
    assert calls == [1]
    verified = [e for e in events if e.name == "commit_verified"]
    assert len(verified) == 1, events
    assert "a WARNING with SQLSTATE 01000" in verified[0].message  # (not its text)
    assert written(direct, "warned_notes", "first") == 1
    assert written(direct, "driver_notes", "second") == 1


# -- two lost answers in one attempt -----------------------------------------------------------
#: what follows a first ``session.commit()`` midway whose answer was lost, the unit's code
#: catching the error and going on: a second one lost the same way (``midway``), the unit's
#: final COMMIT's answer lost (``final``), or its final COMMIT failing with a serialization
#: failure, transient had nothing committed (``conflict``)
AFTER_A_LOST_MIDWAY = ["midway", "final", "conflict"]

#: a deferred trigger that fails the COMMIT of a row ``fails`` of ``twice_notes`` with 40001
TWICE = (
    "CREATE TABLE twice_notes (who text NOT NULL)",
    "CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN RAISE EXCEPTION 'at commit' USING ERRCODE = '40001'; RETURN NULL; END$$",
    "CREATE CONSTRAINT TRIGGER fails AFTER INSERT ON twice_notes DEFERRABLE INITIALLY DEFERRED "
    "FOR EACH ROW WHEN (NEW.who = 'fails') EXECUTE FUNCTION fail_at_commit()",
)


def run_twice_lost(
    driver: str, url: str, service: str, *, then: str, lose: FaultProxy
) -> tuple[list[int], list[BaseException], object]:
    """A unit that writes ``first``, commits it midway (``session.commit()``) with the answer
    lost, catches the error, rolls back and writes ``second``; then ``then`` (see
    :data:`AFTER_A_LOST_MIDWAY`). Its calls, the errors its code caught, and its result (or
    the error it raised)."""
    calls: list[int] = []
    caught: list[BaseException] = []
    first = sa.text("INSERT INTO twice_notes VALUES ('first')")
    second = sa.text("INSERT INTO twice_notes VALUES ('second')")
    fails = sa.text("INSERT INTO twice_notes VALUES ('fails')")
    if driver == "psycopg":
        engine = sa.create_engine(url)
        Sessions = rdb.ResilientSession(engine, service=service)

        def commit_lost(session: Session) -> None:
            lose.lose_commit_answer()
            try:
                session.commit()
            except sa.exc.DBAPIError as exc:
                caught.append(exc)
                session.rollback()

        def unit(session: Session) -> int:
            calls.append(1)
            session.execute(first)
            commit_lost(session)
            session.execute(second)
            if then == "midway":
                commit_lost(session)
                session.execute(sa.text("SELECT 1"))
            elif then == "final":
                lose.lose_commit_answer()
            else:
                session.execute(fails)
            return 7

        try:
            return calls, caught, Sessions.run(unit)
        except Exception as exc:
            return calls, caught, exc
        finally:
            engine.dispose()

    async def main() -> object:
        engine = create_async_engine(url)
        Sessions = rdb.AsyncResilientSession(engine, service=service)

        async def commit_lost(session: AsyncSession) -> None:
            lose.lose_commit_answer()
            try:
                await session.commit()
            except sa.exc.DBAPIError as exc:
                caught.append(exc)
                await session.rollback()

        async def unit(session: AsyncSession) -> int:
            calls.append(1)
            await session.execute(first)
            await commit_lost(session)
            await session.execute(second)
            if then == "midway":
                await commit_lost(session)
                await session.execute(sa.text("SELECT 1"))
            elif then == "final":
                lose.lose_commit_answer()
            else:
                await session.execute(fails)
            return 7

        try:
            return await Sessions.run(unit)
        except Exception as exc:
            return exc
        finally:
            await engine.dispose()

    return calls, caught, asyncio.run(main())


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "no-markers"])
@pytest.mark.parametrize("then", AFTER_A_LOST_MIDWAY)
@pytest.mark.parametrize("driver", DRIVERS)
def test_two_lost_commit_answers_in_one_attempt_never_write_twice(
    *,
    pg_url: str,
    pg_database: str,
    fault_proxy: FaultProxy,
    service: str,
    driver: str,
    then: str,
    markers: bool,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Two COMMITs of one attempt lose their answers (both the code's own, midway, or one of
    them and the final one; the server committed each), or the final one fails after a lost
    one midway: the unit is never replayed (each part written once). With the markers each
    lost answer is proven committed; without them one midway stays unknown (an ERROR
    ``commit_unknown`` line each, said when the attempt ends), the final one proven by its
    transaction id. A final failure after it is raised, partly committed, not transient."""
    direct = sa.create_engine(pg_url)
    try:
        with direct.begin() as conn:
            for statement in TWICE:
                conn.execute(sa.text(statement))
        if markers:
            rdb.install_commit_markers(direct)
        url = url_of(fault_proxy, pg_database, driver)
        calls, caught, result = run_twice_lost(driver, url, service, then=then, lose=fault_proxy)
        assert calls == [1]  # never replayed
        assert fault_proxy.commits_lost == (1 if then == "conflict" else 2)
        midway = rdb.Outcome.DISCONNECT if markers else rdb.Outcome.COMMIT_UNKNOWN
        assert [rdb.classify(exc) for exc in caught] == [midway] * (2 if then == "midway" else 1)
        said = [e.name for e in events if e.name != "commit_markers_missing"]
        unknown = rdb.health()["services"][service]["counters"]["unknown_commits"]
        if then == "conflict":
            assert isinstance(result, sa.exc.DBAPIError), result
            assert rdb.sqlstate_of(result) == "40001"
            assert not rdb.is_transient(result)
            problem = problem_details(result)
            assert problem is not None
            assert problem.body["type"] == "urn:resilient-db:problem:partly-committed"
            assert written(direct, "twice_notes", "second") == 0
        else:
            assert result == 7
            assert written(direct, "twice_notes", "second") == 1
        if markers:
            assert unknown == 0
            verified = 1 if then == "conflict" else 2
            assert said.count("commit_verified") == verified, said
            assert "commit_unknown" not in said
        else:
            assert unknown == len(caught)
            assert said.count("commit_unknown") == len(caught), said
            assert said.count("commit_verified") == (1 if then == "final" else 0), said
        assert written(direct, "twice_notes", "first") == 1
    finally:
        direct.dispose()


# -- a warned COMMIT on a connection of the other kind -----------------------------------------
def test_a_warning_at_a_sync_sessions_commit_inside_an_async_unit_is_an_unknown_outcome(
    *,
    direct: sa.Engine,
    pg_server: Any,
    pg_database: str,
    service: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """An async unit whose code commits through a session of a sync factory (its engine
    hooked, its COMMIT marked) answered with a WARNING (a deferred trigger's here; a cancelled
    wait for the synchronous standby answers so): the check that would prove it is the async
    factory's, which can't run from a sync connection. Its outcome is unknown, as
    docs/failover.md says of a warned COMMIT midway that can't be proven:
    CommitOutcomeUnknownError, counted and said once, never replayed (it was an
    ``UnprovenCommit``, a 500 ``partly-committed`` counted nowhere as an unknown outcome)."""
    sync_engine = sa.create_engine(url_of(pg_server, pg_database, "psycopg"))
    SyncSessions = rdb.ResilientSession(sync_engine, service=f"{service}-sync")
    calls: list[int] = []

    async def main() -> object:
        engine = create_async_engine(url_of(pg_server, pg_database, "asyncpg"))
        Sessions = rdb.AsyncResilientSession(engine, service=service)

        async def unit(session: AsyncSession) -> int:
            calls.append(1)
            await session.execute(sa.select(NOTES))
            with SyncSessions() as other:
                other.execute(sa.text("INSERT INTO warned_notes VALUES ('first')"))
                other.commit()
            return 7

        try:
            return await Sessions.run(unit)
        except Exception as exc:
            return exc
        finally:
            await engine.dispose()

    try:
        error = asyncio.run(main())
    finally:
        sync_engine.dispose()
    assert calls == [1]  # never replayed
    assert isinstance(error, rdb.CommitOutcomeUnknownError), error
    assert "no check runs from a connection of another kind" in str(error)
    assert not rdb.is_transient(error)
    problem = problem_details(error)
    assert problem is not None
    assert problem.body["type"] == "urn:resilient-db:problem:commit-outcome-unknown"
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 1
    assert [e.name for e in events].count("commit_unknown") == 1, events
    assert written(direct, "warned_notes", "first") == 1
