"""The guard inside resilient sessions: the trigger's error comes back as IllegalTransitionError
(via="db") through the engine hook, is never retried or counted by the breaker, and the session
stays usable. Sync and async, against the real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sent import Sent
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.examples.tasks import Base, Task
from resilient_db.transitions._bypass import GUARD_INFO_KEY
from resilient_db.transitions._flush import guard_execute

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


def test_trigger_block_through_a_unit_is_illegal_transition_via_db(
    engine: sa.Engine, service: str
) -> None:
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
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
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


def _to_in_progress(engine: sa.Engine) -> None:
    """Back to a state from which "pending" is legal (trigger off for the setup)."""
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE tasks DISABLE TRIGGER USER"))
        conn.execute(sa.text("UPDATE tasks SET status = 'in_progress' WHERE id = 1"))
        conn.execute(sa.text("ALTER TABLE tasks ENABLE TRIGGER USER"))


def test_one_guard_check_per_flush_whatever_the_session_class(
    engine: sa.Engine, service: str
) -> None:
    """Listeners live on the base session class; a class_= factory beside a default one must
    not run them twice. A loaded status costs no statement of the guard's own (the UPDATE
    carries it); an expired one is read by the guard, once."""

    class AppSession(Session):
        pass

    plain_factory = rdb.ResilientSession(engine, service=f"{service}-plain")
    custom = rdb.ResilientSession(engine, service=f"{service}-custom", class_=AppSession)

    def move(session: Session, expire: bool) -> None:
        task = session.get(Task, 1)
        assert task is not None
        if expire:
            session.expire(task, ["status"])
        task.status = "pending"
        recorder.sent.clear()
        session.flush()

    recorder = Sent(engine)
    try:
        for factory in (plain_factory, custom):
            for expire in (False, True):
                _to_in_progress(engine)
                factory.run(move, expire)
                sent = recorder.sql
                updates = [q for q in sent if q.startswith("UPDATE")]
                assert len(updates) == 1, factory
                assert "AND tasks.status = " in updates[0]
                assert not [q for q in sent if "FOR UPDATE" in q]
                reads = [
                    q for q in sent if q.startswith("SELECT tasks.id, CAST(tasks.status AS TEXT)")
                ]
                assert len(reads) == (1 if expire else 0), (factory, sent)
    finally:
        recorder.stop()
    with custom() as session:
        assert isinstance(session, AppSession)


def test_stale_move_through_a_unit_is_never_retried(engine: sa.Engine, service: str) -> None:
    """Two workers claim the same task: the second one's unit raises StaleTransitionError at
    once (a business error: not retried, not counted by the breaker)."""
    _to_in_progress(engine)
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(failure_threshold=1))
    calls: list[int] = []

    def claim(session: Session) -> None:
        calls.append(1)
        task = session.get(Task, 1)
        assert task is not None
        with engine.begin() as other:  # the other worker, between our read and our write
            other.execute(sa.text("UPDATE tasks SET status = 'failed' WHERE id = 1"))
        task.status = "failed"

    with pytest.raises(rdb.StaleTransitionError) as info:
        Sessions.run(claim)
    assert (info.value.via, info.value.from_state, info.value.to_state) == (
        "flush",
        "in_progress",
        "failed",
    )
    assert calls == [1]
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"
    with Sessions() as session:  # drop-in use: commit() raises it the same way
        task = session.get(Task, 1)
        assert task is not None
        assert task.status == "failed"
        with engine.begin() as other:
            other.execute(sa.text("UPDATE tasks SET status = 'pending' WHERE id = 1"))
        task.status = "pending"  # the same retry, made twice
        with pytest.raises(rdb.StaleTransitionError, match="now holds 'pending'"):
            session.commit()


@pytest.mark.asyncio
async def test_stale_move_through_an_async_unit_is_never_retried(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    _to_in_progress(engine)
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    calls: list[int] = []

    async def claim(session: Any) -> None:
        calls.append(1)
        task = await session.get(Task, 1)
        async with aengine.begin() as other:
            await other.execute(sa.text("UPDATE tasks SET status = 'failed' WHERE id = 1"))
        task.status = "failed"

    try:
        with pytest.raises(rdb.StaleTransitionError) as info:
            await Sessions.run(claim)
        assert (info.value.from_state, info.value.to_state) == ("in_progress", "failed")
        assert "now holds 'failed'" in info.value.reason
        assert calls == [1]
    finally:
        await aengine.dispose()


def test_a_unit_whose_only_write_is_a_guarded_move_commits_with_its_marker(
    engine: sa.Engine,
    service: str,
) -> None:
    """The guard sends the flush's UPDATE itself, ending the dialect's listener chain. Here its
    listeners come first (a guarded flush of a plain session on the engine came before the
    resilient factory), so the commit protocol's listener never sees that UPDATE: the guard
    marks the transaction as writing itself. The COMMIT carries a marker, and a lost COMMIT
    answer of this unit would be verified, not guessed."""
    rdb.install_commit_markers(engine)
    _to_in_progress(engine)
    with Session(engine, info={GUARD_INFO_KEY: rdb.Config()}) as plain:
        task = plain.get(Task, 1)
        assert task is not None
        task.status = "pending"
        plain.commit()
    _to_in_progress(engine)
    Sessions = rdb.ResilientSession(engine, service=service)
    assert next(iter(engine.dialect.dispatch.do_execute)) is guard_execute

    def count() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(sa.text("SELECT count(*) FROM resilient_db.commit_markers")).scalar()
            )

    def move(session: Session) -> None:
        task = session.get(Task, 1)
        assert task is not None
        task.status = "pending"

    before = count()
    recorder = Sent(engine)
    try:
        Sessions.run(move)
    finally:
        recorder.stop()
    [update] = recorder.matching("UPDATE")
    assert "AND tasks.status = " in update
    assert count() == before + 1


def test_a_do_execute_listener_of_yours_does_not_skip_the_compare_and_set(
    engine: sa.Engine,
    service: str,
) -> None:
    """A ``do_execute`` listener that sends statements itself (returning True ends SQLAlchemy's
    chain), added after the factory, comes after the guard's: the flush's UPDATE still carries
    the compare-and-set, and every other statement reaches yours."""
    _to_in_progress(engine)
    Sessions = rdb.ResilientSession(engine, service=service)
    seen: list[str] = []

    def yours(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        seen.append(statement.split(maxsplit=1)[0])
        cursor.execute(statement, parameters)
        return True

    def claim(session: Session) -> None:
        task = session.get(Task, 1)
        assert task is not None
        with engine.begin() as other:  # the other worker, between our read and our write
            other.execute(sa.text("UPDATE tasks SET status = 'failed' WHERE id = 1"))
        task.status = "failed"

    sa.event.listen(engine, "do_execute", yours)
    try:
        with pytest.raises(rdb.StaleTransitionError, match="now holds 'failed'"):
            Sessions.run(claim)
    finally:
        sa.event.remove(engine, "do_execute", yours)
    assert "SELECT" in seen  # the unit's read went through yours
    assert seen.count("UPDATE") == 1  # the other worker's; the flush's was the guard's


def test_a_translated_schema_gets_the_compare_and_set(engine: sa.Engine, service: str) -> None:
    """With ``schema_translate_map`` the SQL sent is not the compiled UPDATE: the guard sends
    its compare-and-set form compiled with the same map (no lock before it: on a connection in
    AUTOCOMMIT mode such a lock ends with its SELECT), and a row moved by another transaction
    is still caught."""
    translate = {None: "translated"}
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS translated"))
        Base.metadata.create_all(conn.execution_options(schema_translate_map=translate))
        conn.execute(sa.text("DELETE FROM translated.tasks"))
        conn.execute(
            sa.text(
                "INSERT INTO translated.tasks (id, title, status, idem_key) "
                "VALUES (1, 't', 'in_progress', 'seed-1'), (2, 't', 'in_progress', 'seed-2')"
            )
        )
    Sessions = rdb.ResilientSession(engine, service=service)

    def move(session: Session, task_id: int, moved_by_other: bool) -> None:
        session.connection(execution_options={"schema_translate_map": translate})
        task = session.get(Task, task_id)
        assert task is not None
        if moved_by_other:
            with engine.begin() as other:
                other.execute(sa.text("UPDATE translated.tasks SET status = 'failed' WHERE id = 2"))
        task.status = "pending"

    recorder = Sent(engine)
    try:
        Sessions.run(move, 1, False)
        [update] = recorder.matching("UPDATE")
        assert not [q for q in recorder.sql if q.endswith("FOR UPDATE")], recorder.sql
        assert "UPDATE translated.tasks " in update
        assert " AND translated.tasks.status = " in update
        with pytest.raises(rdb.StaleTransitionError, match="now holds 'failed'"):
            Sessions.run(move, 2, True)
    finally:
        recorder.stop()
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, status FROM translated.tasks ORDER BY id"))
        assert [tuple(r) for r in rows] == [(1, "pending"), (2, "failed")]
