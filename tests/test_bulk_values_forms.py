"""Forms of ``update(Model).values(status=...)`` and of its parameter sets that the ORM bulk-UPDATE
guard judges and no other test wrote: a status set to ``null()``, to a parameter whose value a
Python callable gives (``bindparam(callable_=...)``), an UPDATE of the model aliased over another
table (which names no row of its table: refused saying so), and a list of parameter sets
with criteria (``dml_strategy="core_only"``) of which the guard rejects every one (nothing
is sent). Real server, the session guard alone (no trigger)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column

import resilient_db as rdb
from resilient_db import Config


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
    status: Mapped[str | None] = mapped_column(sa.String(20))


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(
        pg_url, Base, "INSERT INTO tasks VALUES (1, 'pending'), (2, 'done'), (3, 'pending')"
    )


def test_a_status_set_to_null_is_judged_as_none(engine: sa.Engine, service: str) -> None:
    """None is no state: filtered out (nothing written), or refused naming it."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        result = session.execute(sa.update(Task).where(Task.id == 1).values(status=sa.null()))
        assert result.rowcount == 0  # type: ignore[attr-defined]
        session.commit()
    Raising = rdb.ResilientSession(engine, service=service, config=Config(bulk_update="raise"))
    with Raising() as session, pytest.raises(rdb.IllegalTransitionError) as info:
        session.execute(sa.update(Task).where(Task.id == 1).values(status=sa.null()))
    assert (info.value.via, info.value.pk, info.value.from_state, info.value.to_state) == (
        "orm-update",
        1,
        "pending",
        None,
    )
    assert statuses_by_id(engine) == {1: "pending", 2: "done", 3: "pending"}


def test_a_status_a_callable_gives_is_judged_by_its_value(engine: sa.Engine, service: str) -> None:
    """``bindparam(callable_=...)``: the value the callable returns, called as the guard judges
    the statement, is the state judged (and the one written)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    given = iter(["running", "done"])
    target = sa.bindparam("target", callable_=lambda: next(given), type_=sa.String(20))
    with Sessions() as session:
        session.execute(sa.update(Task).where(Task.id == 1).values(status=target))
        session.commit()
    assert statuses_by_id(engine)[1] in ("running", "done")
    Raising = rdb.ResilientSession(engine, service=service, config=Config(bulk_update="raise"))
    late = sa.bindparam("late", callable_=lambda: "done", type_=sa.String(20))
    with Raising() as session, pytest.raises(rdb.IllegalTransitionError) as info:
        session.execute(sa.update(Task).where(Task.id == 3).values(status=late))
    assert (info.value.pk, info.value.from_state, info.value.to_state) == (3, "pending", "done")
    assert statuses_by_id(engine)[3] == "pending"


def test_an_update_of_the_model_aliased_over_another_table_is_refused(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    archive = sa.Table(
        "tasks_archive",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(20)),
    )
    elsewhere = aliased(Task, archive.alias(), adapt_on_names=True)
    with Sessions() as session, pytest.raises(rdb.TransitionRulesError) as info:
        session.execute(sa.update(elsewhere).where(elsewhere.id == 2).values(status="pending"))
    assert "not an alias of its table 'tasks'" in str(info.value)
    assert "update(Task) instead" in str(info.value)
    assert statuses_by_id(engine) == {1: "pending", 2: "done", 3: "pending"}


def test_parameter_sets_with_criteria_all_rejected_send_nothing(
    engine: sa.Engine, service: str
) -> None:
    """Every set of an UPDATE with criteria over a list of parameter sets moves its row
    illegally: none is sent, the result is empty."""
    Sessions = rdb.ResilientSession(engine, service=service)
    statement = (
        sa.update(Task)
        .where(Task.id == sa.bindparam("key"))
        .values(status=sa.bindparam("target"))
        .execution_options(synchronize_session=False, dml_strategy="core_only")
    )
    with Sessions() as session:
        result = session.execute(
            statement, [{"key": 2, "target": "pending"}, {"key": 3, "target": "done"}]
        )
        assert result.rowcount == 0  # type: ignore[attr-defined]
        session.commit()
    assert statuses_by_id(engine) == {1: "pending", 2: "done", 3: "pending"}


def test_a_bulk_update_by_primary_key_with_keys_of_mixed_types(
    engine: sa.Engine, service: str
) -> None:
    """Keys given as an int and as a string (which PostgreSQL matches as the UPDATE does):
    the rows are read and judged all the same (the keys can't be sorted by value), the legal
    set sent, the illegal one left out."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        session.execute(
            sa.update(Task),
            [{"id": 1, "status": "running"}, {"id": "2", "status": "pending"}],
        )
        session.commit()
    assert statuses_by_id(engine) == {1: "running", 2: "done", 3: "pending"}
