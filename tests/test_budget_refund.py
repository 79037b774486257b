"""A retry the retry budget paid for and that never ran is given back: the circuit breaker
refused its attempt (it opened while the unit backed off, other units' failures opening it), or
the unit was cancelled during the backoff. A refused retry is no retry (see
test_refused_retry.py): the budget, in this process and in the fleet's Redis, does not keep it
spent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import ScriptsSent
from processes import wait_for, wait_for_async
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._breaker import breakers
from resilient_db._budget import LocalBudget, budgets
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.usefixtures("no_backoff")

#: one retry a unit: 1.0 x the one first attempt of the test, no floor; the breaker opens only
#: when a test opens it
SETTINGS: dict[str, Any] = {
    "max_retries": 3,
    "failure_threshold": 50,
    "reset_timeout": 30.0,
    "retry_budget": 1.0,
    "retry_budget_floor": 0,
}
UNAVAILABLE = "SELECT raise_code('57P03')"  # an outage's error: retried, charged to the budget


def unavailable(session: Session) -> None:
    session.execute(sa.text(UNAVAILABLE))


def budget_entry(service: str) -> dict[str, Any]:
    entry: dict[str, Any] = rdb.health()["services"][service]["budget"]
    return entry


def fleet_spent(redis: RedisServer, service: str) -> int:
    """The retries the fleet's budget counts as spent (its ``w<second>`` fields)."""
    fields = redis.client().hgetall(f"resilient_db:{{{service}}}:budget")
    return sum(int(v) for k, v in fields.items() if k.startswith(b"w"))


def assert_given_back(service: str) -> None:
    entry = budget_entry(service)
    assert entry["first_attempts"] == 1  # the unit that started
    assert entry["retries"] == 0
    assert entry["granted"] == 0
    budget = budgets()[service]
    assert budget.withdraw() is not None  # its one retry, there again
    assert budget.withdraw() is None


# -- the arithmetic ------------------------------------------------------------------------------
def test_a_ratio_paid_retry_given_back_is_no_longer_spent() -> None:
    budget = LocalBudget(ratio=1.0, floor=0, now=100.0, first_attempts=0)
    budget.observe(2, 100.1)
    assert budget.try_withdraw(100.2) == "ratio"
    assert budget.try_withdraw(101.3) == "ratio"
    assert budget.try_withdraw(101.4) is None
    budget.refund("ratio", 100.2, 101.5)  # the one spent in second 100
    assert budget.totals(101.5) == (2.0, 1)
    assert budget.try_withdraw(101.6) == "ratio"
    budget.refund("ratio", 100.2, 101.7)  # second 100 holds none now: nothing to give back
    assert budget.totals(101.7) == (2.0, 2)


def test_first_attempts_seen_late_are_spread_over_the_time_since_the_last_look() -> None:
    """First attempts counted at one look are spread evenly from the look before (a second
    or less: all in the last second); those of seconds past the window are left out, and a
    look that saw nothing new moves the start of the next spread."""
    budget = LocalBudget(ratio=1.0, floor=0, now=100.0, first_attempts=0)
    budget.observe(10, 110.0)  # one a second: second 100's is past the window of 101..110
    assert budget.totals(110.0) == (9.0, 0)
    budget = LocalBudget(ratio=1.0, floor=0, now=100.2, first_attempts=0)
    budget.observe(5, 100.9)
    assert budget.totals(100.9) == (5.0, 0)
    budget = LocalBudget(ratio=1.0, floor=0, now=100.5, first_attempts=0)
    budget.observe(3, 102.0)  # two a second: one in second 100, two in 101
    assert (budget.totals(102.0), budget.totals(110.9), budget.totals(111.0)) == (
        (3.0, 0),
        (2.0, 0),
        (0, 0),
    )
    budget = LocalBudget(ratio=1.0, floor=0, now=100.0, first_attempts=0)
    budget.observe(0, 105.0)  # nothing new: the next ones were made after this look
    budget.observe(10, 106.0)
    assert budget.totals(112.0) == (10.0, 0)  # all in second 106, still in the window


def test_a_refund_after_the_window_gives_nothing_back() -> None:
    budget = LocalBudget(ratio=1.0, floor=0, now=0.0, first_attempts=0)
    budget.observe(1, 0.1)
    assert budget.try_withdraw(0.2) == "ratio"
    budget.refund("ratio", 0.2, 30.0)  # long gone from the window
    assert budget.totals(30.0) == (0.0, 0)


