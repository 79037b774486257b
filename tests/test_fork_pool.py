"""A forked child gets a pool of its own for every engine resilient_db's factories hook.

gunicorn's ``--preload``, Celery's prefork pool and ``multiprocessing`` with fork make worker
processes after the parent imported the application, often after it used its engines (the
quickstart's ``create_all`` and ``install_commit_markers`` at import). SQLAlchemy leaves the
parent's pool in the child, so the child's first unit took the parent's pooled connection: one
server session shared by the parent and its children, their answers crossed (a new user's
Celery workers: wrong rows, ``ResourceClosedError``, a task reported done having read another
process's answer). The child now starts with a new pool, and the parent's session is left as it
was: never used nor ended by the child (the old pool is dropped without closing its
connections, and freeing them in the child ends no session of the parent's: checked for
psycopg 3 and psycopg2 after a garbage collection in the child).

Real forks (``os.fork``), a real server; each child reports through a pipe."""

from __future__ import annotations

import asyncio
import gc
import os

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from test_fork_locks import in_child

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def backend(session: Session) -> int:
    return int(session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_forked_child_never_uses_nor_ends_the_parents_pooled_connection(
    pg_server: PostgresServer, pg_database: str, service: str, driver: str
) -> None:
    engine = sa.create_engine(pg_server.url(pg_database, driver=driver), pool_size=1)
    try:
        Session = rdb.ResilientSession(engine, service=service)
        parents = Session.run(backend)  # the pool now holds the parent's connection

        def child() -> bool:
            gc.collect()  # (whatever the child dropped of the parent's is freed now)
            # a new session on the server: not the parent's, and it works
            return Session.run(backend) != parents

        # (the child's full collection goes through its copy of the whole process: a pytest-xdist
        # worker late in a run, on a loaded machine, took past in_child's 15 s for it, and the
        # child, still collecting, was taken for hung)
        answer = in_child(child, timeout=60)
        assert answer == b"\x00", "the child used the parent's pooled connection"
        # the parent's session was neither used nor ended by the child: the same one still
        assert Session.run(backend) == parents
        alive = pg_server.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {parents}")
        assert alive == [(1,)]
    finally:
        engine.dispose()


def test_a_forked_childs_engine_made_by_hand_is_left_to_the_user(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """An engine no factory hooked is SQLAlchemy's alone: its pool is left as it was (the
    child's ``engine.dispose(close=False)`` is the user's, as SQLAlchemy documents)."""
    engine = sa.create_engine(pg_server.url(pg_database), pool_size=1)
    try:
        with engine.connect() as conn:
            parents = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        pool = engine.pool

        def child() -> bool:
            return engine.pool is pool

        assert in_child(child) == b"\x00"
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() == parents
    finally:
        engine.dispose()


def test_a_forked_childs_async_engine_takes_its_first_connections_at_once(
    pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """The child's new pool of an async engine that never connected before the fork (what an
    application does at import, then gunicorn's ``--preload`` forks): its first connections,
    made by many tasks at once, each run the dialect's first-connect set-up under SQLAlchemy's
    once-only lock. SQLAlchemy before 2.0.25 gave a recreated pool a thread lock there
    (sqlalchemy#10813): the second task blocked the event loop's thread while the first awaited
    its connection, for good. Hence resilient_db's lower bound of 2.0.25 at least."""
    engine = create_async_engine(
        pg_server.url(pg_database, driver="asyncpg"), pool_size=20, max_overflow=0
    )
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def backend_of(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())

    def child() -> bool:
        async def main() -> set[int]:
            try:
                pids = await asyncio.gather(*(Sessions.run(backend_of) for _ in range(20)))
            finally:
                await engine.dispose()
            return set(pids)

        return len(asyncio.run(main())) > 1  # (the tasks did overlap: several connections)

    try:
        assert in_child(child, timeout=30) == b"\x00", "the child's first units hung or failed"
    finally:
        asyncio.run(engine.dispose())
