"""A row deleted and added again with the same key in one flush: SQLAlchemy sends the pair as
one UPDATE of the row (its "row switch"), from the state the row was loaded in to the new
object's. The flush guard judges that move, as the trigger judges the UPDATE: an illegal one is
blocked at flush, before anything is written, with or without the trigger (before, the flush
guard judged only the new object's initial state: the trigger refused it at COMMIT time, and
without the trigger a completed task went back to pending). The same delete and add in two
flushes are a DELETE and an INSERT, allowed. A legal row switch into a state no new row starts
in goes through (it was refused as a new row's), and its UPDATE is a compare-and-set like a
changed row's: a row another transaction moved meanwhile raises StaleTransitionError (it was
written over, or refused by the trigger as an illegal move). Real server, sync and async."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import BYPASS_BY_HAND, flush_behind
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"in_progress"}, "in_progress": {"completed", "pending"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


@pytest.fixture(params=["trigger", "no trigger"])
def engine(request: pytest.FixtureRequest, pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    if request.param == "trigger":
        with eng.begin() as conn:
            rdb.install_transition_trigger(conn, Task)
    yield eng
    eng.dispose()


def reset(engine: sa.Engine, status: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(BYPASS_BY_HAND)  # (a row in a state no INSERT may start in)
        conn.exec_driver_sql("DELETE FROM tasks")
        conn.exec_driver_sql(f"INSERT INTO tasks VALUES (1, 'old', '{status}')")


def stored(engine: sa.Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(r.title, r.status) for r in conn.execute(sa.text("SELECT * FROM tasks"))]


def test_an_illegal_row_switch_is_blocked_at_flush(engine: sa.Engine, service: str) -> None:
    reset(engine, "completed")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        session.delete(session.get_one(Task, 1))
        session.add(Task(id=1, title="new", status="pending"))
        with pytest.raises(rdb.IllegalTransitionError) as blocked:
            session.commit()
    err = blocked.value
    assert (err.via, err.from_state, err.to_state, err.pk) == ("flush", "completed", "pending", 1)
    assert "flush the delete first" in err.reason
    assert stored(engine) == [("old", "completed")]


def test_a_legal_row_switch_and_a_replacement_in_two_flushes_go_through(
    engine: sa.Engine, service: str
) -> None:
    reset(engine, "in_progress")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions.begin() as session:  # in_progress -> pending: a legal move
        session.delete(session.get_one(Task, 1))
        session.add(Task(id=1, title="switched", status="pending"))
    assert stored(engine) == [("switched", "pending")]
    reset(engine, "completed")
    with Sessions.begin() as session:  # a DELETE, then an INSERT of a new row
        session.delete(session.get_one(Task, 1))
        session.flush()
        session.add(Task(id=1, title="replaced", status="pending"))
    assert stored(engine) == [("replaced", "pending")]


def test_a_row_switch_leaving_the_status_unset_moves_nothing(
    engine: sa.Engine, service: str
) -> None:
    """The new object sets no status: SQLAlchemy's UPDATE of the row leaves the column as it
    is (no move, nothing to judge: not refused as a new row outside the initial states)."""
    reset(engine, "completed")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions.begin() as session:
        session.delete(session.get_one(Task, 1))
        session.add(Task(id=1, title="switched"))
    assert stored(engine) == [("switched", "completed")]


def test_a_new_row_keyed_by_the_database_beside_a_delete_is_a_new_row(
    engine: sa.Engine, service: str
) -> None:
    """A new object whose key the database gives, added in the flush that deletes a row, can't
    be that row: it is judged as a new row (one outside the initial states refused, nothing of
    the flush written; one in them inserted beside the delete)."""
    reset(engine, "completed")
    with engine.begin() as conn:
        # (keys from 10: SQLAlchemy sends the INSERT before the DELETE of row 1)
        conn.exec_driver_sql("CREATE SEQUENCE IF NOT EXISTS task_ids START 10")
        conn.exec_driver_sql("ALTER TABLE tasks ALTER COLUMN id SET DEFAULT nextval('task_ids')")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        session.delete(session.get_one(Task, 1))
        session.add(Task(title="new", status="completed"))
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    assert (refused.value.from_state, refused.value.to_state) == (None, "completed")
    assert stored(engine) == [("old", "completed")]
    with Sessions.begin() as session:
        session.delete(session.get_one(Task, 1))
        session.add(Task(title="new", status="pending"))
    assert stored(engine) == [("new", "pending")]


@pytest.mark.asyncio
async def test_async_an_illegal_row_switch_is_blocked_at_flush(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    reset(engine, "completed")
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        async with Sessions() as session:
            await session.delete(await session.get_one(Task, 1))
            session.add(Task(id=1, title="new", status="pending"))
            with pytest.raises(rdb.IllegalTransitionError) as blocked:
                await session.commit()
        assert (blocked.value.via, blocked.value.from_state) == ("flush", "completed")
        assert stored(engine) == [("old", "completed")]
    finally:
        await aengine.dispose()


def test_a_legal_row_switch_into_a_state_no_new_row_starts_in_goes_through(
    engine: sa.Engine, service: str
) -> None:
    reset(engine, "pending")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions.begin() as session:  # pending -> in_progress: legal, though not initial
        session.delete(session.get_one(Task, 1))
        session.add(Task(id=1, title="switched", status="in_progress"))
    assert stored(engine) == [("switched", "in_progress")]


def move_by_hand(engine: sa.Engine, status: str) -> None:
    """Another transaction moves row 1 (legally: the trigger lets it) and commits."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET status = :s WHERE id = 1"), {"s": status})


