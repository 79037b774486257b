"""A flush of many objects (eight or more new, or eight or more changed: the flush guard then
looks their classes up once each instead of walking every object first) judges them as a
flush of a few does: one illegal row among many, of a guarded model alone or mixed with rows
of a model without rules, is refused before anything is sent (docs/transition-guard.md: checked
before anything is written, not by the mapper listeners as the rows go out); legal ones go
through. Real server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb

MANY = 12


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
    status: Mapped[str] = mapped_column(sa.String(20))


class Note(Base):
    """A model without rules."""

    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(20))


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    rows = ", ".join(f"({i}, 'pending')" for i in range(1, MANY + 1))
    notes = ", ".join(f"({i}, 'n')" for i in range(1, MANY + 1))
    yield from seeded_engine(
        pg_url, Base, f"INSERT INTO tasks VALUES {rows}", f"INSERT INTO notes VALUES {notes}"
    )


@contextmanager
def nothing_written(engine: sa.Engine) -> Iterator[None]:
    """Fail if an INSERT or UPDATE is sent meanwhile."""
    sent: list[str] = []

    def note(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            sent.append(statement)

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        yield
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    assert sent == []


def _notes(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM notes").scalar_one())


def test_many_new_rows_one_not_in_an_initial_state(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        session.add_all(Task(id=100 + i, status="pending") for i in range(MANY))
        session.add(Task(id=200, status="done"))
        with nothing_written(engine), pytest.raises(rdb.IllegalTransitionError) as info:
            session.flush()
    assert (info.value.via, info.value.pk, info.value.to_state) == ("flush", 200, "done")
    with Sessions() as session:  # a legal flush of as many goes through
        session.add_all(Task(id=100 + i, status="pending") for i in range(MANY))
        session.commit()
    assert len(statuses_by_id(engine)) == 2 * MANY


def test_one_new_guarded_row_among_many_without_rules(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        session.add_all(Note(id=100 + i, text="x") for i in range(MANY))
        session.add(Task(id=200, status="running"))
        with nothing_written(engine), pytest.raises(rdb.IllegalTransitionError) as info:
            session.flush()
    assert info.value.pk == 200
    assert _notes(engine) == MANY
    with Sessions() as session:  # many rows of the model without rules alone
        session.add_all(Note(id=100 + i, text="x") for i in range(MANY))
        session.commit()
    assert _notes(engine) == 2 * MANY


@pytest.mark.parametrize("with_notes", [False, True], ids=["tasks", "tasks and notes"])
def test_many_changed_rows_one_moving_illegally(
    engine: sa.Engine, service: str, with_notes: bool
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        tasks = session.scalars(sa.select(Task).order_by(Task.id)).all()
        if with_notes:
            for note in session.scalars(sa.select(Note)):
                note.text = "y"
        for task in tasks[:-1]:
            task.status = "running"
        tasks[-1].status = "done"  # pending -> done: illegal
        with nothing_written(engine), pytest.raises(rdb.IllegalTransitionError) as info:
            session.flush()
    assert (info.value.pk, info.value.from_state, info.value.to_state) == (MANY, "pending", "done")
    assert set(statuses_by_id(engine).values()) == {"pending"}
    with Sessions() as session:
        for task in session.scalars(sa.select(Task)):
            task.status = "running"
        session.commit()
    assert set(statuses_by_id(engine).values()) == {"running"}
