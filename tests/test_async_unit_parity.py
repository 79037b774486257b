"""Async units do what their sync twins do, on both async drivers, against a real PostgreSQL:

* a session class given as ``class_=`` is used as it is: a unit calls its own ``flush``,
  ``commit``, ``rollback`` and ``close``, in the order the sync twin calls its session
  class's, and still commits once (through the commit protocol: replayed after a conflict at
  COMMIT, verified after a lost COMMIT answer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, Base, Item
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import AsyncResilientSession

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("no_backoff")]


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    """Every test runs on both async drivers."""
    return str(request.param)


@pytest_asyncio.fixture
async def async_engine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    async with eng.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield eng
    await eng.dispose()


async def count_items(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as conn:
        q = sa.select(sa.func.count()).select_from(Item).where(Item.name == name)
        return int((await conn.execute(q)).scalar_one())


def counters(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return found


# -- a session class's own flush, commit and close ------------------------------------------------
def recording(calls: list[str]) -> tuple[type[Session], type[AsyncSession]]:
    """A sync and an async session class whose overrides record their calls in ``calls``."""

    class RecordingSession(Session):
        def flush(self, objects: Any = None) -> None:
            calls.append("flush")
            super().flush(objects)

        def commit(self) -> None:
            calls.append("commit")
            super().commit()

        def rollback(self) -> None:
            calls.append("rollback")
            super().rollback()

        def close(self) -> None:
            calls.append("close")
            super().close()

    class RecordingAsyncSession(AsyncSession):
        async def flush(self, objects: Any = None) -> None:
            calls.append("flush")
            await super().flush(objects)

        async def commit(self) -> None:
            calls.append("commit")
            await super().commit()

        async def rollback(self) -> None:
            calls.append("rollback")
            await super().rollback()

        async def close(self) -> None:
            calls.append("close")
            await super().close()

    return RecordingSession, RecordingAsyncSession


def run_both(
    engine: sa.Engine,
    async_engine: AsyncEngine,
    service: str,
    **kwargs: Any,
) -> tuple[list[str], rdb.ResilientSession[Any], AsyncResilientSession[Any], list[str]]:
    """(the sync calls, the sync factory, the async factory, the async calls), each factory of
    the recording classes."""
    sync_calls: list[str] = []
    async_calls: list[str] = []
    sync_class, _ = recording(sync_calls)
    _, async_class = recording(async_calls)
    sync = rdb.ResilientSession(engine, service=f"{service}-sync", class_=sync_class, **kwargs)
    asyn = AsyncResilientSession(async_engine, service=service, class_=async_class, **kwargs)
    return sync_calls, sync, asyn, async_calls


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("outcome", ["commits", "raises"])
async def test_a_unit_calls_its_session_classs_own_methods_as_the_sync_twin_does(
    engine: sa.Engine, async_engine: AsyncEngine, service: str, outcome: str, enabled: bool
) -> None:
    """With self-healing on (the commit protocol) and off (plain SQLAlchemy code): the
    overrides of ``class_=`` run, in the sync twin's order, and the unit commits once."""
    sync_calls, Sync, Async, async_calls = run_both(
        engine, async_engine, service, config=rdb.Config(enabled=enabled)
    )

    def sync_unit(session: Session) -> str:
        session.add(Item(name="sync"))
        if outcome == "raises":
            raise ValueError("the unit's own error")
        return "done"

    async def async_unit(session: AsyncSession) -> str:
        session.add(Item(name="async"))
        if outcome == "raises":
            raise ValueError("the unit's own error")
        return "done"

    if outcome == "commits":
        assert Sync.run(sync_unit) == "done"
        assert await Async.run(async_unit) == "done"
        assert sync_calls == async_calls == ["flush", "commit", "close"]
    else:
        with pytest.raises(ValueError, match="own error"):
            Sync.run(sync_unit)
        with pytest.raises(ValueError, match="own error"):
            await Async.run(async_unit)
        assert sync_calls == async_calls == ["rollback", "close"]
    expected = 1 if outcome == "commits" else 0
    assert await count_items(async_engine, "sync") == expected
    assert await count_items(async_engine, "async") == expected


