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
As docs/units-of-work.md says.
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
