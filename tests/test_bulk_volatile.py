"""An ORM bulk UPDATE setting a guarded status to a volatile SQL expression (``nextval()``,
``random()``, ``clock_timestamp()``, a VOLATILE function of the application's). The guard's
legal condition is a WHERE the server evaluates apart from the SET, so it judged one value of
the expression and the SET wrote another: ``update(Task).values(status=case((nextval('tick') %
2 == 0, 'pending'), else_=Task.status))`` moved done tasks back to 'pending', which the rules
forbid (the condition saw the row keep its state, the SET's own call of ``nextval`` took the
other branch). Without the trigger nothing stopped it. The SET now evaluates the expression
once per row and writes it only where that value may follow the row's state (the row keeps
its state otherwise): given in ``values()``, as the column's ``onupdate``, run over a list of
parameter sets, through an ``AsyncSession``.

Real server, no trigger installed: the session guards alone. ``nextval`` makes the second
evaluation differ from the first on every row, deterministically.

The check before such an UPDATE is a query of its own holding the statement's criteria: one
reading a data-modifying WITH (``delete(Queue)...returning(...).cte()``, the queue-pop
pattern) had the check run that DELETE (or INSERT) first, so the UPDATE found its queue rows
gone and moved nothing (while the DELETE committed), or failed on the INSERT's duplicate key.
The check of such a statement now runs inside a savepoint rolled back after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
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
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


#: every call of nextval('tick') is the next number: a second evaluation takes the other branch
TICK = sa.Sequence("tick")


def flip() -> Any:
    """'pending' on even ticks, the row's own state on odd ones."""
    return sa.case((sa.func.nextval("tick") % 2 == 0, "pending"), else_=Task.status)


class EditedDoc(Base):
    """An edit sends the row back to 'pending' or leaves it, as the clock ticks."""

    __tablename__ = "edited"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(
        sa.String(20),
        default="pending",
        onupdate=sa.case(
            (sa.func.nextval("tick") % 2 == 0, "pending"), else_=sa.literal_column("status")
        ),
    )


class Planned(Base):
    """The state planned next for a task (read by a correlated subquery)."""

    __tablename__ = "planned"
    task_id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))


class Queue(Base):
    """Tasks waiting for a worker: popped by a DELETE ... RETURNING the UPDATE reads."""

    __tablename__ = "queue"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int]


#: rows 1 and 2 may go back to pending (running), rows 3 and 4 may not (done)
ROWS = "(1, 'x', 'running'), (2, 'x', 'running'), (3, 'x', 'done'), (4, 'x', 'done')"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(
        pg_url,
        Base,
        f"CREATE SEQUENCE {TICK.name}",
        f"INSERT INTO tasks VALUES {ROWS}",
        f"INSERT INTO edited VALUES {ROWS}",
        "INSERT INTO queue VALUES (1, 1), (2, 2), (3, 3)",
    )


def legal_only(before: dict[int, str], after: dict[int, str]) -> None:
    for key, state in after.items():
        assert state == before[key] or state in RULES.next_states(before[key]), (key, before, after)


UNITS: dict[str, Callable[[Session], Any]] = {
    "values": lambda s: s.execute(sa.update(Task).values(status=flip())),
    "values, no sync": lambda s: s.execute(
        sa.update(Task).values(status=flip()), execution_options={"synchronize_session": False}
    ),
    "values, fetch": lambda s: s.execute(
        sa.update(Task).values(status=flip()), execution_options={"synchronize_session": "fetch"}
    ),
    "ordered_values": lambda s: s.execute(
        sa.update(Task).ordered_values((Task.body, "y"), (Task.status, flip()))
    ),
    "Query.update": lambda s: s.query(Task).update({"status": flip()}, synchronize_session=False),
    "parameter sets": lambda s: s.execute(
        sa.update(Task).where(Task.id == sa.bindparam("i")).values(status=flip()),
        [{"i": 1}, {"i": 2}, {"i": 3}, {"i": 4}],
        execution_options={"dml_strategy": "orm"},
    ),
}


@pytest.mark.parametrize("mode", ["filter", "raise"])
@pytest.mark.parametrize("how", sorted(UNITS))
def test_a_volatile_new_state_is_judged_as_written(
    engine: sa.Engine, service: str, how: str, mode: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))
    before = statuses_by_id(engine)
    try:
        Sessions.run(UNITS[how])
    except rdb.IllegalTransitionError:
        assert mode == "raise"
    after = statuses_by_id(engine)
    legal_only(before, after)
    assert after[3] == after[4] == "done"