def test_a_floor_paid_retry_goes_back_into_the_bucket_never_above_it() -> None:
    budget = LocalBudget(ratio=0.0, floor=2, now=0.0)
    assert budget.try_withdraw(0.0) == "floor"
    assert budget.try_withdraw(0.0) == "floor"
    assert budget.try_withdraw(0.0) is None
    budget.refund("floor", 0.0, 0.0)
    assert budget.floor_tokens(0.0) == 1.0
    budget.refund("floor", 0.0, 0.0)
    budget.refund("floor", 0.0, 0.0)  # (more than was taken: the bucket stays one second's)
    assert budget.floor_tokens(0.0) == 2.0


# -- units of work -------------------------------------------------------------------------------
def test_a_retry_the_breaker_refuses_gives_its_budget_back(engine: sa.Engine, service: str) -> None:
    spent_while_backing_off: list[int] = []

    def opened_meanwhile(seconds: float) -> None:  # as other units' failures would open it
        spent_while_backing_off.append(budget_entry(service)["retries"])
        breakers()[service].open()

    Factory = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(**SETTINGS), sleep=opened_meanwhile
    )
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(unavailable)
    assert spent_while_backing_off == [1]  # the budget paid for the retry when it was decided
    assert rdb.health()["services"][service]["counters"]["retries"] == 0
    assert_given_back(service)


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")  # (installs raise_code in the test's database)
async def test_an_async_retry_the_breaker_refuses_gives_its_budget_back(
    pg_async_url: str, service: str
) -> None:
    spent_while_backing_off: list[int] = []

    async def opened_meanwhile(seconds: float) -> None:
        spent_while_backing_off.append(budget_entry(service)["retries"])
        breakers()[service].open()

    async_engine: AsyncEngine = create_async_engine(pg_async_url)
    try:
        Factory = rdb.AsyncResilientSession(
            async_engine, service=service, config=rdb.Config(**SETTINGS), asleep=opened_meanwhile
        )

        async def unit(session: AsyncSession) -> None:
            await session.execute(sa.text(UNAVAILABLE))

        with pytest.raises(rdb.CircuitOpenError):
            await Factory.run(unit)
    finally:
        await async_engine.dispose()
    assert spent_while_backing_off == [1]
    assert_given_back(service)


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")
async def test_a_unit_cancelled_during_its_backoff_gives_its_budget_back(
    pg_async_url: str, service: str
) -> None:
    backing_off = asyncio.Event()

    async def never_ends(seconds: float) -> None:  # the backoff, until the task is cancelled
        backing_off.set()
        await asyncio.Event().wait()

    async_engine: AsyncEngine = create_async_engine(pg_async_url)
    try:
        Factory = rdb.AsyncResilientSession(
            async_engine, service=service, config=rdb.Config(**SETTINGS), asleep=never_ends
        )
        runs = {"n": 0}

        async def unit(session: AsyncSession) -> None:
            runs["n"] += 1
            await session.execute(sa.text(UNAVAILABLE))

        task = asyncio.create_task(Factory.run(unit))
        await backing_off.wait()
        assert budget_entry(service)["retries"] == 1  # paid for, its backoff begun
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await async_engine.dispose()
    assert runs["n"] == 1  # the retry never ran
    assert_given_back(service)


def test_a_unit_interrupted_during_its_backoff_gives_its_budget_back(
    engine: sa.Engine, service: str
) -> None:
    def interrupted(seconds: float) -> None:  # Ctrl-C while the unit backs off
        assert budget_entry(service)["retries"] == 1  # paid for, its backoff begun
        raise KeyboardInterrupt

    Factory = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(**SETTINGS), sleep=interrupted
    )
    runs = {"n": 0}

    def unit(session: Session) -> None:
        runs["n"] += 1
        unavailable(session)

    with pytest.raises(KeyboardInterrupt):
        Factory.run(unit)
    assert runs["n"] == 1
    assert_given_back(service)


def test_a_retry_that_runs_keeps_its_budget_spent(engine: sa.Engine, service: str) -> None:
    Factory = rdb.ResilientSession(engine, service=service, config=rdb.Config(**SETTINGS))
    runs = {"n": 0}

    def once_unavailable(session: Session) -> int:
        runs["n"] += 1
        if runs["n"] == 1:
            unavailable(session)
        return runs["n"]

    assert Factory.run(once_unavailable) == 2
    entry = budget_entry(service)
    assert (entry["retries"], entry["granted"]) == (1, 1)


# -- the fleet's budget --------------------------------------------------------------------------
@pytest.fixture
def shared(redis_server: RedisServer) -> dict[str, Any]:
    return {**SETTINGS, "redis_url": redis_server.url}


