"""The engine's pool under load and faults, with real threads and tasks against the real
server: more units than connections while the server restarts (every unit done exactly once
or raised as the documented error, the pool's connections all back afterwards, the pool
serving again), with ``pool_pre_ping``, ``NullPool`` and no reset on return; an attempt's wait
for a pooled connection, which the deadline does not cut (``pool_timeout`` bounds it: the
pool's ``TimeoutError``, never retried); async tasks cancelled while they wait for a connection
leave the pool whole. Backoff zeroed; the restart is the server's fast shutdown and start."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import install_markers
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

THREADS = 16
UNITS = 10  # per thread or task
#: units retry through the restart (its stop and start take about a second) without a backoff
THROUGH_RESTART = rdb.Config(max_retries=100, failure_threshold=10_000, deadline=30)
#: the errors a unit may end with when its retries ran out during the restart (with backoff
#: zeroed, they and the checks of a COMMIT whose answer the shutdown cut can run out while the
#: server is down: the outcome of such a COMMIT is then unknown, said so, never replayed)
DOCUMENTED = (sa.exc.DBAPIError, rdb.CommitOutcomeUnknownError)


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    with pg_server.connect(pg_database) as conn:
        conn.execute("CREATE TABLE units (id text PRIMARY KEY)")
    install_markers(pg_server, pg_database)
    return pg_database


def _rows(server: PostgresServer, database: str) -> set[str]:
    return {row[0] for row in server.execute("SELECT id FROM units", database=database)}


def _assert_each_once(outcomes: dict[str, Any], rows: set[str]) -> None:
    """Every unit's row written exactly once (the primary key would refuse a second) when it
    succeeded; a unit that failed raised a documented error (the database's, or an unknown
    outcome of a COMMIT whose answer the restart cut), and wrote at most its one row."""
    assert len(outcomes) == THREADS * UNITS
    done = {key for key, outcome in outcomes.items() if outcome == "done"}
    assert done <= rows
    failed = {key: o for key, o in outcomes.items() if o != "done"}
    assert all(isinstance(o, DOCUMENTED) for o in failed.values()), failed
    assert rows <= set(outcomes)


@pytest.mark.slow
@pytest.mark.server_control
@pytest.mark.parametrize(
    "options",
    [
        {"pool_size": 4, "max_overflow": 0, "pool_timeout": 20},
        {"pool_size": 4, "max_overflow": 0, "pool_timeout": 20, "pool_pre_ping": True},
        {"pool_size": 4, "max_overflow": 0, "pool_timeout": 20, "pool_reset_on_return": None},
        {"poolclass": pool.NullPool},
    ],
    ids=["queue", "pre-ping", "no-reset", "null"],
)
def test_threads_through_a_restart_each_unit_once_and_the_pool_whole(
    pg_server: PostgresServer, database: str, service: str, options: dict[str, Any]
) -> None:
    engine = sa.create_engine(pg_server.url(database), **options)
    Sessions = rdb.ResilientSession(engine, service=service, config=THROUGH_RESTART)
    outcomes: dict[str, Any] = {}
    started = threading.Barrier(THREADS + 1)
    halfway = threading.Event()

    def write(session: Session, key: str) -> None:
        session.execute(sa.text("INSERT INTO units VALUES (:k)"), {"k": key})

    def worker(number: int) -> None:
        started.wait()
        for unit in range(UNITS):
            if unit == UNITS // 2:
                halfway.set()
            key = f"{number}-{unit}"
            try:
                Sessions.run(write, key)
                outcomes[key] = "done"
            except Exception as exc:  # (judged below)
                outcomes[key] = exc

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        started.wait()
        halfway.wait(30)
        pg_server.restart()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        _assert_each_once(outcomes, _rows(pg_server, database))
        if isinstance(engine.pool, pool.QueuePool):
            assert engine.pool.checkedout() == 0  # no connection kept by a unit
        assert Sessions.run(lambda s: s.scalar(sa.text("SELECT 1"))) == 1
        assert rdb.health()["services"][service]["counters"]["pool_timeouts"] == 0
    finally:
        engine.dispose()


def test_the_deadline_cuts_no_attempts_wait_for_a_pooled_connection(
    pg_url: str, service: str
) -> None:
    """A retry whose attempt finds every connection of the pool taken waits for one as long
    as ``pool_timeout`` says, past ``SELF_HEALING_DEADLINE`` (which starts no retry but
    interrupts no attempt): it ends with the pool's ``TimeoutError``, not retried, no failure
    of the database for the breaker."""
    engine = sa.create_engine(pg_url, pool_size=2, max_overflow=0, pool_timeout=0.5)
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(deadline=0.1, max_retries=5)
    )
    taken: list[sa.Connection] = []
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        if len(calls) == 1:  # every connection taken, then a conflict: replayed
            taken.extend([engine.connect(), engine.connect()])
            taken[0].execute(
                sa.text("DO $$BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END$$")
            )
        return int(session.scalar(sa.text("SELECT 1")))

    try:
        with pytest.raises(sa.exc.TimeoutError):
            Sessions.run(unit)
        assert len(calls) == 2  # the replay waited in the pool, and was not replayed again
        health = rdb.health()["services"][service]
        assert health["counters"]["pool_timeouts"] == 1
        assert health["breaker"]["failures"] == 0
    finally:
        for conn in taken:
            conn.close()
    assert Sessions.run(unit) == 1
    assert engine.pool.checkedout() == 0
    engine.dispose()


@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is Python 3.11's")
async def test_tasks_cancelled_while_waiting_for_a_connection_leave_the_pool_whole(
    pg_async_url: str, service: str
) -> None:
    """Units waiting for a connection of a pool in full use, cancelled (or cut by
    ``asyncio.timeout``) there: the cancellation goes through as it is, no slot is lost, and
    the units holding the connections and those still waiting all end as they should."""
    engine = create_async_engine(pg_async_url, pool_size=2, max_overflow=0, pool_timeout=20)
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    release = asyncio.Event()
    holding = asyncio.Semaphore(0)

    async def hold(session: AsyncSession) -> int:
        await session.execute(sa.text("SELECT 1"))
        holding.release()
        await release.wait()
        return 1

    async def read(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 2"))).scalar_one())

    holders = [asyncio.create_task(Sessions.run(hold)) for _ in range(2)]
    for _ in holders:
        await holding.acquire()
    waiting: list[asyncio.Task[int]] = [asyncio.create_task(Sessions.run(read)) for _ in range(6)]
    for _ in range(20):  # (the waiting units reach the pool's queue)
        await asyncio.sleep(0)
    assert engine.pool.checkedout() == 2
    for task in waiting[:3]:
        task.cancel()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # (cuts a unit waiting in the pool)
            await Sessions.run(read)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*holders, *waiting, return_exceptions=True), 30)
    assert results[:2] == [1, 1]
    assert all(isinstance(r, asyncio.CancelledError) for r in results[2:5])
    assert results[5:] == [2, 2, 2]
    assert engine.pool.checkedout() == 0
    assert [await Sessions.run(read) for _ in range(3)] == [2, 2, 2]  # both slots serve
    assert rdb.health()["services"][service]["counters"]["pool_timeouts"] == 0
    await engine.dispose()


@pytest.mark.slow
@pytest.mark.server_control
@pytest.mark.asyncio
@pytest.mark.parametrize(
    "options",
    [
        {"pool_size": 4, "max_overflow": 0, "pool_timeout": 20},
        {"pool_size": 4, "max_overflow": 0, "pool_timeout": 20, "pool_pre_ping": True},
        {"poolclass": pool.NullPool},
    ],
    ids=["queue", "pre-ping", "null"],
)
async def test_tasks_through_a_restart_each_unit_once_and_the_pool_whole(
    pg_server: PostgresServer, database: str, service: str, options: dict[str, Any]
) -> None:
    engine = create_async_engine(pg_server.url(database, driver="asyncpg"), **options)
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=THROUGH_RESTART)
    outcomes: dict[str, Any] = {}
    halfway = asyncio.Event()

    async def write(session: AsyncSession, key: str) -> None:
        await session.execute(sa.text("INSERT INTO units VALUES (:k)"), {"k": key})

    async def worker(number: int) -> None:
        for unit in range(UNITS):
            if unit == UNITS // 2:
                halfway.set()
            key = f"{number}-{unit}"
            try:
                await Sessions.run(write, key)
                outcomes[key] = "done"
            except Exception as exc:  # (judged below)
                outcomes[key] = exc

    try:
        workers = [asyncio.create_task(worker(n)) for n in range(THREADS)]
        await asyncio.wait_for(halfway.wait(), 30)
        await asyncio.to_thread(pg_server.restart)
        await asyncio.wait_for(asyncio.gather(*workers), 60)
        _assert_each_once(outcomes, _rows(pg_server, database))
        if isinstance(engine.pool, pool.QueuePool):
            assert engine.pool.checkedout() == 0  # no connection kept by a unit
        assert await Sessions.run(_one) == 1
        assert rdb.health()["services"][service]["counters"]["pool_timeouts"] == 0
    finally:
        await engine.dispose()


async def _one(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT 1"))).scalar_one())


@pytest.mark.asyncio
async def test_an_exhausted_async_pool_is_no_failure_of_the_database(
    pg_async_url: str, service: str
) -> None:
    """More tasks than connections, each unit holding its connection on the server: those
    that wait out ``pool_timeout`` raise the pool's ``TimeoutError`` at once (not retried),
    counted as pool timeouts, no failure for the breaker; the others are done."""
    engine = create_async_engine(pg_async_url, pool_size=2, max_overflow=0, pool_timeout=0.2)
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    release = asyncio.Event()
    holding = asyncio.Semaphore(0)
    connected: list[int] = []

    async def hold(session: AsyncSession) -> int:
        await session.execute(sa.text("SELECT 1"))
        connected.append(1)
        holding.release()
        await release.wait()
        return 1

    holders = [asyncio.create_task(Sessions.run(hold)) for _ in range(2)]
    for _ in holders:
        await holding.acquire()
    results = await asyncio.gather(*(Sessions.run(hold) for _ in range(4)), return_exceptions=True)
    release.set()
    assert await asyncio.gather(*holders) == [1, 1]
    assert all(isinstance(r, sa.exc.TimeoutError) for r in results)
    assert len(connected) == 2  # the waiting units never had a connection, nor a replay
    health = rdb.health()["services"][service]
    assert health["counters"]["pool_timeouts"] == 4
    assert health["counters"]["retries"] == 0
    assert health["breaker"] == {**health["breaker"], "state": "closed", "failures": 0}
    assert engine.pool.checkedout() == 0
    await engine.dispose()
