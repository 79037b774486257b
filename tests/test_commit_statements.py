"""A unit whose own code commits its transaction with a statement (``COMMIT``, ``END``,
``COMMIT AND CHAIN`` sent as text, through SQLAlchemy or the driver's own connection).

The work before that statement is committed: the unit can't be replayed whole after it (the
replay would write it again), whatever fails later, unless the server refused the statement. And
the unit's final COMMIT, which then ends nothing (or the chained transaction), must not make a
unit that went through without a fault run again. Real server, psycopg (sync and async) and
asyncpg, with the commit markers and without them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

INSERT = sa.text("INSERT INTO ledger (unit) VALUES (:unit)")
#: fails with a serialization failure (40001, retried) without writing anything
CONFLICT_FUNCTION = (
    "CREATE FUNCTION serialization_failure() RETURNS void LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END $$"
)
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
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE ledger (id bigserial PRIMARY KEY, unit text)")
            conn.exec_driver_sql(CONFLICT_FUNCTION)
        if request.param == "markers":
            rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    return pg_database


def rows(server: PostgresServer, database: str, unit: str) -> int:
    found = server.execute(
        "SELECT count(*) FROM ledger WHERE unit = %s", params=(unit,), database=database
    )
    return int(found[0][0])


def fail_first_commit(server: PostgresServer, database: str) -> None:
    for statement in FAIL_FIRST_COMMIT:
        server.execute(statement, database=database)


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
    assert rows(pg_server, database, unit) == 1
