"""Two SQLSTATEs whose verdict the code alone got wrong, met for real on the test server.

- 08P01 (protocol_violation) is PostgreSQL's ERROR for a message it could not read, on a
  connection that stays sound: a statement whose text holds a NUL byte, sent by asyncpg (psycopg
  cuts the text there). The same statement meets it again. Before, every class 08 code was a
  lost connection: the unit was replayed, the pool replaced, and two such calls opened the
  breaker for every unit of the service. A FATAL 08P01 (PgBouncer's refusals; PostgreSQL's
  answer to a message out of step, made here by writing one on the connection's socket) ends
  the connection: still a disconnect, replayed.
- 57P05 (idle_session_timeout, PostgreSQL 14+): the server ended a pooled connection that sat
  idle outside a transaction. Through SQLAlchemy it was a disconnect (SQLAlchemy saw the
  connection broken); met on the driver's own connection (a unit that uses it directly) it was
  not transient, and the unit failed instead of running again on a new connection.

Real server, real drivers (psycopg, its async connection, asyncpg), loopback; backoff zeroed.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import (
    ASYNC_DRIVERS,
    ASYNCPG_KEEPS_FATAL_CODES,
    PSYCOPG_KEEPS_FATAL_CODES,
    assert_breaker_untouched,
    fatal_code,
    server_settings_args,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

#: a breaker that two counted failures open: one retried unit would open it
CONFIG = rdb.Config(failure_threshold=2, reset_timeout=60.0)
PID = sa.text("SELECT pg_backend_pid()")
#: a statement whose text holds a NUL byte (a value pasted into the SQL, not bound)
NUL_TEXT = sa.text("SELECT 'a\x00b'")
#: a message of a type the server does not know: it answers FATAL 08P01 and closes
BAD_MESSAGE = b"\x01\x00\x00\x00\x04"
#: the server ends a session idle this long (ms) outside a transaction: longer than a
#: connection's own set-up may sit idle between its round trips on a loaded machine (at 200 ms
#: a connection made under load was ended before the unit's first statement, and its retry too)
IDLE_MS = 1000


def _counters(service: str) -> dict[str, Any]:
    return dict(rdb.health()["services"][service]["counters"])


def _gone(server: PostgresServer, pid: int) -> bool:
    return not server.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", params=(pid,))


def _send_bad_message(fileno: int) -> None:
    """Write a message the server can't read on the connection's own socket (a duplicate of
    its descriptor: the driver keeps its own)."""
    with socket.socket(fileno=os.dup(fileno)) as sock:
        sock.sendall(BAD_MESSAGE)


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


# -- 08P01 answered on a sound connection: the unit's own error --------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("async_driver", ["asyncpg"])
async def test_a_statement_the_server_cannot_read_raises_after_one_attempt(
    aengine: AsyncEngine, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    async with aengine.connect() as conn:
        pid = (await conn.execute(PID)).scalar_one()
    calls: list[int] = []

    async def unit(session: AsyncSession) -> object:
        calls.append(1)
        return (await session.execute(NUL_TEXT)).scalar_one()

    for n in (1, 2, 3):
        with pytest.raises(sa_exc.DBAPIError) as info:
            await Sessions.run(unit)
        assert rdb.sqlstate_of(info.value) == "08P01"  # the server's own protocol_violation
        assert not info.value.connection_invalidated
        assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
        assert len(calls) == n  # one attempt each
    assert_breaker_untouched(service)
    assert _counters(service)["pool_invalidations"] == 0
    async with aengine.connect() as conn:
        assert (await conn.execute(PID)).scalar_one() == pid  # the pooled connection was kept


def test_a_statement_the_server_cannot_read_is_not_transient_on_the_drivers_connection(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """asyncpg's connection used directly (no SQLAlchemy to say whether it was lost)."""
    import asyncpg  # noqa: PLC0415

    async def main() -> None:
        conn = await asyncpg.connect(pg_server.url(pg_database, driver=""))
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetch("SELECT 'a\x00b'")
            assert rdb.sqlstate_of(info.value) == "08P01"
            assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
            assert not rdb.is_transient(info.value)
            assert await conn.fetchval("SELECT 1") == 1  # sound
        finally:
            await conn.close()

    asyncio.run(main())


