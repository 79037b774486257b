"""Connects that time out together all count for the circuit breaker: a timeout is the hung
database's answer to each of them, not one event seen again (the "one failover is one failure"
rule does not merge them), so units started together against a hung database (a blackholed
address: every connect waits for ``connect_timeout``) open the breaker at their first timeout,
not one wave per timeout. A connect refused at once is the failover window's, as a failure in
flight, and a database that refuses every connect still opens the breaker within a threshold
of units. Real server behind a FaultProxy, real threads and tasks, real connect timeouts."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db as rdb
from resilient_db.testing import FaultProxy

THREADS = 4


def _one(session: Any) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def test_connects_to_a_hung_database_that_fail_together_each_count(
    fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    engine = sa.create_engine(
        fault_proxy.url(pg_database),
        pool_size=THREADS,
        connect_args={"connect_timeout": 2},  # (libpq's least)
    )
    config = rdb.Config(max_retries=0, failure_threshold=3, reset_timeout=30)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    try:
        fault_proxy.blackhole()
        start = threading.Barrier(THREADS)
        failed: list[BaseException] = []

        def worker() -> None:
            start.wait()
            try:
                Sessions.run(_one)
            except Exception as exc:
                failed.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(failed) == THREADS  # each waited its connect timeout, none was rejected
        assert not any(isinstance(exc, rdb.CircuitOpenError) for exc in failed)
        breaker = rdb.health()["services"][service]["breaker"]
        # four failures, each counted: the threshold of three opened it (one wave counted once
        # left it closed with one failure)
        assert breaker["state"] == "open", breaker
    finally:
        fault_proxy.restore()
        engine.dispose()


@pytest.mark.asyncio
async def test_asyncpg_connects_to_a_hung_database_that_time_out_together_each_count(
    fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    """asyncpg's connect timeout (a ``TimeoutError``) is one too."""
    engine = create_async_engine(
        fault_proxy.url(pg_database, driver="asyncpg"),
        pool_size=THREADS,
        connect_args={"timeout": 1},
    )
    config = rdb.Config(max_retries=0, failure_threshold=3, reset_timeout=30)
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=config)

    async def one(session: Any) -> int:
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    try:
        fault_proxy.blackhole()
        failed = await asyncio.wait_for(
            asyncio.gather(*(Sessions.run(one) for _ in range(THREADS)), return_exceptions=True),
            60,
        )
        assert all(isinstance(exc, Exception) for exc in failed), failed
        assert not any(isinstance(exc, rdb.CircuitOpenError) for exc in failed), failed
        breaker = rdb.health()["services"][service]["breaker"]
        assert breaker["state"] == "open", breaker
    finally:
        fault_proxy.restore()
        await engine.dispose()


def test_a_database_refusing_every_connect_opens_the_breaker_within_a_threshold_of_units(
    fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    """Refused connects are not timeouts, but units that begin after the last counted failure
    count: a database that stays down opens the breaker as before."""
    engine = sa.create_engine(fault_proxy.url(pg_database))
    config = rdb.Config(max_retries=0, failure_threshold=3, reset_timeout=30)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    try:
        fault_proxy.refuse(cut=True)
        errors: list[BaseException] = []
        for _ in range(4):
            try:
                Sessions.run(_one)
            except Exception as exc:
                errors.append(exc)
        # the third refused connect opened it (its unit raises its own error): the fourth
        # unit is rejected without a connect
        assert [isinstance(exc, rdb.CircuitOpenError) for exc in errors] == [
            False,
            False,
            False,
            True,
        ], errors
        breaker = rdb.health()["services"][service]["breaker"]
        assert breaker["state"] == "open", breaker
    finally:
        fault_proxy.restore()
        engine.dispose()
