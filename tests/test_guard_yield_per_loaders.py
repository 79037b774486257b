"""A query streamed with ``yield_per`` that loads a relationship by a second query
(``selectinload``, ``immediateload``, or a relationship's ``lazy="selectin"``), in a session
of a resilient factory where a model has ``__transitions__``: the bulk-UPDATE guard listens
on such sessions with ``do_orm_execute``, and SQLAlchemy before 2.0.50 let the mere presence
of such a listener hand the query's ``yield_per`` on to the relationship's query
(sqlalchemy#13301), which then failed with "Can't use the ORM yield_per feature in conjunction
with unique()": a read that works without resilient_db failed in every unit (not retried: it
is no database error). The rows and their relationships come back, as without the guard.

Real server; sync and async."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    immediateload,
    mapped_column,
    relationship,
    selectinload,
)

import resilient_db as rdb


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    # each loaded by a second query whenever a task is (unless an option says otherwise)
    notes: Mapped[list[Note]] = relationship(lazy="selectin", order_by="Note.id")
    tags: Mapped[list[Tag]] = relationship(lazy="selectin", order_by="Tag.id")


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(sa.ForeignKey("tasks.id"))


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(sa.ForeignKey("tasks.id"))


#: five tasks (more than one ``yield_per`` batch), each with two notes and a tag
EXPECTED = [(t, [10 * t, 10 * t + 1], [100 * t]) for t in range(1, 6)]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(
        pg_url,
        Base,
        "INSERT INTO tasks SELECT t, 'pending' FROM generate_series(1, 5) t",
        "INSERT INTO notes SELECT 10 * t + n, t"
        " FROM generate_series(1, 5) t, generate_series(0, 1) n",
        "INSERT INTO tags SELECT 100 * t, t FROM generate_series(1, 5) t",
    )


def streamed(option: Callable[..., Any] | None) -> sa.Select[tuple[Task]]:
    query = sa.select(Task).order_by(Task.id).execution_options(yield_per=2)
    return query if option is None else query.options(option(Task.notes))


def shown(tasks: Any) -> list[tuple[int, list[int], list[int]]]:
    return [(t.id, [n.id for n in t.notes], [g.id for g in t.tags]) for t in tasks]


LOADERS = pytest.mark.parametrize(
    "option", [selectinload, immediateload, None], ids=["selectinload", "immediateload", "lazy"]
)


@LOADERS
def test_a_streamed_query_loads_its_relationships(
    engine: sa.Engine, service: str, option: Callable[..., Any] | None
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Session) -> list[tuple[int, list[int], list[int]]]:
        return shown(session.scalars(streamed(option)))

    assert Sessions.run(unit) == EXPECTED


@LOADERS
@pytest.mark.asyncio
async def test_a_streamed_query_loads_its_relationships_async(
    engine: sa.Engine, pg_async_url: str, service: str, option: Callable[..., Any] | None
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)

    async def unit(session: AsyncSession) -> list[tuple[int, list[int], list[int]]]:
        # (streamed: an AsyncSession runs a yield_per query through stream())
        return shown([task async for task in await session.stream_scalars(streamed(option))])

    try:
        assert await Sessions.run(unit) == EXPECTED
    finally:
        await aengine.dispose()
