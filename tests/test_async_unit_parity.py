"""Async units do what their sync twins do, on both async drivers, against a real PostgreSQL:

* a session class given as ``class_=`` is used as it is: a unit calls its own ``flush``,
  ``commit``, ``rollback`` and ``close``, in the order the sync twin calls its session
  class's, and still commits once (through the commit protocol: replayed after a conflict at
  COMMIT, verified after a lost COMMIT answer);
* a unit of a factory started inside a unit of the same factory joins it when it runs in the
  same asyncio task (awaited directly, or under ``asyncio.timeout``), and runs in a
  transaction of its own, committed by itself and said once in a ``[SELF-HEAL]`` warning,
  when it runs in another task (``asyncio.create_task``; ``asyncio.wait_for`` before Python
  3.12).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Callable
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
    overrides of ``class_=`` run, and the unit commits once. A class that overrides
    ``commit`` does the unit's flush in it, as plain SQLAlchemy's ``commit()`` does (its
    ``before_commit`` listeners see the changes): a sync session's ``commit()`` calls its own
    ``flush``, an async session's ``commit()`` its sync session's, as under ``sessionmaker``
    and ``async_sessionmaker``."""
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
        assert sync_calls == ["commit", "flush", "close"]
        assert async_calls == ["commit", "close"]
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
    # (the flush in each class's commit, as plain SQLAlchemy's: see the first test)
    sync_once, async_once = ["commit", "flush"], ["commit"]
    assert sync_calls == [*sync_once, "rollback", "close", *sync_once, "close"]
    assert async_calls == [*async_once, "rollback", "close", *async_once, "close"]
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
    assert calls == ["commit", "close"]  # (its flush in its commit: see the first test)
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
    assert sync_calls == async_calls == ["flush", "rollback", "close"]
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


