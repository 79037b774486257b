"""resilient_db.web's answer when a request's own deadline (``asyncio.timeout`` around an async
unit) cuts off the unit's COMMIT: the library logs "Commit interrupted ... outcome unknown" and
counts an unknown commit, and the client is told so, 500 ``commit-outcome-unknown``, not a plain
500 it may resubmit after (the ``TimeoutError`` is an ``OSError``, which the handlers pass on as
the application's own). Against the suite's real server, through both async drivers: the COMMIT
is held on the server (a deferred constraint trigger sleeping at COMMIT), and the deadline is
brought forward once the server shows the COMMIT running (an order, not a duration)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from scenarios import ASYNC_DRIVERS
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db.testing import PostgresServer
from resilient_db.web import PROBLEM_JSON, install_exception_handlers, problem_details

pytestmark = [
    pytest.mark.usefixtures("no_backoff"),
    pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is Python 3.11's"),
]

#: a COMMIT that sleeps on the server until cancelled (the cancel ends it: nothing committed)
SLOW_COMMIT = """
CREATE TABLE slow_commits (id serial PRIMARY KEY);
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(30);
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


def committing(server: PostgresServer, database: str) -> bool:
    """A backend of ``database`` is in the slow COMMIT's sleep."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event = 'PgSleep' AND query ILIKE '%COMMIT%'",
        database=database,
    )
    return bool(rows[0][0])


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("spelling", ["Sessions.run(write)", "Sessions.begin()"])
def test_a_deadline_cutting_off_a_units_commit_is_commit_outcome_unknown(
    pg_server: PostgresServer, pg_database: str, service: str, driver: str, spelling: str
) -> None:
    """The unit's COMMIT, or drop-in code's (``async with Sessions.begin()``, whose COMMIT
    SQLAlchemy ran in a task of its own: the route's ``TimeoutError`` came unmarked, a plain
    500)."""
    with pg_server.connect(pg_database) as conn:
        conn.execute(SLOW_COMMIT)
    direct = sa.create_engine(pg_server.url(pg_database))
    try:
        rdb.install_commit_markers(direct)
    finally:
        direct.dispose()
    app = FastAPI()
    install_exception_handlers(app)
    raised: list[BaseException] = []

    @app.post("/tasks")
    async def add() -> dict[str, Any]:
        engine = create_async_engine(
            pg_server.url(pg_database, driver=driver), poolclass=sa.pool.NullPool
        )
        Sessions = rdb.AsyncResilientSession(engine, service=service)
        loop = asyncio.get_running_loop()

        async def write(session: AsyncSession) -> dict[str, Any]:
            await session.execute(sa.text("INSERT INTO slow_commits DEFAULT VALUES"))
            return {"ok": True}

        async def expire(deadline: Any) -> None:
            for _ in range(3000):  # the COMMIT is running on the server: the deadline is now
                if committing(pg_server, pg_database):
                    deadline.reschedule(loop.time())
                    return
                await asyncio.sleep(0.01)

        watcher = None
        try:
            async with asyncio.timeout(None) as deadline:  # the request's deadline
                watcher = asyncio.ensure_future(expire(deadline))
                if spelling == "Sessions.run(write)":
                    return await Sessions.run(write)
                async with Sessions.begin() as session:
                    return await write(session)
        except BaseException as exc:
            raised.append(exc)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            await engine.dispose()

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/tasks")
    [error] = raised
    assert isinstance(error, TimeoutError)  # what the route saw is unchanged
    assert isinstance(error.__cause__, asyncio.CancelledError)
    counters = rdb.health()["services"][service]["counters"]
    assert counters["unknown_commits"] == 1
    assert answer.status_code == 500, answer.text
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert "retry-after" not in answer.headers
    body = answer.json()
    assert body["type"] == "urn:resilient-db:problem:commit-outcome-unknown"
    assert body["service"] == service
    assert "Do not resubmit blindly" in body["detail"]


def test_a_timeout_of_the_applications_own_stays_the_applications() -> None:
    """A ``TimeoutError`` that cut off no COMMIT (the application's own deadline around
    anything else) is not answered: it stays the application's 500, as before."""

    async def sleepy() -> None:
        async with asyncio.timeout(0):
            await asyncio.sleep(1)

    with pytest.raises(TimeoutError) as raised:
        asyncio.run(sleepy())
    assert isinstance(raised.value.__cause__, asyncio.CancelledError)
    assert problem_details(raised.value) is None