def test_a_refused_retry_gives_the_fleets_budget_back(
    engine: sa.Engine, service: str, redis_server: RedisServer, shared: dict[str, Any]
) -> None:
    spent_in_redis: list[int] = []

    def opened_meanwhile(seconds: float) -> None:  # by other processes' failures, say
        spent_in_redis.append(fleet_spent(redis_server, service))
        breakers()[service].open()

    Factory = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(**shared), sleep=opened_meanwhile
    )
    wait_for(lambda: budget_entry(service)["scope"] == "fleet", "the budget to be shared")
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(unavailable)
    assert spent_in_redis == [1]  # the fleet paid for the retry when it was decided
    assert fleet_spent(redis_server, service) == 0  # and got it back
    assert budget_entry(service)["scope"] == "fleet"
    assert_given_back(service)  # the fleet's word: one retry for its one first attempt
    assert fleet_spent(redis_server, service) == 1


def test_redis_failing_during_the_refund_gives_it_back_here_and_raises_nothing_new(
    engine: sa.Engine, service: str, redis_server: RedisServer, shared: dict[str, Any]
) -> None:
    def opened_then_redis_gone(seconds: float) -> None:
        breakers()[service].open()
        redis_server.kill()

    Factory = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(**shared), sleep=opened_then_redis_gone
    )
    wait_for(lambda: budget_entry(service)["scope"] == "fleet", "the budget to be shared")
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(unavailable)
    wait_for(lambda: budget_entry(service)["scope"] == "process", "the link to be down")
    assert_given_back(service)  # this process's own figures, which it now decides on


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")
async def test_an_async_refund_to_a_hanging_redis_does_not_hold_the_event_loop(
    pg_async_url: str, service: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The fleet paid for an async unit's retry; the breaker opened while it backed off, and
    Redis hangs as the retry is refused: the refund (a script) was sent from the event loop,
    which held every task until the Redis timeout (docs/many-processes.md: a slow Redis holds the
    failing unit, never the event loop's other tasks), and the link went down. Only a callback of
    the loop lets Redis go on here."""
    loop = asyncio.get_running_loop()

    async def opened_meanwhile(seconds: float) -> None:
        await asyncio.to_thread(breakers()[service].open)  # (other processes' failures, say)
        redis_server.pause()
        loop.call_later(0.2, redis_server.resume)  # (runs only if the loop does)

    async_engine: AsyncEngine = create_async_engine(pg_async_url)
    config = rdb.Config(**SETTINGS, redis_url=redis_server.url, redis_timeout=3.0)
    try:
        Factory = rdb.AsyncResilientSession(
            async_engine, service=service, config=config, asleep=opened_meanwhile
        )
        wait_for(lambda: budget_entry(service)["scope"] == "fleet", "the budget to be shared")

        async def unit(session: AsyncSession) -> None:
            await session.execute(sa.text(UNAVAILABLE))

        caplog.set_level("WARNING", logger="resilient_db")
        with pytest.raises(rdb.CircuitOpenError):
            await Factory.run(unit)
    finally:
        redis_server.resume()
        await async_engine.dispose()
    assert budget_entry(service)["scope"] == "fleet"
    assert "Shared state unavailable" not in caplog.text
    assert fleet_spent(redis_server, service) == 0  # given back


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")
async def test_an_async_unit_cancelled_while_the_fleet_pays_for_its_retry_gets_it_back(
    pg_async_url: str, service: str, redis_server: RedisServer
) -> None:
    """An async unit's retry is decided in a worker thread (the fleet's budget pays: a script),
    and the unit is cancelled while Redis is slow to answer. The cancel was raised at once, with
    nothing paid yet to give back; the thread went on, and the fleet's budget paid for a retry
    that never ran, kept spent."""
    async_engine: AsyncEngine = create_async_engine(pg_async_url)
    config = rdb.Config(
        **{**SETTINGS, "circuit_breaker": False}, redis_url=redis_server.url, redis_timeout=5.0
    )
    loop = asyncio.get_running_loop()
    try:
        Factory = rdb.AsyncResilientSession(async_engine, service=service, config=config)
        wait_for(lambda: budget_entry(service)["scope"] == "fleet", "the budget to be shared")

        async def unit(session: AsyncSession) -> None:
            redis_server.pause()  # the retry's withdrawal waits for Redis
            await session.execute(sa.text(UNAVAILABLE))

        try:
            with ScriptsSent(budgets()[service]._fleet) as scripts:
                task = asyncio.create_task(Factory.run(unit))
                # its retry's withdrawal sent from its worker thread, waiting for Redis
                await wait_for_async(lambda: scripts.count("budget") == 1, "the withdrawal", 10)
                assert not task.done()
                task.cancel()
                loop.call_later(0.2, redis_server.resume)  # slow, not hung
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            redis_server.resume()
        await loop.shutdown_default_executor()  # (every worker thread's call ended)
    finally:
        await async_engine.dispose()
    assert fleet_spent(redis_server, service) == 0  # given back
    assert budget_entry(service)["retries"] == 0
