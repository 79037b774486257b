"""A bulk UPDATE by primary key (a list of parameter sets) whose sets name the status by
another attribute mapping the same column (``legacy_status = column_property(tasks.c.status)``,
kept for an older API). SQLAlchemy writes the column from the attribute it maps the column to,
the one mapped last; the guard read the new state under the attribute the rules name, so
``update(Task)`` with ``[{"id": 1, "legacy_status": "pending"}]`` moved a done task back to
'pending', unjudged (without the trigger), and a set giving both attributes was judged by the
state SQLAlchemy does not write.
The state judged is the one SQLAlchemy writes: the attribute it maps the column to.

Real server, no trigger installed: the session guards alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

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
    title: Mapped[str] = mapped_column(sa.String(20), default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


#: the same column under a second attribute (declarative adds it to the mapper)
Task.legacy_status = column_property(Task.__table__.c.status)  # type: ignore[attr-defined]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(
        pg_url, Base, "INSERT INTO tasks VALUES (1, '', 'done'), (2, '', 'running')"
    )


def test_a_state_given_by_the_attribute_sqlalchemy_writes_is_judged(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    rows = [{"id": 1, "legacy_status": "pending"}, {"id": 2, "legacy_status": "done"}]
    Sessions.run(lambda s: s.execute(sa.update(Task), rows))
    assert statuses_by_id(engine) == {
        1: "done",
        2: "done",
    }  # the illegal set skipped, the legal made


def test_raise_mode_names_the_move_sqlalchemy_writes(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update="raise"))
    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(lambda s: s.execute(sa.update(Task), [{"id": 1, "legacy_status": "pending"}]))
    assert (info.value.from_state, info.value.to_state, info.value.via) == (
        "done",
        "pending",
        "orm-update",
    )
    assert statuses_by_id(engine) == {1: "done", 2: "running"}


def test_a_set_giving_both_attributes_is_judged_by_the_one_written(
    engine: sa.Engine, service: str
) -> None:
    """SQLAlchemy writes the column from the attribute it maps the column to (the one mapped
    last), whatever the other says: that state is the one judged."""
    Sessions = rdb.ResilientSession(engine, service=service)
    illegal = [{"id": 2, "status": "done", "legacy_status": "pending"}]
    Sessions.run(lambda s: s.execute(sa.update(Task), illegal))
    assert statuses_by_id(engine) == {1: "done", 2: "running"}
    legal = [{"id": 2, "status": "pending", "legacy_status": "done"}]
    Sessions.run(lambda s: s.execute(sa.update(Task), legal))
    assert statuses_by_id(engine) == {1: "done", 2: "done"}
