"""A row moved away and back between the flush's compare-and-set UPDATE and the guard's
re-read of it (ABA): the UPDATE matched no row, so the move was stale, whatever the re-read
shows. It surfaced as SQLAlchemy's plain ``StaleDataError`` (no ``[SELF-HEAL]`` line, no stale
count, a 500 from the web handlers rather than a 409); it is a ``StaleTransitionError`` naming
the row, the state this flush expected and the state the row holds.

Deterministic: the other transactions are autocommit statements on a second engine, the one
moving the row back fired from a ``before_cursor_execute`` listener just before the guard's
re-read (the only statement reading ``xmin``). Real server; psycopg and asyncpg."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.exc import StaleDataError

import resilient_db as rdb
from resilient_db.web import problem_details


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={
            "pending": {"in_progress", "cancelled"},
            "in_progress": {"completed", "pending"},
        },
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


ROW_KEYS = rdb.load_config(environ={}).replace(log_row_keys=True)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.insert(Task), [{"id": n, "status": "pending"} for n in (1, 2)])
    yield eng
    eng.dispose()


@pytest.fixture
def other(pg_url: str) -> Iterator[sa.Engine]:
    """Another client, committing each statement."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield eng
    eng.dispose()


def move(other: sa.Engine, key: int, status: str) -> None:
    with other.connect() as conn:
        conn.execute(sa.update(Task.__table__).where(Task.id == key).values(status=status))


def back_before_the_reread(sync_engine: sa.Engine, other: sa.Engine, key: int) -> list[str]:
    """Move row ``key`` back to pending just before the guard's re-read."""
    fired: list[str] = []

    @event.listens_for(sync_engine, "before_cursor_execute")
    def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not fired and statement.lstrip().upper().startswith("SELECT") and "xmin" in statement:
            fired.append(statement)
            move(other, key, "pending")

    return fired


def stored(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT status FROM tasks ORDER BY id")))


def assert_stale_for_row(
    err: BaseException, key: int, events: list[rdb.SelfHealEvent], service: str
) -> None:
    assert isinstance(err, rdb.StaleTransitionError), repr(err)
    assert (err.pk, err.from_state, err.to_state, err.via) == (key, "pending", "cancelled", "flush")
    assert "another transaction changed the row" in err.reason
    assert "now holds 'pending'" in err.reason
    problem = problem_details(err, config=ROW_KEYS)
    assert problem is not None
    assert problem.status == 409
    stale = [e for e in events if e.name == "transition_blocked" and e.fields.get("stale")]
    assert len(stale) == 1
    assert rdb.health()["transitions"]["stale_transitions"] == 1


def test_a_row_moved_away_and_back_is_stale(
    engine: sa.Engine, other: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=ROW_KEYS)
    fired = back_before_the_reread(engine, other, 1)
    with Sessions() as session:
        task = session.get_one(Task, 1)
        move(other, 1, "in_progress")
        task.status = "cancelled"  # legal from the state loaded
        with pytest.raises(StaleDataError) as info:
            session.flush()
    assert fired
    assert_stale_for_row(info.value, 1, events, service)
    assert stored(engine) == ["pending", "pending"]


def test_of_several_rows_the_one_moved_away_and_back_is_named(
    engine: sa.Engine, other: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """Row 1 was updated, row 2 was not: it holds the state this flush expected, not the one
    it wrote, so it is the stale one (the error said row 2 'had already been moved' to the
    state this flush wrote, naming no row)."""
    Sessions = rdb.ResilientSession(engine, service=service, config=ROW_KEYS)
    fired = back_before_the_reread(engine, other, 2)
    with Sessions() as session:
        tasks = list(session.scalars(sa.select(Task).order_by(Task.id)))
        move(other, 2, "in_progress")
        for task in tasks:
            task.status = "cancelled"
        with pytest.raises(StaleDataError) as info:
            session.flush()
    assert fired
    assert_stale_for_row(info.value, 2, events, service)
    assert stored(engine) == ["pending", "pending"]


@pytest.mark.asyncio
async def test_async_a_row_moved_away_and_back_is_stale(
    engine: sa.Engine,
    other: sa.Engine,
    pg_async_url: str,
    service: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    aengine = create_async_engine(pg_async_url)
    try:
        fired = back_before_the_reread(aengine.sync_engine, other, 1)
        Sessions = rdb.AsyncResilientSession(aengine, service=service, config=ROW_KEYS)
        async with Sessions() as session:
            task = await session.get_one(Task, 1)
            move(other, 1, "in_progress")
            task.status = "cancelled"
            with pytest.raises(StaleDataError) as info:
                await session.flush()
        assert fired
        assert_stale_for_row(info.value, 1, events, service)
    finally:
        await aengine.dispose()
    assert stored(engine) == ["pending", "pending"]


def test_a_stale_move_is_not_called_illegal(
    engine: sa.Engine, other: sa.Engine, service: str
) -> None:
    """The move was legal and lost a race: the message says so (it began "illegal status
    transition of")."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        task = session.get_one(Task, 1)
        move(other, 1, "in_progress")
        task.status = "cancelled"
        with pytest.raises(rdb.StaleTransitionError) as info:
            session.flush()
    message = str(info.value)
    assert not message.startswith("illegal"), message
    assert message.startswith("status transition conflict on Task(pk=1).status: 'pending' ->")
    assert "the row now holds 'in_progress'" in message
