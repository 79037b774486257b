"""Edges of the new pool a forked child's engines get (``EngineHooks.new_pool_in_child``),
tried with real forks (``os.fork``) and a real server; each child reports through a pipe.

- an ``AsyncEngine`` (asyncpg) a factory used in the parent, then ``asyncio.run`` of a unit in
  the child;
- a fork while another thread of the parent holds a checked-out connection inside a unit, and
  while another thread is inside the pool's connect (held by the fault proxy);
- a user's ``engine_disposed`` listener that raises: the child's other engines still get a new
  pool (before, the first such error ended the renewal: a later engine kept the parent's pool);
- an engine garbage-collected before the fork.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from test_fork_locks import in_child

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

PID = sa.text("SELECT pg_backend_pid()")


def backend(session: Session) -> int:
    return int(session.execute(PID).scalar_one())


async def abackend(session: AsyncSession) -> int:
    return int((await session.execute(PID)).scalar_one())


def alive(server: PostgresServer, pid: int) -> bool:
    return server.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == [(1,)]


@pytest.mark.asyncio
async def test_an_async_engine_used_in_the_parent_works_in_a_childs_asyncio_run(
    pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    engine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"), pool_size=1)
    try:
        Sessions = rdb.AsyncResilientSession(engine, service=service)
        parents = await Sessions.run(abackend)  # the pool holds the parent's connection

        def child() -> bool:
            gc.collect()
            return asyncio.run(Sessions.run(abackend)) != parents

        assert in_child(child) == b"\x00", "the child failed or used the parent's connection"
        assert await Sessions.run(abackend) == parents  # the parent's session, untouched
        assert alive(pg_server, parents)
    finally:
        await engine.dispose()


def test_a_fork_while_another_thread_holds_a_connection_in_a_unit(
    pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    engine = sa.create_engine(pg_server.url(pg_database), pool_size=1, max_overflow=0)
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        inside, go_on = threading.Event(), threading.Event()
        held: list[int] = []

        def unit(session: Session) -> int:
            held.append(backend(session))
            inside.set()
            assert go_on.wait(15)
            session.execute(sa.text("CREATE TEMP TABLE t (x int)"))  # a transaction going on
            return backend(session)

        results: list[int] = []
        thread = threading.Thread(target=lambda: results.append(Sessions.run(unit)))
        thread.start()
        assert inside.wait(15)

        def child() -> bool:
            gc.collect()
            return Sessions.run(backend) not in held

        try:
            assert in_child(child) == b"\x00", "the child failed or used the thread's connection"
        finally:
            go_on.set()
            thread.join(15)
        assert results == held  # the thread's unit went on, on its own session
        assert alive(pg_server, held[0])
    finally:
        engine.dispose()


def test_a_fork_while_another_thread_is_inside_the_pools_connect(
    pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    with FaultProxy(pg_server) as proxy:
        engine = sa.create_engine(proxy.url(pg_database), pool_size=1, max_overflow=0)
        try:
            Sessions = rdb.ResilientSession(
                engine, service=service, config=rdb.Config(deadline=30.0)
            )
            proxy.blackhole()  # a connect that hangs until restored
            before = proxy.connections_accepted
            results: list[int] = []
            thread = threading.Thread(target=lambda: results.append(Sessions.run(backend)))
            thread.start()
            for _ in range(300):  # bounded: about 15 s
                if proxy.connections_accepted > before:
                    break
                threading.Event().wait(0.05)
            assert proxy.connections_accepted > before, "the thread never connected"

            def child() -> bool:
                gc.collect()
                return isinstance(Sessions.run(backend), int)

            answer = in_child(child, parent=proxy.restore)
            thread.join(30)
            assert answer == b"\x00", "the child's unit failed or hung"
            assert len(results) == 1  # the parent's thread connected and ran its unit
            assert Sessions.run(backend) == results[0]
        finally:
            engine.dispose()


def test_a_users_engine_disposed_listener_that_raises_leaves_the_other_engines_renewed(
    pg_server: PostgresServer, pg_database: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The child's engines all get a new pool, and the listener's error is a WARNING there
    (before: an unraisable error printed by the interpreter, and the next engines' pools
    left as the parent's)."""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    url = pg_server.url(pg_database)
    first = sa.create_engine(url, pool_size=1)
    second = sa.create_engine(url, pool_size=1)

    @event.listens_for(first, "engine_disposed")
    def refuse(engine: sa.Engine) -> None:
        raise RuntimeError("the user's listener")

    try:
        One = rdb.ResilientSession(first, service=service)  # hooked first: renewed first
        Two = rdb.ResilientSession(second, service=service)
        ones, twos = One.run(backend), Two.run(backend)

        def child() -> bool:
            gc.collect()
            lines = [r.getMessage() for r in caplog.records if "listener raised" in r.getMessage()]
            return (
                One.run(backend) != ones
                and Two.run(backend) != twos
                and lines
                == [
                    f"[SELF-HEAL] A forked child gave database {pg_database} a new pool, and an "
                    "engine_disposed listener raised RuntimeError: ignored (the fork goes on)"
                ]
            )

        assert in_child(child) == b"\x00", "a child's engine kept the parent's pool"
        assert One.run(backend) == ones
        assert Two.run(backend) == twos
    finally:
        event.remove(first, "engine_disposed", refuse)
        first.dispose()
        second.dispose()


def test_an_engine_collected_before_the_fork(
    pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    url = pg_server.url(pg_database)
    gone = sa.create_engine(url, pool_size=1)
    rdb.ResilientSession(gone, service=service).run(backend)
    gone.dispose()
    del gone
    gc.collect()
    kept = sa.create_engine(url, pool_size=1)
    try:
        Sessions = rdb.ResilientSession(kept, service=service)
        parents = Sessions.run(backend)
        assert in_child(lambda: Sessions.run(backend) != parents) == b"\x00"
        assert Sessions.run(backend) == parents
    finally:
        kept.dispose()
