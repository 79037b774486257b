"""Paths the session guards don't judge, which docs/transition-guard.md leaves to the database
trigger (they were not in its table of paths): each is shown getting past the session guards and
blocked by the trigger.

- A class mapping a guarded table without ``__transitions__`` of its own (a second model of
  the same ``Table``, an admin tool's, an automap of the database): the session guards follow
  the class that declares the rules.
- A foreign-key action of the database (``ON UPDATE CASCADE``, ``ON DELETE SET NULL``) on a
  status that references a table of states: the server changes the rows, no session sees it.

Real server, psycopg."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb


class Base(DeclarativeBase):
    pass


class State(Base):
    __tablename__ = "states"
    code: Mapped[str] = mapped_column(sa.String(20), primary_key=True)


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str | None] = mapped_column(
        sa.String(20),
        sa.ForeignKey("states.code", onupdate="CASCADE", ondelete="SET NULL"),
        default="pending",
    )


class OtherBase(DeclarativeBase):
    pass


class TaskRow(OtherBase):
    """The same table mapped by another class without rules (an admin tool's, a reporting
    module's, an automap's)."""

    __table__ = Task.__table__


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.exec_driver_sql("INSERT INTO states VALUES ('pending'), ('running'), ('done')")
        conn.exec_driver_sql("INSERT INTO tasks VALUES (1, 'pending'), (2, 'done'), (3, 'done')")
    yield eng
    eng.dispose()


def install_trigger(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)


def stored(engine: sa.Engine) -> list[str | None]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT status FROM tasks ORDER BY id")))


def run(engine: sa.Engine, service: str, unit: object) -> BaseException | None:
    Sessions = rdb.ResilientSession(engine, service=service)
    try:
        Sessions.run(unit)  # type: ignore[call-overload]
    except Exception as exc:  # the outcome is the test's
        return exc
    return None


def flushed(session: Session) -> None:
    row = session.get(TaskRow, 2)
    assert row is not None
    row.status = "pending"


def bulk_updated(session: Session) -> None:
    session.execute(sa.update(TaskRow).where(TaskRow.id == 2).values(status="pending"))


@pytest.mark.parametrize("through_another_class", [flushed, bulk_updated])
def test_a_class_without_rules_is_left_to_the_trigger(
    engine: sa.Engine, service: str, through_another_class: Callable[[Session], None]
) -> None:
    """The session guards follow the class that declares the rules: another class of the same
    table moves its rows unjudged (what docs/transition-guard.md says); the trigger blocks that
    move."""
    assert run(engine, service, through_another_class) is None
    assert stored(engine) == ["pending", "pending", "done"]
    install_trigger(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE tasks DISABLE TRIGGER USER")
        conn.exec_driver_sql("UPDATE tasks SET status = 'done' WHERE id = 2")
        conn.exec_driver_sql("ALTER TABLE tasks ENABLE TRIGGER USER")
    err = run(engine, service, through_another_class)
    assert isinstance(err, rdb.IllegalTransitionError)
    assert (err.via, err.model, err.from_state, err.to_state) == ("db", "Task", "done", "pending")
    assert stored(engine) == ["pending", "done", "done"]


@pytest.mark.parametrize(
    "action",
    [
        "UPDATE states SET code = 'finished' WHERE code = 'done'",  # ON UPDATE CASCADE
        "DELETE FROM states WHERE code = 'done'",  # ON DELETE SET NULL
    ],
)
def test_the_trigger_blocks_a_foreign_key_action(
    engine: sa.Engine, service: str, action: str
) -> None:
    """A foreign-key action moves the status in the server, where only the trigger sees it;
    without the trigger the rows move (an undeclared state, or NULL)."""
    install_trigger(engine)

    def unit(session: Session) -> None:
        session.execute(sa.text(action))

    err = run(engine, service, unit)
    assert isinstance(err, rdb.IllegalTransitionError)
    assert (err.via, err.from_state) == ("db", "done")
    assert stored(engine) == ["pending", "done", "done"]
    with engine.begin() as conn:
        rdb.uninstall_transition_trigger(conn, Task)
    assert run(engine, service, unit) is None
    assert stored(engine)[1:] in (["finished", "finished"], [None, None])
