"""An async unit's failure path and a Redis that answers, but slowly: the shared breaker's
failure script (and the retry budget's withdrawal, the retry's admission, the reset of the
shared run of failures) was sent on the event loop, so every task waited for each failure's
Redis round trips (measured: 5 ms a reply took a loop of 8 tasks from 1,051 units in 2 s to
283). They run in a worker thread while the state is shared; the unit awaits them in order.

Real Redis, real PostgreSQL, asyncpg. Redis hangs (SIGSTOP) as the unit's attempt fails, and
only a callback of the event loop lets it go on: with the failure's Redis command sent from
the loop, that callback could not run before the command timed out, and the link went down
(asserted as what happened, not as a time)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from processes import wait_for
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db._breaker import breakers
from resilient_db.testing import PostgresServer, RedisServer, free_port

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture
async def aengine(pg_server: PostgresServer, pg_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    yield engine
    await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")  # (installs raise_code in the test's database)
async def test_a_hanging_redis_does_not_hold_the_event_loop_on_the_failure_path(
    aengine: AsyncEngine,
    redis_server: RedisServer,
    clean_env: pytest.MonkeyPatch,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rdb.reload_config(
        {
            "SELF_HEALING_REDIS_URL": redis_server.url,
            "SELF_HEALING_REDIS_TIMEOUT": "5000",  # the longest the failure path may wait
            "SELF_HEALING_FAILURE_THRESHOLD": "100",
            "SELF_HEALING_INITIAL_DELAY": "1",
            "SELF_HEALING_MAX_DELAY": "1",
        }
    )
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    await Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))

    def shared() -> bool:
        return bool(rdb.health()["services"][service]["breaker"]["shared"]["connected"])

    wait_for(shared, timeout=10, what="the shared breaker's link")
    caplog.set_level(logging.WARNING, logger="resilient_db")
    loop = asyncio.get_running_loop()
    calls: list[int] = []

    async def fails_once(session: AsyncSession) -> int:
        calls.append(1)
        if len(calls) == 1:  # the database is starting up: a failure the breaker counts
            redis_server.pause()
            loop.call_later(0.2, redis_server.resume)  # (runs only if the loop does)
            await session.execute(sa.text("SELECT raise_code('57P03')"))
        return len(calls)

    try:
        assert await Sessions.run(fails_once) == 2
    finally:
        redis_server.resume()
    assert shared()
    assert "Shared state unavailable" not in caplog.text


async def _shared_factory(
    aengine: AsyncEngine, redis_server: RedisServer, service: str, **settings: str
) -> rdb.AsyncResilientSession[AsyncSession]:
    """A factory sharing its breaker through ``redis_server`` (a long Redis timeout: the
    longest the failure path may wait), its link up."""
    rdb.reload_config(
        {
            "SELF_HEALING_REDIS_URL": redis_server.url,
            "SELF_HEALING_REDIS_TIMEOUT": "3000",
            "SELF_HEALING_RETRY": "false",
            **settings,
        }
    )
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    await Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))
    wait_for(
        lambda: bool(rdb.health()["services"][service]["breaker"]["shared"]["connected"]),
        timeout=10,
        what="the shared breaker's link",
    )
    return Sessions


async def _run_while_redis_hangs(
    Sessions: rdb.AsyncResilientSession[AsyncSession], redis_server: RedisServer
) -> None:
    """Run one unit that succeeds at once while Redis hangs, and only a callback of the event
    loop lets Redis go on (see the module's doc)."""
    loop = asyncio.get_running_loop()
    redis_server.pause()
    try:
        loop.call_later(0.2, redis_server.resume)  # (runs only if the loop does)
        await Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))
    finally:
        redis_server.resume()


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")  # (installs raise_code in the test's database)
async def test_a_first_attempts_success_after_a_counted_failure_does_not_hold_the_event_loop(
    aengine: AsyncEngine,
    redis_server: RedisServer,
    clean_env: pytest.MonkeyPatch,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A unit's failure was counted fleet-wide; the next unit's first attempt succeeds and
    resets the fleet's run of failures. That reset was sent from the event loop (the unit's
    first attempt is run inline, and so was its success's accounting): a Redis that hangs
    held every task of the loop until the Redis timeout, and the link went down."""
    Sessions = await _shared_factory(
        aengine, redis_server, service, SELF_HEALING_FAILURE_THRESHOLD="100"
    )
    with pytest.raises(sa.exc.DBAPIError):
        await Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    assert rdb.health()["services"][service]["breaker"]["failures"] == 1
    caplog.set_level(logging.WARNING, logger="resilient_db")
    await _run_while_redis_hangs(Sessions, redis_server)
    assert rdb.health()["services"][service]["breaker"]["shared"]["connected"]
    assert "Shared state unavailable" not in caplog.text


@pytest.mark.asyncio
async def test_a_half_open_probes_admission_and_end_do_not_hold_the_event_loop(
    aengine: AsyncEngine,
    redis_server: RedisServer,
    clean_env: pytest.MonkeyPatch,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The shared breaker's opening ran out: the next unit asks Redis for a half-open probe,
    and its success tells Redis. Both were sent from the event loop for a unit's first
    attempt, so a Redis that hangs held every task of the loop (the README: a slow Redis
    holds the failing unit, never the event loop's other tasks)."""
    Sessions = await _shared_factory(
        aengine, redis_server, service, SELF_HEALING_RESET_TIMEOUT="100"
    )
    breakers()[service].open()  # through Redis: the fleet's opening
    wait_for(
        lambda: rdb.health()["services"][service]["breaker"]["state"] == "half-open",
        timeout=5,
        what="the opening to run out",
    )
    caplog.set_level(logging.WARNING, logger="resilient_db")
    await _run_while_redis_hangs(Sessions, redis_server)
    breaker = rdb.health()["services"][service]["breaker"]
    assert breaker["shared"]["connected"]
    assert "Shared state unavailable" not in caplog.text
    assert breaker["state"] == "closed"


@pytest.mark.asyncio
async def test_a_drop_in_sessions_failed_connect_does_not_hold_the_event_loop(
    redis_server: RedisServer,
    clean_env: pytest.MonkeyPatch,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Drop-in use (``async with Sessions() as s``): a connect that fails is put to the breaker
    and retried inside SQLAlchemy's greenlet, which runs on the event loop's thread. Its
    failure script (and its retry's budget) went to Redis from there: a Redis that hangs held
    every task of the loop until the Redis timeout, and the link went down."""
    rdb.reload_config(
        {
            "SELF_HEALING_REDIS_URL": redis_server.url,
            "SELF_HEALING_REDIS_TIMEOUT": "3000",
            "SELF_HEALING_MAX_RETRIES": "1",
            "SELF_HEALING_INITIAL_DELAY": "1",
            "SELF_HEALING_MAX_DELAY": "1",
            "SELF_HEALING_FAILURE_THRESHOLD": "100",
        }
    )
    refused = create_async_engine(f"postgresql+asyncpg://u:p@127.0.0.1:{free_port()}/x")
    Sessions = rdb.AsyncResilientSession(refused, service=service)
    wait_for(
        lambda: bool(rdb.health()["services"][service]["breaker"]["shared"]["connected"]),
        timeout=10,
        what="the shared breaker's link",
    )
    caplog.set_level(logging.WARNING, logger="resilient_db")
    loop = asyncio.get_running_loop()
    redis_server.pause()
    try:
        loop.call_later(0.2, redis_server.resume)  # (runs only if the loop does)
        with pytest.raises((ConnectionRefusedError, sa.exc.DBAPIError)):
            async with Sessions() as session:
                await session.execute(sa.text("SELECT 1"))
    finally:
        redis_server.resume()
        await refused.dispose()
    assert rdb.health()["services"][service]["breaker"]["shared"]["connected"]
    assert "Shared state unavailable" not in caplog.text