def test_a_volatile_onupdate_is_judged_as_written(engine: sa.Engine, service: str) -> None:
    """The onupdate is evaluated once per row, by the check (ticks 1 to 4 in key order): rows 1
    and 3 keep their state, row 2 goes back to pending, and row 4, which it would send back to
    pending from done, is left out whole (its edit too), as a row a value's move can't make
    is; the others are edited."""
    Sessions = rdb.ResilientSession(engine, service=service)
    before = statuses_by_id(engine, "edited")
    Sessions.run(lambda s: s.execute(sa.update(EditedDoc).values(body="y")))
    after = statuses_by_id(engine, "edited")
    legal_only(before, after)
    assert after == {1: "running", 2: "pending", 3: "done", 4: "done"}
    with engine.connect() as conn:
        bodies = dict(conn.execute(sa.text("SELECT id, body FROM edited")).all())
    assert bodies == {1: "y", 2: "y", 3: "y", 4: "x"}


@pytest.mark.asyncio
async def test_a_volatile_new_state_is_judged_as_written_async(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    before = statuses_by_id(engine)

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.update(Task).values(status=flip()))

    try:
        await Sessions.run(unit)
    finally:
        await aengine.dispose()
    after = statuses_by_id(engine)
    legal_only(before, after)
    assert after[3] == after[4] == "done"


def test_a_correlated_subquery_is_still_correlated(engine: sa.Engine, service: str) -> None:
    """The new state read per row by a scalar subquery of the application's, correlated to the
    UPDATE's table, is still read for each row (the expression stays where it was given)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO planned VALUES (1, 'pending'), (3, 'pending')")
    Sessions = rdb.ResilientSession(engine, service=service)
    planned = sa.select(Planned.status).where(Planned.task_id == Task.id).scalar_subquery()
    new = sa.func.coalesce(planned, Task.status)
    Sessions.run(lambda s: s.execute(sa.update(Task).values(status=new)))
    assert statuses_by_id(engine) == {1: "pending", 2: "running", 3: "done", 4: "done"}


def test_a_legal_volatile_move_still_moves(engine: sa.Engine, service: str) -> None:
    """What the rules allow goes through: the running rows are each moved to 'pending' or
    left, as their one evaluation says; the session's objects follow their rows (the new
    state, an expression, is read back)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    stored_before = statuses_by_id(engine)

    def unit(session: Session) -> dict[int, str]:
        tasks = session.scalars(sa.select(Task).order_by(Task.id)).all()
        session.execute(sa.update(Task).where(Task.id <= 2).values(status=flip()))
        return {t.id: t.status for t in tasks}

    seen = Sessions.run(unit)
    after = statuses_by_id(engine)
    assert seen == after
    assert "pending" in (after[1], after[2])
    legal_only(stored_before, after)


class Ticket(Base):
    """NULL is a state: an open ticket may be unassigned (NULL) and back."""

    __tablename__ = "tickets"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"open": {"closed", None}, None: {"open"}},
        initial={"open"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str | None] = mapped_column(sa.String(20), default="open")


@pytest.mark.parametrize(
    "new",
    [
        pytest.param(
            lambda: sa.case((Ticket.id <= 2, sa.null()), else_=Ticket.status), id="stable"
        ),
        pytest.param(
            lambda: sa.case((sa.func.nextval("tick") % 2 == 0, sa.null()), else_=Ticket.status),
            id="volatile",
        ),
    ],
)
def test_a_new_state_of_null_is_judged_as_written(
    engine: sa.Engine, service: str, new: Callable[[], Any]
) -> None:
    """Moves to NULL, where the rules allow them, are made (row 1); from 'closed' they are not
    (rows 2, 4, 5); a row left alone keeps its state. The server compares ARRAY[NULL] with
    ARRAY[NULL] as equal."""
    rows = "(1, 'open'), (2, 'closed'), (3, NULL), (4, 'closed'), (5, 'closed')"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO tickets VALUES {rows}")
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.execute(sa.update(Ticket).values(status=new())))
    after = statuses_by_id(engine, "tickets")
    assert after[2] == after[4] == after[5] == "closed"
    assert after[1] in (None, "open")
    assert after[3] is None
    if "nextval" not in str(new()):
        assert after[1] is None