# -- 08P01 that ends the connection: still a disconnect ----------------------------------------
@pytest.mark.parametrize("direct", [False, True], ids=["sqlalchemy", "drivers-connection"])
def test_a_fatal_protocol_violation_is_a_lost_connection(
    engine: sa.Engine, pg_server: PostgresServer, service: str, direct: bool
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    seen: list[BaseException] = []

    def unit(session: Session) -> int:
        driver = session.connection().connection.driver_connection
        if not seen:
            pid = int(driver.execute("SELECT pg_backend_pid()").fetchone()[0])
            _send_bad_message(driver.pgconn.socket)
            wait_for(lambda: _gone(pg_server, pid), "the server to end the session")
            try:
                if direct:
                    driver.execute("SELECT 1")
                else:
                    session.execute(sa.text("SELECT 1"))
            except Exception as exc:
                seen.append(exc)
                raise
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    assert Sessions.run(unit) == 1
    assert len(seen) == 1
    assert rdb.sqlstate_of(seen[0]) == fatal_code("08P01")
    assert rdb.classify(seen[0]) is rdb.Outcome.DISCONNECT
    assert _counters(service)["retries_by_class"] == {"disconnect": 1}


# -- 57P05: a connection the server ended for sitting idle -------------------------------------
# (a pooled connection found ended at checkout is replaced before the unit sees it: here the
# unit idles, outside a transaction, between its checkout and its first statement, as a unit
# that calls another service first does)
@pytest.mark.parametrize("direct", [False, True], ids=["sqlalchemy", "drivers-connection"])
def test_a_connection_ended_for_idling_is_replaced_and_the_unit_runs_again(
    pg_url: str, pg_server: PostgresServer, service: str, direct: bool
) -> None:
    args = server_settings_args("psycopg", idle_session_timeout=str(IDLE_MS))
    engine = sa.create_engine(pg_url, connect_args=args)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    seen: list[BaseException] = []

    def unit(session: Session) -> int:
        driver = session.connection().connection.driver_connection
        try:
            if not seen:
                pid = driver.info.backend_pid  # (asks the server nothing)
                wait_for(lambda: _gone(pg_server, pid), "the server to end the idle session")
            if direct:
                return int(driver.execute("SELECT 1").fetchone()[0])
            return int(session.execute(sa.text("SELECT 1")).scalar_one())
        except Exception as exc:
            seen.append(exc)
            raise

    try:
        assert Sessions.run(unit) == 1
    finally:
        engine.dispose()
    assert len(seen) == 1
    assert rdb.sqlstate_of(seen[0]) == fatal_code("57P05")
    assert rdb.classify(seen[0]) is rdb.Outcome.DISCONNECT
    assert _counters(service)["retries_by_class"] == {"disconnect": 1}


def test_a_connection_ended_for_idling_leaves_the_pools_other_connections(
    pg_url: str, pg_server: PostgresServer, service: str
) -> None:
    """57P05 ends the one session that sat idle, not the server: the pool's other connections
    are sound (one busy in a transaction meanwhile, here). They were all replaced, as after a
    server that went away (the ``Replacing the pooled connections`` line, counted in
    ``pool_invalidations``); only the ended one is now. (Others that sat idle as long are
    ended too, and each is replaced at its checkout: the checkout's probe sees it closed.)"""
    args = server_settings_args("psycopg", idle_session_timeout=str(IDLE_MS))
    engine = sa.create_engine(pg_url, connect_args=args, pool_size=2)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    seen: list[BaseException] = []

    def unit(session: Session) -> int:
        driver = session.connection().connection.driver_connection
        try:
            if not seen:
                pid = driver.info.backend_pid
                wait_for(lambda: _gone(pg_server, pid), "the server to end the idle session")
            return int(session.execute(sa.text("SELECT 1")).scalar_one())
        except Exception as exc:
            seen.append(exc)
            raise

    try:
        with engine.connect() as busy:  # in a transaction all along: never idle
            busy_pid = busy.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            assert Sessions.run(unit) == 1
        # the busy one, back in the pool, is handed out again (not replaced)
        with engine.connect() as one, engine.connect() as two:
            pids = {c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() for c in (one, two)}
    finally:
        engine.dispose()
    assert [rdb.sqlstate_of(e) for e in seen] == [fatal_code("57P05")]
    counters = _counters(service)
    assert counters["retries_by_class"] == {"disconnect": 1}
    assert counters["pool_invalidations"] == 0
    # (before psycopg 3.2.4 the error carries no SQLSTATE, only a lost connection: nothing
    # tells it from a server that went away, whose lost connections SQLAlchemy replaces all)
    assert (busy_pid in pids) is PSYCOPG_KEEPS_FATAL_CODES


@pytest.mark.asyncio
@pytest.mark.parametrize("async_driver", ["psycopg"])
async def test_async_a_connection_ended_for_idling_is_replaced_and_the_unit_runs_again(
    pg_async_url: str, pg_server: PostgresServer, service: str, async_driver: str
) -> None:
    """psycopg's AsyncConnection used directly: its error carries 57P05 (asyncpg reports no
    code for a session that ended while idle: a closed connection, a disconnect already)."""
    args = server_settings_args(async_driver, idle_session_timeout=str(IDLE_MS))
    engine = create_async_engine(pg_async_url, connect_args=args)
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    seen: list[BaseException] = []

    async def unit(session: AsyncSession) -> int:
        conn = await session.connection()
        driver = (await conn.get_raw_connection()).driver_connection
        try:
            if not seen:
                pid = driver.info.backend_pid
                wait_for(lambda: _gone(pg_server, pid), "the server to end the idle session")
            cursor = await driver.execute("SELECT 1")
            return int((await cursor.fetchone())[0])
        except Exception as exc:
            seen.append(exc)
            raise

    try:
        assert await Sessions.run(unit) == 1
    finally:
        await engine.dispose()
    assert len(seen) == 1
    assert rdb.sqlstate_of(seen[0]) == fatal_code("57P05")
    assert rdb.classify(seen[0]) is rdb.Outcome.DISCONNECT
    assert _counters(service)["retries_by_class"] == {"disconnect": 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("async_driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("ended", ["in the pool", "in the unit"])
async def test_async_a_connection_ended_for_idling_leaves_the_pools_other_connections(
    pg_async_url: str, pg_server: PostgresServer, service: str, *, async_driver: str, ended: str
) -> None:
    """The async twin through SQLAlchemy, asyncpg included (57P05 the cause of its closed
    connection, on 0.32+). Ended in the pool: found dead at checkout and replaced, the unit
    runs once. Ended in the unit (between its checkout and its first statement): one retry.
    Either way the pool's other connection (busy in a transaction meanwhile: never idle) is
    kept."""
    args = server_settings_args(async_driver, idle_session_timeout=str(IDLE_MS))
    engine = create_async_engine(pg_async_url, connect_args=args, pool_size=2)
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    seen: list[BaseException] = []
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        conn = await session.connection()
        driver = (await conn.get_raw_connection()).driver_connection
        pid = driver.get_server_pid() if async_driver == "asyncpg" else driver.info.backend_pid
        try:
            if ended == "in the unit" and not seen:
                wait_for(lambda: _gone(pg_server, pid), "the server to end the idle session")
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())
        except Exception as exc:
            seen.append(exc)
            raise

    try:
        async with engine.connect() as busy:
            await busy.begin()
            busy_pid = (await busy.execute(PID)).scalar_one()
            if ended == "in the pool":
                async with engine.connect() as idle:  # (the pool's other one, idle from now)
                    idle_pid = (await idle.execute(PID)).scalar_one()
                wait_for(lambda: _gone(pg_server, idle_pid), "the server to end the idle session")
            assert await Sessions.run(unit) == 1
            await busy.rollback()
        async with engine.connect() as one, engine.connect() as two:
            pids = {(await c.execute(PID)).scalar_one() for c in (one, two)}
    finally:
        await engine.dispose()
    counters = _counters(service)
    if ended == "in the pool":
        assert (calls, seen) == ([1], [])
        assert counters["dead_pooled_connections"] == 1
    else:
        assert len(calls) == 2
        assert [rdb.classify(e) for e in seen] == [rdb.Outcome.DISCONNECT]
        assert counters["retries_by_class"] == {"disconnect": 1}
    assert counters["pool_invalidations"] == 0
    # (met by a statement, before psycopg 3.2.4 and asyncpg 0.32 the error carries no code:
    # a lost connection, whose pool SQLAlchemy replaces)
    told = ASYNCPG_KEEPS_FATAL_CODES if async_driver == "asyncpg" else PSYCOPG_KEEPS_FATAL_CODES
    assert (busy_pid in pids) is (told or ended == "in the pool")
