"""Timeouts through the real drivers: a statement that runs too long is the application's
problem (not replayed, not an outage for the breaker), a connect that times out is an outage.

asyncpg's ``command_timeout`` raises ``TimeoutError`` (an ``OSError``) from the driver's own
code, the client-side twin of psycopg's server-side ``statement_timeout`` (SQLSTATE 57014).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("no_backoff")]

#: how each async driver is told to stop a statement after 200 ms, and to give up a connect
STATEMENT_TIMEOUT: dict[str, dict[str, Any]] = {
    "asyncpg": {"command_timeout": 0.2},
    "psycopg": {"options": "-c statement_timeout=200"},
}
CONNECT_TIMEOUT: dict[str, dict[str, Any]] = {
    "asyncpg": {"timeout": 0.3},
    "psycopg": {"connect_timeout": 1},
}


@pytest.fixture(params=["asyncpg", "psycopg"])
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def engines() -> AsyncIterator[list[AsyncEngine]]:
    made: list[AsyncEngine] = []
    yield made
    for engine in made:
        await engine.dispose()


def _counters(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return found


async def test_a_statement_timeout_is_not_replayed_nor_an_outage(
    pg_server: PostgresServer,
    pg_database: str,
    async_driver: str,
    engines: list[AsyncEngine],
    service: str,
) -> None:
    url = pg_server.url(pg_database, driver=async_driver)
    engine = create_async_engine(url, connect_args=STATEMENT_TIMEOUT[async_driver])
    engines.append(engine)
    Session = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=1)
    )
    calls = 0

    async def slow(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(sa.text("SELECT pg_sleep(2)"))

    with pytest.raises(Exception) as info:  # noqa: PT011 (TimeoutError or 57014, by driver)
        await Session.run(slow)
    assert not rdb.is_transient(info.value)
    assert calls == 1
    counters = _counters(service)
    assert (counters["attempts"], counters["retries"], counters["breaker_opens"]) == (1, 0, 0)
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"

    async def quick(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 42"))).scalar_one())

    assert await Session.run(quick) == 42  # the connection (or its replacement) still serves


async def test_a_connect_that_times_out_is_an_outage(
    pg_database: str,
    fault_proxy: FaultProxy,
    async_driver: str,
    engines: list[AsyncEngine],
    service: str,
) -> None:
    url = fault_proxy.url(pg_database, driver=async_driver)
    engine = create_async_engine(url, connect_args=CONNECT_TIMEOUT[async_driver])
    engines.append(engine)
    Session = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(max_retries=1, failure_threshold=10)
    )
    fault_proxy.blackhole()

    async def one(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    with pytest.raises(Exception) as info:  # noqa: PT011 (TimeoutError or OperationalError)
        await Session.run(one)
    assert rdb.is_transient(info.value)
    assert _counters(service)["retries"] == 1