@pytest.mark.asyncio
async def test_a_new_state_of_null_is_judged_as_written_async(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    """The same through asyncpg, which types every parameter: the arrays compare."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tickets VALUES (1, 'open'), (2, 'closed'), (3, NULL)")
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)

    async def unit(session: AsyncSession) -> None:
        new = sa.case((Ticket.id <= 2, sa.null()), else_=Ticket.status)
        await session.execute(sa.update(Ticket).values(status=new))

    try:
        await Sessions.run(unit)
    finally:
        await aengine.dispose()
    assert statuses_by_id(engine, "tickets") == {1: None, 2: "closed", 3: None}


def popped(*task_ids: int) -> Any:
    """The queue's rows of ``task_ids``, deleted: the ids they held (a data-modifying WITH)."""
    taken = sa.delete(Queue).where(Queue.task_id.in_(task_ids)).returning(Queue.task_id)
    return taken.cte("popped")


def queued(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT task_id FROM queue ORDER BY id")))


def back_to_pending(taken: Any) -> Any:
    return (
        sa.update(Task)
        .where(Task.id.in_(sa.select(taken.c.task_id)))
        .values(status="pending")
        .add_cte(taken)
    )


CTE_UNITS: dict[str, tuple[Callable[[Session], Any], dict[int, str], list[int]]] = {
    # the unit, then the states and the queue it leaves
    "DELETE": (
        lambda s: s.execute(back_to_pending(popped(1, 2))),
        {1: "pending", 2: "pending", 3: "done", 4: "done"},
        [3],
    ),
    "INSERT": (
        lambda s: s.execute(
            back_to_pending(
                sa.insert(Queue).values(id=9, task_id=1).returning(Queue.task_id).cte("pushed")
            )
        ),
        {1: "pending", 2: "running", 3: "done", 4: "done"},
        [1, 2, 3, 1],
    ),
    "DELETE, parameter sets": (
        lambda s: s.execute(
            back_to_pending(
                sa.delete(Queue)
                .where(Queue.task_id == sa.bindparam("i"))
                .returning(Queue.task_id)
                .cte("popped")
            ),
            [{"i": 1}, {"i": 2}],
            execution_options={"dml_strategy": "orm", "synchronize_session": False},
        ),
        {1: "pending", 2: "pending", 3: "done", 4: "done"},
        [3],
    ),
    "DELETE, read by the new state": (
        lambda s: s.execute(
            sa.update(Task)
            .where(Task.id <= 2)
            .values(
                status=sa.case(
                    (Task.id.in_(sa.select(popped(1).c.task_id)), "pending"), else_=Task.status
                )
            )
        ),
        {1: "pending", 2: "running", 3: "done", 4: "done"},
        [2, 3],
    ),
}


@pytest.mark.parametrize("mode", ["filter", "raise"])
@pytest.mark.parametrize("how", sorted(CTE_UNITS))
def test_a_data_modifying_with_runs_once(
    engine: sa.Engine, service: str, how: str, mode: str
) -> None:
    """Legal moves of the rows a data-modifying WITH picks are made, and its change made once:
    the check before the UPDATE doesn't leave the UPDATE without its rows, nor take the key
    the INSERT then finds taken."""
    unit, states, queue = CTE_UNITS[how]
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))
    Sessions.run(unit)
    assert statuses_by_id(engine) == states
    assert queued(engine) == queue


@pytest.mark.parametrize("mode", ["filter", "raise"])
def test_a_data_modifying_with_picking_an_illegal_move(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """The rows the WITH picks are judged as ever: the done task 3 stays done; in filter mode
    the legal move of task 1 is made (the queue's rows are taken once), in raise mode nothing
    is, the queue left whole."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update=mode))
    if mode == "raise":
        with pytest.raises(rdb.IllegalTransitionError) as info:
            Sessions.run(lambda s: s.execute(back_to_pending(popped(1, 3))))
        assert (info.value.pk, info.value.from_state) == (3, "done")
        assert statuses_by_id(engine) == {1: "running", 2: "running", 3: "done", 4: "done"}
        assert queued(engine) == [1, 2, 3]
        return
    Sessions.run(lambda s: s.execute(back_to_pending(popped(1, 3))))
    assert statuses_by_id(engine) == {1: "pending", 2: "running", 3: "done", 4: "done"}
    assert queued(engine) == [2]


@pytest.mark.asyncio
async def test_a_data_modifying_with_runs_once_async(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)

    async def unit(session: AsyncSession) -> None:
        await session.execute(back_to_pending(popped(1, 3)))

    try:
        await Sessions.run(unit)
    finally:
        await aengine.dispose()
    assert statuses_by_id(engine) == {1: "pending", 2: "running", 3: "done", 4: "done"}
    assert queued(engine) == [2]


@pytest.mark.parametrize("mode", ["filter", "raise"])
def test_a_data_modifying_with_in_autocommit(engine: sa.Engine, service: str, mode: str) -> None:
    """Without a transaction the check's change can't be undone: the check is left out in
    filter mode (the UPDATE's condition alone keeps task 3 done), the statement refused in
    raise mode, before anything is sent."""
    Sessions = rdb.ResilientSession(
        engine.execution_options(isolation_level="AUTOCOMMIT"),
        service=service,
        config=rdb.Config(bulk_update=mode),
    )

    def unit(session: Session) -> None:
        session.execute(back_to_pending(popped(1, 3)))

    if mode == "raise":
        with pytest.raises(rdb.TransitionRulesError, match=r"AUTOCOMMIT mode.*in a transaction"):
            Sessions.run(unit)
        assert statuses_by_id(engine) == {1: "running", 2: "running", 3: "done", 4: "done"}
        assert queued(engine) == [1, 2, 3]
        return
    Sessions.run(unit)
    assert statuses_by_id(engine) == {1: "pending", 2: "running", 3: "done", 4: "done"}
    assert queued(engine) == [2]
