"""A guarded ORM UPDATE with ``.returning()``, run by two units at once: each gets its own
row's values, each under its own column.

The bulk-UPDATE guard has such an UPDATE synchronize the session by ``"fetch"`` (where the
application asked for ``"auto"``, which is ``"evaluate"`` here): its legal condition is about
the rows' states in the database. With ``"fetch"``, SQLAlchemy before 2.0.52 renders the
RETURNING in the table's column order, and a second run of the same statement, served from the
compiled cache while the first had not yet set up its result, adapted the result's columns by
position to the order ``.returning()`` asked for (sqlalchemy#13439): ``row[Task.status]`` gave
the row's note, and its note its status. A unit of a busy service could read another column's
value, or report a move it never made.

Forced here: the first unit waits after its UPDATE ran, before its result is set up (a listener
of the test's), until the second unit has read its row. Real server, real concurrency (two
threads, two connections)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb

#: a bound on each wait of the choreography (a hang fails the test, it is never waited out)
WAIT = 30


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
    # declared before the status: the table's order (id, note, status) is not the order the
    # RETURNING below asks for (id, status, note)
    note: Mapped[str] = mapped_column(sa.String(40))
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    # (a new engine: an empty compiled cache, the first run compiles the UPDATE)
    yield from seeded_engine(
        pg_url, Base, "INSERT INTO tasks VALUES (1, 'note 1', 'pending'), (2, 'note 2', 'pending')"
    )


def start(session: Session, task_id: int) -> tuple[Any, ...]:
    """Move task ``task_id`` to running; its id, status and note as the UPDATE returned them."""
    update = (
        sa.update(Task)
        .where(Task.id == task_id)
        .values(status="running")
        .returning(Task.id, Task.status, Task.note)
    )
    row = session.execute(update).mappings().one()
    return (row[Task.id], row[Task.status], row[Task.note])


def test_two_units_at_once_each_read_their_own_columns(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    first_ran, second_done = threading.Event(), threading.Event()
    results: dict[int, Any] = {}

    def run(task_id: int) -> None:
        try:
            results[task_id] = Sessions.run(start, task_id)
        except BaseException as exc:  # (reported by the main thread)
            results[task_id] = exc

    first = threading.Thread(target=run, args=(1,))

    def hold_the_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # after the first unit's UPDATE ran, before SQLAlchemy sets up its result
        if threading.current_thread() is first and statement.lstrip().startswith("UPDATE"):
            first_ran.set()
            assert second_done.wait(WAIT), "the second unit did not end"

    event.listen(engine, "after_cursor_execute", hold_the_first)
    try:
        first.start()
        assert first_ran.wait(WAIT), "the first unit's UPDATE did not run"
        run(2)  # meanwhile, in this thread: the same UPDATE, from the compiled cache
        second_done.set()
        first.join(WAIT)
        assert not first.is_alive()
    finally:
        second_done.set()
        event.remove(engine, "after_cursor_execute", hold_the_first)
    assert results == {1: (1, "running", "note 1"), 2: (2, "running", "note 2")}