async def test_a_conflict_at_commit_is_replayed_through_the_session_classs_own_methods(
    engine: sa.Engine, async_engine: AsyncEngine, service: str
) -> None:
    """A serialization failure (40001) raised at COMMIT by a deferred constraint trigger, on
    the first COMMIT only (a sequence is not rolled back): the unit is rolled back and
    replayed through the class's own methods, once, as the sync twin is."""
    async with async_engine.begin() as conn:
        await conn.execute(sa.text("CREATE SEQUENCE commits_seen"))
        await conn.execute(
            sa.text(
                "CREATE FUNCTION fail_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF nextval('commits_seen') = 1 THEN RAISE EXCEPTION 'conflict at "
                "commit' USING ERRCODE = '40001'; END IF; RETURN NULL; END $$"
            )
        )
        await conn.execute(
            sa.text(
                "CREATE CONSTRAINT TRIGGER fails_once AFTER INSERT ON items DEFERRABLE "
                "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_first_commit()"
            )
        )
    sync_calls, Sync, Async, async_calls = run_both(engine, async_engine, service)
    attempts: list[str] = []

    def sync_unit(session: Session) -> None:
        attempts.append("sync")
        session.add(Item(name="sync"))

    async def async_unit(session: AsyncSession) -> None:
        attempts.append("async")
        session.add(Item(name="async"))

    Sync.run(sync_unit)
    async with async_engine.begin() as conn:
        await conn.execute(sa.text("ALTER SEQUENCE commits_seen RESTART"))
    await Async.run(async_unit)

    assert attempts == ["sync", "sync", "async", "async"]
    once = ["flush", "commit"]
    assert sync_calls == async_calls == [*once, "rollback", "close", *once, "close"]
    assert await count_items(async_engine, "sync") == 1
    assert await count_items(async_engine, "async") == 1
    assert counters(service)["retries"] == 1
    assert counters(service)["recovered"] == 1


async def test_a_lost_commit_answer_is_verified_through_the_session_classs_own_commit(
    fault_proxy: Any,
    pg_database: str,
    async_driver: str,
    async_engine: AsyncEngine,
    service: str,
) -> None:
    """The COMMIT sent by the class's own ``commit`` loses its answer: the commit protocol
    marked it, so it is verified committed, not replayed; the session is closed with the
    class's own ``close``."""
    proxied = create_async_engine(fault_proxy.url(pg_database, driver=async_driver))
    try:
        calls: list[str] = []
        _, async_class = recording(calls)
        Async = AsyncResilientSession(proxied, service=service, class_=async_class)
        attempts: list[int] = []

        async def unit(session: AsyncSession) -> str:
            attempts.append(1)
            session.add(Item(name="once"))
            return "committed"

        fault_proxy.lose_commit_answer()
        assert await Async.run(unit) == "committed"
    finally:
        await proxied.dispose()
    assert fault_proxy.commits_lost == 1
    assert attempts == [1]
    assert calls == ["flush", "commit", "close"]
    assert await count_items(async_engine, "once") == 1
    assert counters(service)["verified_commits"] == 1


async def test_an_invalid_result_is_rolled_back_through_the_session_classs_own_methods(
    engine: sa.Engine, async_engine: AsyncEngine, service: str
) -> None:
    """Response validation still runs before the COMMIT: an invalid result is rolled back
    (the class's own ``rollback`` and ``close``), nothing committed, as in the sync twin."""
    sync_calls, Sync, Async, async_calls = run_both(engine, async_engine, service)

    def sync_unit(session: Session) -> str:
        session.add(Item(name="sync"))
        return "not a number"

    async def async_unit(session: AsyncSession) -> str:
        session.add(Item(name="async"))
        return "not a number"

    with pytest.raises(rdb.ResponseValidationError):
        Sync.run(sync_unit, validate=int)
    with pytest.raises(rdb.ResponseValidationError):
        await Async.run(async_unit, validate=int)
    assert sync_calls == async_calls == ["rollback", "close"]
    assert await count_items(async_engine, "sync") == 0
    assert await count_items(async_engine, "async") == 0


async def test_a_class_that_overrides_only_close_has_it_called(
    async_engine: AsyncEngine, service: str
) -> None:
    calls: list[str] = []

    class ClosesItself(AsyncSession):
        async def close(self) -> None:
            calls.append("close")
            await super().close()

    Async = AsyncResilientSession(async_engine, service=service, class_=ClosesItself)

    async def unit(session: AsyncSession, name: str) -> None:
        session.add(Item(name=name))

    await Async.run(unit, "closed")
    await Async.run(unit, "validated", validate=lambda _: True)
    assert calls == ["close", "close"]
    assert await count_items(async_engine, "closed") == 1
    assert await count_items(async_engine, "validated") == 1
