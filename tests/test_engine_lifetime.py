"""An engine a resilient factory used is freed like any other once the application drops it:
its pooled connections closed, their server backends gone. Per-tenant engines evicted from a
cache, or an engine per test, grew without limit: the engine's hooks (kept by a registry weak
on the engine) held the engine itself, and with asyncpg a pooled connection made for a unit
kept the unit's context (its attempt, and through it the session, the factory and the engine)
in the event loop, through its transport's reader."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import sqlalchemy as sa
from processes import wait_for, wait_for_async
from scenarios import ASYNC_DRIVERS
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._state import STATE
from resilient_db.testing import PostgresServer

ROUNDS = 5
#: a connection of a dropped engine is closed by the garbage collector, which the drivers
#: (rightly) warn about, as they do under plain SQLAlchemy
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True, params=[True, False], ids=["markers", "no-markers"])
def markers(pg_url: str, request: pytest.FixtureRequest) -> None:
    """With the commit markers installed, and without (the fallback's transaction-id query,
    which asyncpg caches, with a timer, during the unit's COMMIT)."""
    if request.param:
        engine = sa.create_engine(pg_url)
        rdb.install_commit_markers(engine)
        engine.dispose()


def backends(server: PostgresServer, database: str) -> frozenset[int]:
    """The pids of the database's backends (a backend of an earlier test's may still be ending
    when a test starts: it ends meanwhile, and none of the test's may be left)."""
    rows = server.execute(
        f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    )
    return frozenset(int(row[0]) for row in rows)


def writes(session: Session) -> int:
    return int(session.execute(sa.text("SELECT txid_current()")).scalar_one())


async def awrites(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT txid_current()"))).scalar_one())


@pytest.mark.parametrize("dispose", [False, True], ids=["dropped", "disposed"])
def test_a_dropped_engine_is_freed_with_its_connections(
    pg_server: PostgresServer, pg_database: str, pg_url: str, service: str, dispose: bool
) -> None:
    before = backends(pg_server, pg_database)
    hooked = len(STATE.engine_hooks)
    engines = []
    for _ in range(ROUNDS):
        engine = sa.create_engine(pg_url)
        assert rdb.ResilientSession(engine, service=service).run(writes) > 0
        if dispose:
            engine.dispose()
        engines.append(weakref.ref(engine))
        del engine
    gc.collect()
    assert [ref() for ref in engines] == [None] * ROUNDS
    assert len(STATE.engine_hooks) <= hooked  # their hooks went with them (others may too)
    wait_for(lambda: backends(pg_server, pg_database) <= before, "the backends to end")


async def _use_and_drop(
    url: str, service: str, dispose: bool
) -> tuple[weakref.ref[AsyncEngine], weakref.ref[sa.Engine]]:
    engine = create_async_engine(url)
    assert await rdb.AsyncResilientSession(engine, service=service).run(awrites) > 0
    if dispose:
        await engine.dispose()
    return weakref.ref(engine), weakref.ref(engine.sync_engine)


@pytest.mark.asyncio
@pytest.mark.parametrize("async_driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("dispose", [False, True], ids=["dropped", "disposed"])
async def test_a_dropped_async_engine_is_freed_with_its_connections(
    pg_server: PostgresServer, pg_database: str, pg_async_url: str, service: str, dispose: bool
) -> None:
    before = backends(pg_server, pg_database)
    engines = [await _use_and_drop(pg_async_url, service, dispose) for _ in range(ROUNDS)]
    await asyncio.sleep(0)  # (the last unit's session closed in a task of its own)
    gc.collect()
    assert [(a(), s()) for a, s in engines] == [(None, None)] * ROUNDS
    await wait_for_async(lambda: backends(pg_server, pg_database) <= before, "the backends to end")
