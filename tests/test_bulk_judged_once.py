"""An ORM bulk UPDATE whose criteria (or new state) are not stable between two evaluations: the
guard's check before the UPDATE is a query of its own, and it evaluated the statement's
criteria once, the UPDATE a second time. ``WHERE nextval('tick') IN (1, 7)`` judged one row
and the UPDATE changed another (or none); a function that writes (an audit row per call) wrote
twice; ``nextval`` advanced twice; a subquery reading another table picked, in the UPDATE, a
row another transaction queued after the check, never judged (raise mode answered "done" for
a statement whose UPDATE met an illegal move and left it out unseen). The UPDATE's own legal
condition kept every illegal move out all along; what differed was which rows were judged.
Such criteria are now evaluated once, by the check, which locks and returns the keys of the
rows they match; the UPDATE is restricted to those keys (same number of statements).

A bulk UPDATE by primary key judged a parameter set whose row did not exist at the check as
"changes nothing" and sent it as it was: a row another transaction inserted and committed in
between (``pending``) was moved by it (to ``done``, which the rules forbid from ``pending``).
Such a set is now left out (judged as the check found the row: absent).

Real server, no trigger installed (the session guards alone); ``nextval`` makes a second
evaluation differ from the first, deterministically; another transaction runs on a connection
of its own from a ``before_cursor_execute`` listener, just before the UPDATE is sent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb

RULES = rdb.TransitionRules(
    column="status",
    transitions={"pending": {"running"}, "running": {"done", "pending"}},
    initial={"pending"},
)


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


class Queue(Base):
    __tablename__ = "queue"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int]


class Pair(Base):
    """A composite primary key."""

    __tablename__ = "pairs"
    __transitions__ = RULES
    a: Mapped[int] = mapped_column(primary_key=True)
    b: Mapped[str] = mapped_column(sa.String(5), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


ROWS = "(1, 'running'), (2, 'running'), (3, 'done'), (4, 'done')"

#: writes an audit row per call: a side effect a second evaluation repeats
AUDITED = """
CREATE FUNCTION audited(task integer) RETURNS boolean LANGUAGE sql VOLATILE AS $$
    INSERT INTO audit VALUES (task);
    SELECT task <= 2;
$$"""


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(
        pg_url,
        Base,
        "CREATE SEQUENCE tick",
        "CREATE TABLE audit (task integer)",
        AUDITED,
        f"INSERT INTO tasks VALUES {ROWS}",
        "INSERT INTO pairs VALUES (1, 'x', 'running'), (2, 'x', 'done')",
        "INSERT INTO queue VALUES (1, 2)",
    )


def scalar(engine: sa.Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql(sql).scalar()


def ticks(engine: sa.Engine) -> int:
    """How many times ``nextval('tick')`` ran."""
    return int(scalar(engine, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM tick"))


def tick() -> Any:
    return sa.func.nextval("tick")


MODES = pytest.mark.parametrize("mode", ["filter", "raise"])


@MODES
def test_volatile_criteria_change_the_rows_judged(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """The check's evaluation matches task 1 (tick 1 of 4), a legal move: the UPDATE moves
    task 1, and nextval runs once per row. Before, the UPDATE's own evaluation (ticks 5 to 8)
    matched task 3 (tick 7), done, which its condition left out: nothing moved, and raise mode
    answered done for it."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))
    Sessions.run(
        lambda s: s.execute(sa.update(Task).where(tick().in_([1, 7])).values(status="pending"))
    )
    assert statuses_by_id(engine) == {1: "pending", 2: "running", 3: "done", 4: "done"}
    assert ticks(engine) == 4


