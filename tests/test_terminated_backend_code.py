"""A backend terminated under a running statement (``pg_terminate_backend``, a smart
shutdown) is said, classified and counted alike on both async drivers: by the server's
SQLSTATE, 57P01 (admin_shutdown). psycopg raises the server's FATAL error; asyncpg raises its
own ``ConnectionDoesNotExistError`` (08003, "connection does not exist", a code no server sends)
from it, and the ``[SELF-HEAL]`` lines, their events and ``sqlstate_of`` named 08003: an
operator read a connection that was never there, not the backend that was ended. (asyncpg
before 0.32 keeps no error of the server's: 08003 is all it says.)

Real server, both drivers; the statement ends its own backend (no timing)."""

from __future__ import annotations

import logging

import asyncpg
import pytest
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, fatal_code
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")

#: the statement terminates its own backend, then waits: the server ends the session in the
#: middle of it with FATAL 57P01, as it does for another session's pg_terminate_backend
SELF_TERMINATE = sa.text("SELECT pg_terminate_backend(pg_backend_pid()), pg_sleep(30)")

#: asyncpg 0.32+ raises its lost connection from the server's FATAL error
ASYNCPG_KEEPS_FATAL = tuple(int(n) for n in asyncpg.__version__.split(".")[:2]) >= (0, 32)


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    prefix = f"[SELF-HEAL] {start}"
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


@pytest.mark.asyncio
async def test_a_terminated_backend_is_said_and_counted_by_the_servers_code(
    *,
    made_async_engines: list[AsyncEngine],
    pg_async_url: str,
    async_driver: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    # (psycopg before 3.2.4 keeps no code of a FATAL error: "none", see fatal_code)
    if async_driver == "asyncpg":
        code = "57P01" if ASYNCPG_KEEPS_FATAL else "08003"
    else:
        code = fatal_code("57P01") or "none"
    engine = create_async_engine(pg_async_url)
    made_async_engines.append(engine)
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        if len(calls) == 1:
            await session.execute(SELF_TERMINATE)
        return len(calls)

    caplog.set_level(logging.INFO, logger="resilient_db")
    assert await Sessions.run(unit) == 2
    (retry,) = lines(caplog, "Retry attempt")
    assert f"disconnect (SQLSTATE {code})" in retry
    (recovered,) = lines(caplog, "Recovered")
    assert recovered.endswith(f"(the last failure: disconnect, SQLSTATE {code})")
    (event,) = [e for e in events if e.name == "recovered"]
    assert (event.fields["outcome"], event.fields["sqlstate"]) == ("disconnect", code)
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"disconnect": 1}

    # raised once retries run out: the error's code is the server's, a disconnect
    Twice = rdb.AsyncResilientSession(engine, service=service, config=rdb.Config(max_retries=1))
    with pytest.raises(sa.exc.DBAPIError) as info:
        await Twice.run(lambda session: session.execute(SELF_TERMINATE))
    assert (rdb.sqlstate_of(info.value) or "none") == code
    assert rdb.classify(info.value) is rdb.Outcome.DISCONNECT
    (gave_up,) = lines(caplog, "Gave up")
    assert f"disconnect (SQLSTATE {code})" in gave_up
    assert rdb.health()["services"][service]["counters"]["retries_by_class"] == {"disconnect": 2}
