"""What depends on the event loop, on asyncio's own and on uvloop's (which ``uvicorn[standard]``
installs and uvicorn, gunicorn's uvicorn workers too, then run on by default): the checkout
probe's poll of the socket uvloop gives as a pseudo socket, a killed backend's error as each
loop raises it (replayed), a cancelled unit, the prune's task, a refused connect. Each runs on
a loop of its own (``loops.run_on``); uvloop's skip where it is not installed.
``RESILIENT_DB_TEST_LOOP=uvloop`` runs any other test file on uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import pytest
import sqlalchemy as sa
from loops import LOOPS, loop_kind, run_on
from processes import wait_for, wait_for_async
from scenarios import ASYNC_DRIVERS
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db import _unit
from resilient_db._internals import asyncpg_socket_fd
from resilient_db.testing import PostgresServer, free_port

pytestmark = [pytest.mark.usefixtures("no_backoff"), pytest.mark.parametrize("loop", LOOPS)]


async def backend_pid(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


def test_the_checkout_probe_polls_the_connections_own_socket(
    pg_server: PostgresServer, pg_database: str, service: str, loop: str, caplog: Any
) -> None:
    """uvloop's transport gives a pseudo socket: its descriptor is the connection's own (its
    peer is the server), and the probe bound to it sees a backend terminated while the loop
    was blocked (asyncpg has read nothing yet), so the next unit gets a new connection."""

    async def main() -> tuple[str, int, bool, bool, int, int]:
        engine = create_async_engine(
            pg_server.url(pg_database, driver="asyncpg"), pool_size=1, max_overflow=0
        )
        Sessions = rdb.AsyncResilientSession(engine, service=service)
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                fd = asyncpg_socket_fd(driver)
                assert fd is not None
                assert fd >= 0
                with socket.socket(fileno=os.dup(fd)) as sock:
                    peer = int(sock.getpeername()[1])
                probe = _unit.dead_probe(raw.dbapi_connection, {})
                alive = probe()
                pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")  # (blocking)
            wait_for(probe, "the terminated backend's socket to poll readable")
            unnoticed = not driver.is_closed()  # seen by the poll, not by asyncpg
            with caplog.at_level(logging.INFO, logger="resilient_db"):
                new_pid = await Sessions.run(backend_pid)
            return loop_kind(), peer, alive, unnoticed, int(pid), new_pid
        finally:
            await engine.dispose()

    kind, peer, alive, unnoticed, pid, new_pid = run_on(loop, main())
    assert kind == loop
    assert peer == pg_server.port
    assert alive is False
    assert unnoticed
    assert new_pid != pid
    assert "[SELF-HEAL] Discarded a dead pooled connection" in caplog.text


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_a_unit_whose_backend_is_killed_mid_unit_is_replayed(
    pg_server: PostgresServer, pg_database: str, service: str, loop: str, driver: str
) -> None:
    """The lost connection as the loop reports it (uvloop's errors are its own, raised from
    its Cython code) is a disconnect: the unit is replayed, once."""

    async def main() -> tuple[str, list[int]]:
        engine = create_async_engine(pg_server.url(pg_database, driver=driver))
        Sessions = rdb.AsyncResilientSession(engine, service=service)
        pids: list[int] = []

        async def unit(session: AsyncSession) -> int:
            pids.append(await backend_pid(session))
            if len(pids) == 1:
                pg_server.execute(f"SELECT pg_terminate_backend({pids[0]})")
            await session.execute(sa.text("SELECT 1"))
            return len(pids)

        try:
            assert await Sessions.run(unit) == 2
            return loop_kind(), pids
        finally:
            await engine.dispose()

    kind, pids = run_on(loop, main())
    assert kind == loop
    assert pids[0] != pids[1]
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries"] == 1
    assert counters["recovered"] == 1


def test_a_unit_cancelled_mid_statement_is_not_retried_and_returns_its_connection(
    pg_server: PostgresServer, pg_database: str, service: str, loop: str
) -> None:
    """A cancellation (a request's deadline) while the unit waits on the server: raised, never
    retried, the statement cancelled on the server, the connection back in the pool."""

    def sleeping() -> bool:
        return bool(
            pg_server.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE 'SELECT pg_sleep(30)%'",
                database=pg_database,
            )[0][0]
        )

    async def main() -> tuple[str, int]:
        engine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
        Sessions = rdb.AsyncResilientSession(engine, service=service)
        attempts = 0

        async def unit(session: AsyncSession) -> None:
            nonlocal attempts
            attempts += 1
            await session.execute(sa.text("SELECT pg_sleep(30)"))

        try:
            task = asyncio.get_running_loop().create_task(Sessions.run(unit))
            await wait_for_async(sleeping, "the unit's statement running on the server")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_for_async(lambda: not sleeping(), "the statement cancelled")
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            return loop_kind(), attempts
        finally:
            await engine.dispose()

    kind, attempts = run_on(loop, main())
    assert kind == loop
    assert attempts == 1
    assert rdb.health()["services"][service]["counters"]["retries"] == 0


def test_a_refused_connect_is_a_disconnect_retried_then_raised(
    service: str, loop: str, events: list[rdb.SelfHealEvent]
) -> None:
    """Nothing listens: the connect's error, as the loop raises it (uvloop's names no address),
    is retried as an outage, then raised as it is."""

    async def main() -> tuple[str, BaseException]:
        engine = create_async_engine(f"postgresql+asyncpg://app@127.0.0.1:{free_port()}/app")
        Sessions = rdb.AsyncResilientSession(
            engine, service=service, config=rdb.Config(max_retries=1)
        )
        try:
            with pytest.raises(ConnectionRefusedError) as raised:
                await Sessions.run(backend_pid)
            return loop_kind(), raised.value
        finally:
            await engine.dispose()

    kind, error = run_on(loop, main())
    assert kind == loop
    assert rdb.is_transient(error)
    assert [e.name for e in events if e.name in ("retry", "gave_up")] == ["retry", "gave_up"]
