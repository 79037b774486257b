"""Two unrelated classes (not one inheritance hierarchy) mapping one table, each guarding its
status by rules of its own, and a status a ``before_update`` listener sets during the flush,
on a row whose status no one changed before the flush. That row was judged by the rules of the
class the flush met first for the table (the session's object of the row was looked up as an
object of that class, which it is not): a ``Strict`` row went from ``running`` to ``done``,
which its rules forbid, because a ``Loose`` row was updated in the same flush. It is now judged
by its own class's rules. Real server, no trigger (none can enforce two sets of rules)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped

import resilient_db as rdb


class Base(DeclarativeBase):
    pass


TABLE = sa.Table(
    "tasks",
    Base.metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("note", sa.String(20), nullable=False, default=""),
    sa.Column("status", sa.String(20), nullable=False),
)


class Loose(Base):
    __table__ = TABLE
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done", "failed"}},
        initial={"pending"},
    )
    id: Mapped[int]
    note: Mapped[str]
    status: Mapped[str]


class Strict(Base):
    __table__ = TABLE
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"failed"}},
        initial={"pending"},
    )
    id: Mapped[int]
    note: Mapped[str]
    status: Mapped[str]


def _done_when_noted(mapper: Any, connection: Any, target: Any) -> None:
    if target.note == "done":
        target.status = "done"  # legal for a Loose row, not for a Strict one


event.listen(Loose, "before_update", _done_when_noted)
event.listen(Strict, "before_update", _done_when_noted)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(
        pg_url, Base, "INSERT INTO tasks VALUES (1, '', 'running'), (2, '', 'running')"
    )


def test_a_status_set_during_the_flush_is_judged_by_its_own_class(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Any) -> None:
        # each row's status is set by the listener alone, during the flush: the row of the
        # class the flush noted second was judged by the first one's rules (which of the two
        # that is depends on the order of a set: either way one row was misjudged)
        loose, strict = session.get_one(Loose, 1), session.get_one(Strict, 2)
        loose.note = strict.note = "done"  # one flush

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(unit)
    err = info.value
    assert (err.model, err.pk, err.from_state, err.to_state) == ("Strict", 2, "running", "done")
    assert statuses_by_id(engine) == {1: "running", 2: "running"}


def test_a_legal_status_set_during_the_flush_goes_through(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Any) -> None:
        loose, strict = session.get_one(Loose, 1), session.get_one(Strict, 2)
        loose.note, strict.note = "done", "x"

    Sessions.run(unit)
    assert statuses_by_id(engine) == {1: "done", 2: "running"}
