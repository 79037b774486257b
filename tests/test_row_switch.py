"""A row deleted and added again with the same key in one flush: SQLAlchemy sends the pair as
one UPDATE of the row (its "row switch"), from the state the row was loaded in to the new
object's. The flush guard judges that move, as the trigger judges the UPDATE: an illegal one is
blocked at flush, before anything is written, with or without the trigger (before, the flush
guard judged only the new object's initial state: the trigger refused it at COMMIT time, and
without the trigger a completed task went back to pending). The same delete and add in two
flushes are a DELETE and an INSERT, allowed. Real server, sync and async."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import BYPASS_BY_HAND
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
