"""An ORM UPDATE run as ``select(Task).from_statement(update(Task)...returning(Task))``, the
SQLAlchemy recipe for an UPDATE that returns ORM objects. The bulk-UPDATE guard read the
statement as an UPDATE (SQLAlchemy reports it as one) but took the wrapper for it: every such
statement, a legal move too, failed with ``InternalsChanged`` ("SQLAlchemy no longer has
FromStatement._values ... pin SQLAlchemy"). The UPDATE inside is judged now, as one run by
itself: rows that may not move are left out (or raise), the others move and come back.

Real server, no trigger installed: the session guards alone; sync and async."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done", "pending"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(pg_url, Base, "INSERT INTO tasks VALUES (1, 'running'), (2, 'done')")


def back_to_pending() -> sa.Select[tuple[Task]]:
    """Every task back to 'pending', returning the tasks moved: legal for the running one."""
    update = sa.update(Task).values(status="pending").returning(Task)
    return sa.select(Task).from_statement(update)


def test_the_update_inside_is_judged(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Session) -> list[tuple[int, str]]:
        return [(t.id, t.status) for t in session.scalars(back_to_pending())]

    assert Sessions.run(unit) == [(1, "pending")]  # the done task left out, not returned
    assert statuses_by_id(engine) == {1: "pending", 2: "done"}


def test_raise_mode_raises_for_the_update_inside(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update="raise"))
    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(lambda s: s.scalars(back_to_pending()).all())
    assert (info.value.pk, info.value.from_state, info.value.to_state) == (2, "done", "pending")
    assert statuses_by_id(engine) == {1: "running", 2: "done"}


def test_a_sql_expression_inside_is_judged(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    new = sa.case((Task.id == 2, "pending"), else_="done")  # illegal for 2, legal for 1
    update = sa.update(Task).values(status=new).returning(Task)

    def unit(session: Session) -> list[tuple[int, str]]:
        found = session.scalars(sa.select(Task).from_statement(update))
        return [(t.id, t.status) for t in found]

    assert Sessions.run(unit) == [(1, "done")]
    assert statuses_by_id(engine) == {1: "done", 2: "done"}


def test_other_statements_from_statement_run_as_given(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    query = sa.select(Task).from_statement(sa.text("SELECT * FROM tasks ORDER BY id"))
    found = Sessions.run(lambda s: [(t.id, t.status) for t in s.scalars(query)])
    assert found == [(1, "running"), (2, "done")]


@pytest.mark.asyncio
async def test_the_update_inside_is_judged_async(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)

    async def unit(session: AsyncSession) -> list[tuple[int, str]]:
        return [(t.id, t.status) for t in await session.scalars(back_to_pending())]

    try:
        assert await Sessions.run(unit) == [(1, "pending")]
    finally:
        await aengine.dispose()
    assert statuses_by_id(engine) == {1: "pending", 2: "done"}
