"""An ORM bulk UPDATE by primary key (a list of parameter sets) on a connection in AUTOCOMMIT
mode, racing another transaction that moves one of its rows between the guard's check and the
UPDATE. The check locks the rows it reads, but in AUTOCOMMIT mode its locks end with it, and
the UPDATE carried no condition of its own: a row the check found legal, moved meanwhile into
a state it may not leave for the one written (``completed`` -> ``pending``), was written all
the same, in both modes, unlogged (without the trigger, which is not installed here). Each set
now carries the state its row must still hold, so such a row is left out, as the condition of
an UPDATE with criteria leaves out rows that came to match them after its check.

Deterministic: the other transaction is an autocommit statement on a second engine, fired by a
``before_cursor_execute`` listener just before the UPDATE is sent (the check done). Real
server; psycopg, and each async driver."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb


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
    title: Mapped[str] = mapped_column(sa.String(20), default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(
        pg_url,
        Base,
        "INSERT INTO tasks VALUES (1, '', 'in_progress'), (2, '', 'in_progress'), "
        "(3, '', 'pending')",
    )


@pytest.fixture
def other(pg_url: str) -> Iterator[sa.Engine]:
    """Another client, committing each statement."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield eng
    eng.dispose()


def move_before_the_update(sync_engine: sa.Engine, other: sa.Engine, sql: str) -> list[str]:
    """Run ``sql`` on ``other`` just before the first UPDATE of tasks is sent (the check done)."""
    fired: list[str] = []

    @event.listens_for(sync_engine, "before_cursor_execute")
    def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not fired and statement.startswith("UPDATE tasks"):
            fired.append(statement)
            with other.connect() as c:
                c.exec_driver_sql(sql)

    return fired


BACK = [{"id": 1, "status": "pending"}, {"id": 2, "status": "pending"}]


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_a_row_moved_after_the_check_is_left_out(
    engine: sa.Engine, other: sa.Engine, service: str, mode: str
) -> None:
    """Both rows may go in_progress -> pending; row 2 goes completed just before the UPDATE:
    it stays completed, row 1 moves. Row 2's session object is not set to the state the UPDATE
    did not write: its status reloads as stored."""
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    Sessions = rdb.ResilientSession(auto, service=service, config=rdb.Config(bulk_update=mode))
    fired = move_before_the_update(
        engine, other, "UPDATE tasks SET status = 'completed' WHERE id = 2"
    )

    def unit(session: Session) -> tuple[str, str]:
        one, two = session.get_one(Task, 1), session.get_one(Task, 2)
        session.execute(sa.update(Task), BACK)
        return one.status, two.status

    assert Sessions.run(unit) == ("pending", "completed")
    assert fired
    assert statuses_by_id(engine) == {1: "pending", 2: "completed", 3: "pending"}


def test_sets_writing_no_status_or_the_same_row_in_turn(
    engine: sa.Engine, other: sa.Engine, service: str
) -> None:
    """A set that writes no status is not held to a state (row 3's title is written though its
    status moved meanwhile); two sets of one row are each held to the state the set before
    leaves it in (row 1: in_progress -> pending -> in_progress)."""
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    Sessions = rdb.ResilientSession(auto, service=service)
    fired = move_before_the_update(
        engine, other, "UPDATE tasks SET status = 'in_progress' WHERE id = 3"
    )
    sets = [
        {"id": 1, "status": "pending"},
        {"id": 3, "title": "renamed"},
        {"id": 1, "status": "in_progress"},
    ]
    Sessions.run(lambda s: s.execute(sa.update(Task), sets))
    assert fired
    assert statuses_by_id(engine) == {1: "in_progress", 2: "in_progress", 3: "in_progress"}
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT title FROM tasks WHERE id = 3")) == "renamed"


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["raise", "filter"])
async def test_async_a_row_moved_after_the_check_is_left_out(
    engine: sa.Engine, other: sa.Engine, pg_async_url: str, service: str, mode: str
) -> None:
    """As above through ``AsyncResilientSession``, on each async driver (asyncpg's
    executemany reports no row count)."""
    aengine = create_async_engine(pg_async_url, isolation_level="AUTOCOMMIT")
    try:
        fired = move_before_the_update(
            aengine.sync_engine, other, "UPDATE tasks SET status = 'completed' WHERE id = 2"
        )
        Sessions = rdb.AsyncResilientSession(
            aengine, service=service, config=rdb.Config(bulk_update=mode)
        )
        async with Sessions() as session:
            await session.execute(sa.update(Task), BACK)
            await session.commit()
    finally:
        await aengine.dispose()
    assert fired
    assert statuses_by_id(engine) == {1: "pending", 2: "completed", 3: "pending"}