def test_a_row_switch_is_a_compare_and_set(engine: sa.Engine, service: str) -> None:
    reset(engine, "in_progress")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        task = session.get_one(Task, 1)
        move_by_hand(engine, "completed")  # committed after the row was loaded
        session.delete(task)
        session.add(Task(id=1, title="new", status="pending"))  # legal from in_progress
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    err = stale.value
    assert (err.via, err.pk, err.from_state, err.to_state) == ("flush", 1, "in_progress", "pending")
    assert "now holds 'completed'" in err.reason
    assert stored(engine) == [("old", "completed")]


def test_a_row_switch_waiting_for_the_row_lock_of_another_transaction_is_stale(
    engine: sa.Engine, service: str
) -> None:
    """The row switch's UPDATE waits for the transaction holding the row; once that one
    commits its move, the UPDATE matches no row (the compare-and-set): stale."""
    reset(engine, "in_progress")
    Sessions = rdb.ResilientSession(engine, service=service)
    outcome: list[BaseException | None] = []
    with Sessions() as session, engine.connect() as winner:
        task = session.get_one(Task, 1)
        winner.execute(sa.text("UPDATE tasks SET status = 'completed' WHERE id = 1"))
        session.delete(task)
        session.add(Task(id=1, title="new", status="pending"))
        outcome.append(flush_behind(session, winner, engine))
        session.rollback()
    assert len(outcome) == 1
    assert isinstance(outcome[0], rdb.StaleTransitionError), outcome
    assert stored(engine) == [("old", "completed")]


def test_a_row_switch_of_a_status_not_loaded_is_judged_from_the_row(
    engine: sa.Engine, service: str
) -> None:
    reset(engine, "in_progress")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        task = session.get_one(Task, 1)
        session.expire(task, ["status"])
        move_by_hand(engine, "completed")
        session.delete(task)
        session.add(Task(id=1, title="new", status="pending"))
        with pytest.raises(rdb.IllegalTransitionError) as blocked:
            session.commit()
    err = blocked.value
    assert (err.via, err.from_state, err.to_state) == ("flush", "completed", "pending")
    assert stored(engine) == [("old", "completed")]


@pytest.mark.asyncio
async def test_async_a_row_switch_of_several_rows_is_a_compare_and_set(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """Two rows switched in one flush: asyncpg's executemany, whose UPDATE makes the server
    raise for the row that moved (it reports no row count), names row 2."""
    reset(engine, "in_progress")
    with engine.begin() as conn:
        conn.exec_driver_sql(BYPASS_BY_HAND)
        conn.exec_driver_sql("INSERT INTO tasks VALUES (2, 'old', 'in_progress')")
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        async with Sessions() as session:
            tasks = [await session.get_one(Task, n) for n in (1, 2)]
            with engine.begin() as conn:
                conn.exec_driver_sql("UPDATE tasks SET status = 'completed' WHERE id = 2")
            for task in tasks:
                await session.delete(task)
            session.add_all([Task(id=n, title="new", status="pending") for n in (1, 2)])
            with pytest.raises(rdb.StaleTransitionError) as stale:
                await session.commit()
        err = stale.value
        assert (err.pk, err.from_state, err.to_state) == (2, "in_progress", "pending")
        assert "now holds 'completed'" in err.reason
        assert sorted(stored(engine)) == [("old", "completed"), ("old", "in_progress")]
        async with Sessions.begin() as session:  # legal and not raced: goes through
            await session.delete(await session.get_one(Task, 1))
            session.add(Task(id=1, title="switched", status="pending"))
        assert ("switched", "pending") in stored(engine)
    finally:
        await aengine.dispose()