# -- a unit of the same factory in another asyncio task -------------------------------------------
def other_task_lines(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [
        r
        for r in records
        if getattr(r, "self_heal", {}).get("event") == "unit_in_other_task"
        and r.levelno == logging.WARNING
    ]


async def nested_in(
    Async: AsyncResilientSession[Any], call: Callable[[Any], Any]
) -> tuple[list[int], list[str]]:
    """Run a unit that writes the row "outer", runs two nested units of the same factory
    through ``call(coroutine)`` (each counting the "outer" rows it sees and writing a row of
    its own), then fails. Returns (what each nested unit saw, the rows left)."""
    seen: list[int] = []

    async def inner(session: AsyncSession) -> None:
        q = sa.select(sa.func.count()).select_from(Item).where(Item.name == "outer")
        seen.append(int(await session.scalar(q) or 0))
        session.add(Item(name=f"inner-{len(seen)}"))
        await session.flush()

    async def outer(session: AsyncSession) -> None:
        session.add(Item(name="outer"))
        await session.flush()
        await call(Async.run(inner))
        await call(Async.run(inner))
        raise ValueError("the outer unit fails")

    with pytest.raises(ValueError, match="outer unit fails"):
        await Async.run(outer)
    async with Async() as session:
        left = (await session.scalars(sa.select(Item.name).order_by(Item.name))).all()
    return seen, list(left)


async def awaited(coro: Any) -> Any:
    return await coro


async def under_timeout(coro: Any) -> Any:
    async with asyncio.timeout(30):  # type: ignore[attr-defined]  (Python 3.11+)
        return await coro


async def in_a_task(coro: Any) -> Any:
    return await asyncio.create_task(coro)


async def under_wait_for(coro: Any) -> Any:
    return await asyncio.wait_for(coro, 30)


JOINS = pytest.mark.parametrize(
    "call",
    [
        awaited,
        pytest.param(
            under_timeout,
            marks=pytest.mark.skipif(
                not hasattr(asyncio, "timeout"), reason="asyncio.timeout is Python 3.11+"
            ),
        ),
        *([under_wait_for] if sys.version_info >= (3, 12) else []),
    ],
)


@JOINS
async def test_a_unit_awaited_in_the_units_task_joins_it(
    async_engine: AsyncEngine,
    service: str,
    call: Callable[[Any], Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Awaited directly or under ``asyncio.timeout`` (and ``asyncio.wait_for`` from Python
    3.12, which runs it in the calling task): the nested units see the outer unit's row and
    are rolled back with it. Nothing said."""
    Async = AsyncResilientSession(async_engine, service=service)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        seen, left = await nested_in(Async, call)
    assert seen == [1, 1]
    assert left == []
    assert other_task_lines(caplog.records) == []


OTHER_TASK = pytest.mark.parametrize(
    "call", [in_a_task, *([under_wait_for] if sys.version_info < (3, 12) else [])]
)


@OTHER_TASK
async def test_a_unit_in_another_task_runs_on_its_own_and_says_so_once(
    async_engine: AsyncEngine,
    service: str,
    call: Callable[[Any], Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Started in another task (``asyncio.create_task``; ``asyncio.wait_for`` before Python
    3.12): each nested unit runs in a transaction of its own (it does not see the outer unit's
    row, and stays committed when the outer unit fails), and one warning per factory says so,
    with the way to join (the hooks are told of each)."""
    Async = AsyncResilientSession(async_engine, service=service)
    events: list[rdb.SelfHealEvent] = []
    rdb.add_hook(events.append)
    try:
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            seen, left = await nested_in(Async, call)
    finally:
        rdb.remove_hook(events.append)
    assert seen == [0, 0]
    assert left == ["inner-1", "inner-2"]
    [line] = other_task_lines(caplog.records)
    text = line.getMessage()
    assert text.startswith("[SELF-HEAL] Unit in another task: ")
    assert f"service={service} " in text
    assert "in a transaction of its own, committed by itself" in text
    assert "asyncio.timeout()" in text
    assert "asyncio.wait_for runs it in another task before Python 3.12" in text
    told = [e for e in events if e.name == "unit_in_other_task" and e.service == service]
    assert len(told) == 2


async def test_a_unit_of_another_factory_in_a_task_is_not_said(
    async_engine: AsyncEngine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit of another factory runs in a session of its own wherever it runs (documented):
    nothing to say about it. Nor about a unit of the factory in a task that outlives the unit
    that made it (run after that one ended: not nested)."""
    Async = AsyncResilientSession(async_engine, service=service)
    Other = AsyncResilientSession(async_engine, service=f"{service}-other")
    later: list[asyncio.Task[None]] = []

    async def inner(session: AsyncSession) -> None:
        session.add(Item(name=f"inner-{len(later)}"))

    started = asyncio.Event()

    async def after_the_unit() -> None:
        await started.wait()
        await Async.run(inner)

    async def outer(session: AsyncSession) -> None:
        session.add(Item(name="outer"))
        await asyncio.create_task(Other.run(inner))
        later.append(asyncio.create_task(after_the_unit()))

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        await Async.run(outer)
        started.set()
        await later[0]
    assert other_task_lines(caplog.records) == []
    assert await count_items(async_engine, "outer") == 1
    assert await count_items(async_engine, "inner-0") == 1
    assert await count_items(async_engine, "inner-1") == 1


async def test_a_class_overriding_only_flush_has_it_called_by_the_unit(
    async_engine: AsyncEngine, service: str
) -> None:
    """An async session class that overrides ``flush`` (to publish what it writes, say) and
    not ``commit``: the unit flushes through it before its COMMIT, as before."""
    calls: list[str] = []

    class Flushing(AsyncSession):
        async def flush(self, objects: Any = None) -> None:
            calls.append("flush")
            await super().flush(objects)

    Async = AsyncResilientSession(async_engine, service=service, class_=Flushing)

    async def unit(session: AsyncSession) -> None:
        session.add(Item(name="flushed"))

    await Async.run(unit)
    assert calls == ["flush"]
    assert await count_items(async_engine, "flushed") == 1


# -- a method patched onto the session class after its first unit ----------------------------------
def patched_in(name: str, calls: list[str], cls: type[Any]) -> Any:
    """A ``name`` method for ``cls`` that records its call and calls the one it replaces."""
    replaced = getattr(cls, name)
    if name == "run_sync":

        async def run_sync(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return await replaced(self, fn, *args, **kwargs)

        return run_sync
    if inspect.iscoroutinefunction(replaced):

        async def amethod(self: Any, *args: Any) -> Any:
            calls.append(name)
            return await replaced(self, *args)

        return amethod

    def method(self: Any, *args: Any) -> Any:
        calls.append(name)
        return replaced(self, *args)

    return method


@pytest.mark.parametrize("name", ["commit", "flush", "close", "run_sync"])
@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("onto", ["class", "base"])
async def test_a_method_patched_onto_the_class_after_its_first_unit_is_called(
    *,
    engine: sa.Engine,
    async_engine: AsyncEngine,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    enabled: bool,
    onto: str,
) -> None:
    """A test patches ``commit`` (``flush``, ``close``, ``run_sync``) onto the application's
    session class (``mock.patch.object``, ``monkeypatch.setattr``) after the factory's first
    unit ran: later units call it as a unit of a class that had it from the start does, as the
    sync twin's units do, and stop calling it once the patch is undone. (The async units kept
    ending as the class's first unit had decided: the patched method was never called.)
    Patched onto ``Session`` and ``AsyncSession`` themselves too (``onto="base"``): it is not
    taken for SQLAlchemy's own."""

    class AppSession(Session):
        pass

    class AppAsyncSession(AsyncSession):
        pass

    config = rdb.Config(enabled=enabled)
    Sync = rdb.ResilientSession(engine, service=f"{service}-sync", class_=AppSession, config=config)
    Async = AsyncResilientSession(
        async_engine, service=service, class_=AppAsyncSession, config=config
    )

    def sync_unit(session: Session, row: str) -> None:
        session.add(Item(name=f"sync-{row}"))

    async def async_unit(session: AsyncSession, row: str) -> None:
        session.add(Item(name=f"async-{row}"))

    # what a class that has the method when its factory is made calls
    from_start: list[str] = []
    FromStart = type(
        "FromStart", (AsyncSession,), {name: patched_in(name, from_start, AsyncSession)}
    )
    await AsyncResilientSession(async_engine, service=service, class_=FromStart, config=config).run(
        async_unit, "from-start"
    )
    if name != "flush" or enabled:  # (off: plain SQLAlchemy's commit, its sync session's flush)
        assert from_start == [name]

    Sync.run(sync_unit, "before")
    await Async.run(async_unit, "before")
    sync_calls: list[str] = []
    async_calls: list[str] = []
    if onto == "class":
        if name != "run_sync":  # (a sync session has none)
            monkeypatch.setattr(AppSession, name, patched_in(name, sync_calls, AppSession))
        monkeypatch.setattr(AppAsyncSession, name, patched_in(name, async_calls, AppAsyncSession))
    else:  # (the async unit's sync session is a Session: only AsyncSession's is patched)
        monkeypatch.setattr(AsyncSession, name, patched_in(name, async_calls, AsyncSession))
    Sync.run(sync_unit, "patched")
    await Async.run(async_unit, "patched")
    assert sync_calls == ([name] if onto == "class" and name != "run_sync" else [])
    assert async_calls == from_start
    monkeypatch.undo()
    sync_calls.clear()
    async_calls.clear()
    Sync.run(sync_unit, "after")
    await Async.run(async_unit, "after")
    assert sync_calls == async_calls == []
    for row in ("before", "patched", "after"):
        assert await count_items(async_engine, f"sync-{row}") == 1
        assert await count_items(async_engine, f"async-{row}") == 1
