"""The guard inside resilient sessions: the trigger's error comes back as IllegalTransitionError
(via="db") through the engine hook, is never retried or counted by the breaker, and the session
stays usable. Sync and async, against the real server."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.examples.tasks import Base, Task

_services = itertools.count()
ILLEGAL = sa.text("UPDATE tasks SET status = 'pending' WHERE id = :id")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
        conn.execute(
            sa.insert(Task).values(id=1, title="done", status="pending", idem_key="seed-1")
        )
        conn.execute(
            sa.text(
                "ALTER TABLE tasks DISABLE TRIGGER USER; "
                "UPDATE tasks SET status = 'completed' WHERE id = 1; "
                "ALTER TABLE tasks ENABLE TRIGGER USER"
            )
        )
    yield eng
    eng.dispose()


def test_trigger_block_through_a_unit_is_illegal_transition_via_db(engine: sa.Engine) -> None:
    service = f"guard-{next(_services)}"
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(failure_threshold=1))
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(ILLEGAL, {"id": 1})

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(unit)
    err = info.value
    assert (err.via, err.from_state, err.to_state, err.pk) == ("db", "completed", "pending", 1)
    assert err.model == "Task"
    assert err.__cause__ is not None
    assert rdb.sqlstate_of(err.__cause__) == rdb.TRANSITION_SQLSTATE  # the driver's error
    assert calls == [1]  # never retried
    health = rdb.health()
    assert health["services"][service]["breaker"]["state"] == "closed"  # never counted
    assert health["transitions"]["blocked_transitions"] >= 1
    with Sessions() as session:  # drop-in use: the same mapping, and the session recovers
        with pytest.raises(rdb.IllegalTransitionError):
            session.execute(ILLEGAL, {"id": 1})
        session.rollback()
        assert session.get(Task, 1).status == "completed"  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_trigger_block_through_an_async_unit_is_illegal_transition_via_db(
    engine: sa.Engine, pg_async_url: str
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=f"guard-{next(_services)}")
    calls: list[int] = []

    async def unit(session: Any) -> None:
        calls.append(1)
        await session.execute(ILLEGAL, {"id": 1})

    try:
        with pytest.raises(rdb.IllegalTransitionError) as info:
            await Sessions.run(unit)
        assert (info.value.via, info.value.from_state, info.value.to_state) == (
            "db",
            "completed",
            "pending",
        )
        assert calls == [1]
        async with Sessions() as session:
            task = await session.get(Task, 1)
            assert task is not None
            assert task.status == "completed"
    finally:
        await aengine.dispose()


def test_one_guard_check_per_flush_whatever_the_session_class(engine: sa.Engine) -> None:
    """Listeners live on the base session class; a class_= factory beside a default one must
    not run them twice (one locked SELECT per flush, not two)."""

    class AppSession(Session):
        pass

    plain_factory = rdb.ResilientSession(engine, service=f"guard-{next(_services)}")
    custom = rdb.ResilientSession(engine, service=f"guard-{next(_services)}", class_=AppSession)
    locked: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FOR UPDATE" in statement:
            locked.append(statement)

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        for factory in (plain_factory, custom):
            with engine.begin() as conn:  # back to a state from which "pending" is legal
                conn.execute(sa.text("ALTER TABLE tasks DISABLE TRIGGER USER"))
                conn.execute(sa.text("UPDATE tasks SET status = 'in_progress' WHERE id = 1"))
                conn.execute(sa.text("ALTER TABLE tasks ENABLE TRIGGER USER"))
            locked.clear()
            factory.run(lambda s: setattr(s.get(Task, 1), "status", "pending"))
            assert len(locked) == 1, factory
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    with custom() as session:
        assert isinstance(session, AppSession)
