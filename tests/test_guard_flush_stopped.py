"""A flush that a ``before_flush`` listener of the application's stops (it raises, after the
flush guard's listener prepared the compare-and-set of the flush's rows): nothing is sent,
the session is not rolled back, and its next flush is judged afresh, not against what the
stopped one expected (a row moved meanwhile by a legal flush of the same session is judged
from where it now is). Real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

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
    status: Mapped[str] = mapped_column(sa.String(20))
    title: Mapped[str] = mapped_column(sa.String(20), default="t")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(pg_url, Base, "INSERT INTO tasks VALUES (1, 'pending', 't')")


class Refused(Exception):
    pass


def test_a_flush_stopped_by_another_listener_leaves_nothing_for_the_next(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    stop = [True]

    def validate(session: Session, *args: Any) -> None:  # the application's, after the guard's
        if stop[0]:
            raise Refused("title missing")

    with Sessions() as session:
        event.listen(session, "before_flush", validate)
        task = session.get_one(Task, 1)
        task.status = "running"
        with pytest.raises(Refused):
            session.flush()
        stop[0] = False
        session.flush()  # the same move, sent now
        task.status = "done"
        session.flush()  # judged from running, where the row is
        task.status = "pending"
        with pytest.raises(rdb.IllegalTransitionError) as info:
            session.flush()
        assert (info.value.from_state, info.value.to_state) == ("done", "pending")
        session.rollback()
        task = session.get_one(Task, 1)
        task.status = "running"
        session.flush()
        session.commit()
    assert statuses_by_id(engine) == {1: "running"}


def test_a_status_set_during_the_next_flush_is_judged(engine: sa.Engine, service: str) -> None:
    """The stopped flush's change is dropped (``refresh``); the next flush changes another
    column only, and a ``before_update`` listener of the application's sets the status as
    the row is written: judged as the row goes out, not taken as the stopped flush's."""
    Sessions = rdb.ResilientSession(engine, service=service)
    stop = [True]

    def validate(session: Session, *args: Any) -> None:
        if stop[0]:
            raise Refused("title missing")

    def finish(mapper: Any, connection: Any, target: Task) -> None:
        if target.title == "finish":
            target.status = "done"  # pending -> done: illegal

    event.listen(Task, "before_update", finish)
    try:
        with Sessions() as session:
            event.listen(session, "before_flush", validate)
            task = session.get_one(Task, 1)
            task.status = "running"
            with pytest.raises(Refused):
                session.flush()
            stop[0] = False
            session.refresh(task)
            task.title = "finish"
            with pytest.raises(rdb.IllegalTransitionError) as info:
                session.flush()
            assert (info.value.from_state, info.value.to_state) == ("pending", "done")
    finally:
        event.remove(Task, "before_update", finish)
    assert statuses_by_id(engine) == {1: "pending"}
