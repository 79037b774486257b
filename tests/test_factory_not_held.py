"""A factory nobody holds: its sessions and units heal for their whole life, whenever the
garbage collector runs.

``ResilientSession(engine)()``, ``ResilientSession(engine).run(fn)``, ``async with
AsyncResilientSession(engine)() as session:``: the caller keeps no reference to the factory,
which lives on through its sessions (their class holds it, as a ``sessionmaker``'s session
needs nothing of its sessionmaker), while the library's registries (live users of a service,
engine hooks, breakers' and budgets' users) hold it only weakly, and the factory and its class
refer to each other: only the cyclic collector frees them, at any allocation. Here it runs
(``gc.collect()``) between every two steps, inside the units too: a replay of a killed backend
(a real ``pg_terminate_backend``), a dead pooled connection replaced, the transition guard,
the breaker opened by hand and the counters of ``health()`` must all still be the factory's.
"""

from __future__ import annotations

import gc
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import async_metadata_engine, metadata_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.examples.tasks import Base as TaskBase
from resilient_db.examples.tasks import Task
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from metadata_engine(pg_url, TaskBase)


@pytest_asyncio.fixture
async def async_engine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    async for eng in async_metadata_engine(pg_async_url, TaskBase):
        yield eng


def counters(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return found


def blocked() -> int:
    return int(rdb.health()["transitions"]["blocked_transitions"])


def new_task(engine: sa.Engine) -> int:
    """A pending task, written outside any factory."""
    with Session(engine) as session, session.begin():
        task = Task(idem_key=uuid.uuid4().hex, title="t", status="pending")
        session.add(task)
        session.flush()
        return task.id


def status(engine: sa.Engine, task_id: int) -> str:
    with engine.connect() as conn:
        query = sa.select(Task.status).where(Task.id == task_id)
        return str(conn.execute(query).scalar_one())


def end_backend(pg_server: PostgresServer, pid: int) -> None:
    """The server ends the backend ``pid`` (waiting until it has gone)."""
    assert pg_server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)")[0][0] is True


def test_a_session_of_a_factory_nobody_holds_heals_for_its_whole_life(
    engine: sa.Engine, pg_server: PostgresServer, service: str
) -> None:
    """The session is all that is left of its factory: a dead pooled connection is replaced
    and counted under the factory's service, the guard refuses an illegal move, the breaker
    opened by hand refuses the session's next transaction, and the factory goes with the
    session."""
    factory = rdb.ResilientSession(engine, service=service)
    made = weakref.ref(factory)
    session = factory()
    del factory  # ResilientSession(engine)()
    before = blocked()
    gc.collect()
    with session:
        task = Task(idem_key=uuid.uuid4().hex, title="t", status="pending")
        session.add(task)
        session.flush()
        task_id = task.id
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        session.commit()
        # its connection, back in the pool, dies: found dead at the next checkout, replaced
        end_backend(pg_server, pid)
        gc.collect()
        task.status = "in_progress"
        session.commit()
        assert counters(service)["dead_pooled_connections"] == 1
        gc.collect()
        task.status = "cancelled"  # in_progress -> cancelled is no legal move
        with pytest.raises(rdb.IllegalTransitionError):
            session.commit()
        session.rollback()
        assert blocked() == before + 1
        gc.collect()
        rdb.open_breaker(service)  # found: the factory is a live user of its service
        gc.collect()
        with pytest.raises(rdb.CircuitOpenError):
            session.execute(sa.text("SELECT 1"))
        rdb.close_breaker(service)
        gc.collect()
        assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
    assert status(engine, task_id) == "in_progress"
    assert made() is not None  # (the session still holds it)
    del session
    gc.collect()
    assert made() is None


def task_in_attempt(session: Session, task_id: int, calls: list[int]) -> Task:
    """A unit's attempt counted (``calls``), the collector run, then its task loaded."""
    calls.append(1)
    gc.collect()
    task = session.get(Task, task_id)
    assert task is not None
    return task


async def async_task_in_attempt(session: AsyncSession, task_id: int, calls: list[int]) -> Task:
    calls.append(1)
    gc.collect()
    task = await session.get(Task, task_id)
    assert task is not None
    return task


