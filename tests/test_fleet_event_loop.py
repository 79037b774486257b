"""An async unit's failure path and a Redis that answers, but slowly: the shared breaker's
failure script (and the retry budget's withdrawal, the retry's admission, the reset of the
shared run of failures) was sent on the event loop, so every task waited for each failure's
Redis round trips (measured: 5 ms a reply took a loop of 8 tasks from 1,051 units in 2 s to
283). They run in a worker thread while the state is shared; the unit awaits them in order.

Real Redis behind a loopback proxy that delays every chunk, real PostgreSQL, asyncpg. What is
asserted is progress, not speed: another task of the loop runs while the unit's failure path
waits for Redis (its ticks), where before it ran only between the unit's database awaits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from processes import wait_for
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer, RedisServer

pytestmark = pytest.mark.slow

LATENCY = 0.15  # seconds, each direction: a Redis round trip takes 0.3 s or more


@pytest.fixture
def slow_redis(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy((redis_server.host, redis_server.port)) as proxy:
        yield proxy


@pytest_asyncio.fixture
async def aengine(pg_server: PostgresServer, pg_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    yield engine
    await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")  # (installs raise_code in the test's database)
async def test_a_slow_redis_does_not_hold_the_event_loop_on_the_failure_path(
    aengine: AsyncEngine,
    redis_server: RedisServer,
    slow_redis: FaultProxy,
    clean_env: pytest.MonkeyPatch,
    service: str,
) -> None:
    url = f"redis://:{redis_server.password}@{slow_redis.host}:{slow_redis.port}/0"
    rdb.reload_config(
        {
            "SELF_HEALING_REDIS_URL": url,
            "SELF_HEALING_REDIS_TIMEOUT": "5000",  # slow, never down
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
    slow_redis.latency(LATENCY)
    calls: list[int] = []

    async def fails_once(session: AsyncSession) -> int:
        calls.append(1)
        if len(calls) == 1:  # the database is starting up: a failure for the breaker
            await session.execute(sa.text("SELECT raise_code('57P03')"))
        return len(calls)

    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    before = ticks
    try:
        assert await Sessions.run(fails_once) == 2
    finally:
        running = False
        await task
        slow_redis.latency(0)
    # the failure's script and the success's reset each waited 0.3 s or more for Redis
    assert ticks - before >= 20, ticks - before