@MODES
def test_volatile_criteria_judged_illegal(engine: sa.Engine, service: str, mode: str) -> None:
    """The check's evaluation matches task 3 (tick 3), done: raise mode refuses, filter mode
    leaves it out; the UPDATE does not go on to move task 1 (its own tick 5), never judged."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))

    def unit(session: Session) -> None:
        session.execute(sa.update(Task).where(tick().in_([3, 5])).values(status="pending"))

    if mode == "raise":
        with pytest.raises(rdb.IllegalTransitionError) as info:
            Sessions.run(unit)
        assert (info.value.pk, info.value.from_state) == (3, "done")
    else:
        Sessions.run(unit)
    assert statuses_by_id(engine) == {1: "running", 2: "running", 3: "done", 4: "done"}
    assert ticks(engine) == 4


@MODES
def test_a_writing_function_in_the_criteria_runs_once_per_row(
    engine: sa.Engine, service: str, mode: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))
    Sessions.run(
        lambda s: s.execute(
            sa.update(Task).where(sa.func.audited(Task.id)).values(status="pending")
        )
    )
    assert statuses_by_id(engine) == {1: "pending", 2: "pending", 3: "done", 4: "done"}
    assert scalar(engine, "SELECT count(*) FROM audit") == 4


def another_transaction(engine: sa.Engine, session: Session, sql: str) -> list[str]:
    """Run ``sql`` on a connection of its own, committed, once, just before the session sends
    an UPDATE; the UPDATEs seen are returned (filled as they are sent)."""
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            if not seen:
                with engine.begin() as other:
                    other.exec_driver_sql(sql)
            seen.append(statement)

    event.listen(session.get_bind(), "before_cursor_execute", before)
    return seen


def test_criteria_reading_another_table_change_the_rows_judged(
    engine: sa.Engine, service: str
) -> None:
    """The first queued task (task 2, legal) is judged and moved, though another transaction
    queues task 1 (and done task 3) before the UPDATE runs: the UPDATE moves the row the check
    judged and locked. Before, it re-read the queue and moved task 1 instead, never judged
    (and met task 3's illegal move, left out without a word in raise mode)."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update="raise"))
    first = sa.select(sa.func.min(Queue.task_id)).scalar_subquery()

    def unit(session: Session) -> list[str]:
        seen = another_transaction(engine, session, "INSERT INTO queue VALUES (2, 1), (3, 3)")
        session.execute(sa.update(Task).where(Task.id == first).values(status="pending"))
        return seen

    assert len(Sessions.run(unit)) == 1
    assert statuses_by_id(engine) == {1: "running", 2: "pending", 3: "done", 4: "done"}


@MODES
def test_a_volatile_new_state_is_evaluated_once_per_row(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """``nextval`` in the new state runs once per matched row, and the state written is the
    one judged: task 1 (tick 1) keeps its state, task 2 (tick 2) goes back to pending. Before,
    the UPDATE's condition and SET evaluated it again, several times per row."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))
    flip = sa.case((tick() % 2 == 0, "pending"), else_=Task.status)
    Sessions.run(lambda s: s.execute(sa.update(Task).where(Task.id <= 2).values(status=flip)))
    assert statuses_by_id(engine) == {1: "running", 2: "pending", 3: "done", 4: "done"}
    assert ticks(engine) == 2


def test_a_volatile_new_state_judged_illegal_in_raise_mode(engine: sa.Engine, service: str) -> None:
    """The check's value for task 3 (tick 2: pending) is an illegal move: refused, nothing
    written; in filter mode task 3 is left out and task 2 (tick 1: its own state) untouched."""
    flip = sa.case((tick() % 2 == 0, "pending"), else_=Task.status)
    stmt = sa.update(Task).where(Task.id >= 2).values(status=flip)
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update="raise"))
    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(lambda s: s.execute(stmt))
    assert (info.value.pk, info.value.from_state, info.value.to_state) == (3, "done", "pending")
    assert statuses_by_id(engine) == {1: "running", 2: "running", 3: "done", 4: "done"}


@MODES
def test_composite_keys(engine: sa.Engine, service: str, mode: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))
    Sessions.run(lambda s: s.execute(sa.update(Pair).where(tick() == 1).values(status="pending")))
    assert statuses_by_id_pairs(engine) == {(1, "x"): "pending", (2, "x"): "done"}
    assert ticks(engine) == 2


def statuses_by_id_pairs(engine: sa.Engine) -> dict[tuple[int, str], str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT a, b, status FROM pairs ORDER BY a, b").all()
    return {(a, b): status for a, b, status in rows}


@pytest.mark.asyncio
async def test_volatile_criteria_async(engine: sa.Engine, pg_async_url: str, service: str) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.update(Task).where(tick().in_([1, 7])).values(status="pending"))

    try:
        await Sessions.run(unit)
    finally:
        await aengine.dispose()
    assert statuses_by_id(engine) == {1: "pending", 2: "running", 3: "done", 4: "done"}
    assert ticks(engine) == 4


def counted(engine: sa.Engine, unit: Callable[[Session], Any], service: str) -> int:
    """The statements a unit running ``unit`` sends (BEGIN and COMMIT are not cursor
    statements)."""
    sent: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        rdb.ResilientSession(engine, service=service).run(unit)
    finally:
        event.remove(engine, "before_cursor_execute", before)
    return len(sent)


@pytest.mark.parametrize(
    "criteria",
    [
        pytest.param(lambda: Task.id <= 2, id="plain"),
        pytest.param(lambda: tick().in_([1, 2]), id="volatile"),
        pytest.param(
            lambda: Task.id <= sa.select(sa.func.max(Queue.task_id)).scalar_subquery(),
            id="subquery",
        ),
    ],
)
def test_statements_sent(engine: sa.Engine, service: str, criteria: Callable[[], Any]) -> None:
    """A legal bulk UPDATE sends the check and the UPDATE, as before, whatever its criteria."""
    n = counted(
        engine,
        lambda s: s.execute(sa.update(Task).where(criteria()).values(status="pending")),
        service,
    )
    assert statuses_by_id(engine) == {1: "pending", 2: "pending", 3: "done", 4: "done"}
    assert n == 2


@MODES
def test_by_primary_key_a_row_inserted_after_the_check(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """Task 5 does not exist when the check reads the rows; another transaction inserts it
    (pending) before the UPDATE: the set naming it is left out (pending may not go to done).
    Task 1's set goes through."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))

    def unit(session: Session) -> list[str]:
        seen = another_transaction(engine, session, "INSERT INTO tasks VALUES (5, 'pending')")
        session.execute(sa.update(Task), [{"id": 1, "status": "done"}, {"id": 5, "status": "done"}])
        return seen

    assert Sessions.run(unit)
    assert statuses_by_id(engine) == {1: "done", 2: "running", 3: "done", 4: "done", 5: "pending"}