def test_a_unit_of_a_factory_nobody_holds_is_replayed_guarded_and_counted(
    engine: sa.Engine, pg_server: PostgresServer, service: str
) -> None:
    """``ResilientSession(engine).run(fn)``, the factory not kept: its backend killed in the
    unit's first attempt, the unit is replayed once and counted; a unit making an illegal move
    is refused by the guard, not replayed."""
    task_id = new_task(engine)
    calls: list[int] = []

    def move(session: Session) -> None:
        task = task_in_attempt(session, task_id, calls)
        task.status = "in_progress"
        session.flush()
        if len(calls) == 1:
            end_backend(pg_server, session.execute(sa.text("SELECT pg_backend_pid()")).one()[0])
        gc.collect()
        session.execute(sa.text("SELECT 1"))

    rdb.ResilientSession(engine, service=service).run(move)
    assert calls == [1, 1]
    assert status(engine, task_id) == "in_progress"
    found = counters(service)
    assert (found["retries_by_class"], found["recovered"]) == ({"disconnect": 1}, 1)

    def cancel(session: Session) -> None:
        task = task_in_attempt(session, task_id, calls)
        task.status = "cancelled"  # in_progress -> cancelled is no legal move

    before = blocked()
    with pytest.raises(rdb.IllegalTransitionError):
        rdb.ResilientSession(engine, service=service).run(cancel)
    assert len(calls) == 3  # not replayed
    assert blocked() == before + 1
    assert status(engine, task_id) == "in_progress"


@pytest.mark.asyncio
async def test_an_async_session_of_a_factory_nobody_holds_heals_for_its_whole_life(
    engine: sa.Engine,
    async_engine: AsyncEngine,
    pg_server: PostgresServer,
    service: str,
) -> None:
    """``async with AsyncResilientSession(engine)() as session:``: the async twin of the
    first test, the factory's sync session class holding it."""
    before = blocked()
    async with rdb.AsyncResilientSession(async_engine, service=service)() as session:
        gc.collect()
        task = Task(idem_key=uuid.uuid4().hex, title="t", status="pending")
        session.add(task)
        await session.flush()
        task_id = task.id
        pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        await session.commit()
        end_backend(pg_server, pid)
        gc.collect()
        task.status = "in_progress"
        await session.commit()
        assert counters(service)["dead_pooled_connections"] == 1
        gc.collect()
        task.status = "cancelled"
        with pytest.raises(rdb.IllegalTransitionError):
            await session.commit()
        await session.rollback()
        assert blocked() == before + 1
        gc.collect()
        rdb.open_breaker(service)
        gc.collect()
        with pytest.raises(rdb.CircuitOpenError):
            await session.execute(sa.text("SELECT 1"))
        rdb.close_breaker(service)
        gc.collect()
        assert (await session.execute(sa.text("SELECT 1"))).scalar_one() == 1
    assert status(engine, task_id) == "in_progress"


@pytest.mark.asyncio
async def test_an_async_unit_of_a_factory_nobody_holds_is_replayed_guarded_and_counted(
    engine: sa.Engine, async_engine: AsyncEngine, pg_server: PostgresServer, service: str
) -> None:
    """``await AsyncResilientSession(engine).run(fn)``, the factory not kept: the async twin of
    the second test."""
    task_id = new_task(engine)
    calls: list[int] = []

    async def move(session: AsyncSession) -> None:
        task = await async_task_in_attempt(session, task_id, calls)
        task.status = "in_progress"
        await session.flush()
        if len(calls) == 1:
            pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).one()[0]
            end_backend(pg_server, pid)
        gc.collect()
        await session.execute(sa.text("SELECT 1"))

    await rdb.AsyncResilientSession(async_engine, service=service).run(move)
    assert calls == [1, 1]
    assert status(engine, task_id) == "in_progress"
    found = counters(service)
    assert (found["retries_by_class"], found["recovered"]) == ({"disconnect": 1}, 1)

    async def cancel(session: AsyncSession) -> None:
        task = await async_task_in_attempt(session, task_id, calls)
        task.status = "cancelled"

    before = blocked()
    with pytest.raises(rdb.IllegalTransitionError):
        await rdb.AsyncResilientSession(async_engine, service=service).run(cancel)
    assert len(calls) == 3
    assert blocked() == before + 1
    assert status(engine, task_id) == "in_progress"
