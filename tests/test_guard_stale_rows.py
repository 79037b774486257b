"""A flush moving several rows of one table, one of which another transaction had already moved
to the very state this flush writes: the compare-and-set UPDATE matches one row fewer, and the
row count (psycopg's executemany, sync and async) says how many, not which. The
StaleTransitionError named the first row of the UPDATE, which nobody else had touched; it now
names the row that moved (its current version was not written by this transaction), and the
409 body with row keys says the same. Where that can't be told (inside a savepoint, whose rows
carry the savepoint's own transaction id), no row is named (``pk`` None). asyncpg names the row
through the condition that makes the server raise (tests/test_transitions_async.py). Real
server, real concurrent transactions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import flush_behind
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer
from resilient_db.web import problem_details


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"in_progress", "cancelled"}, "in_progress": {"completed"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


class Run(Base):
    """Two guarded columns."""

    __tablename__ = "runs"
    __transitions__ = (
        rdb.TransitionRules(
            column="status", transitions={"new": {"run"}, "run": {"done"}}, initial={"new"}
        ),
        rdb.TransitionRules(column="phase", transitions={"a": {"b"}, "b": {"c"}}, initial={"a"}),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(8), default="new")
    phase: Mapped[str] = mapped_column(sa.String(5), default="a")


ROW_KEYS = rdb.load_config(environ={}).replace(log_row_keys=True)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.insert(Task), [{"id": n, "status": "pending"} for n in (1, 2, 3)])
    yield eng
    eng.dispose()


def stored(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT status FROM tasks ORDER BY id")))


def move_row_3(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress' WHERE id = 3")


def assert_names_row_3(err: rdb.StaleTransitionError) -> None:
    assert (err.pk, err.from_state, err.to_state, err.via) == (3, "pending", "in_progress", "flush")
    assert "another transaction had already moved the row to 'in_progress'" in err.reason
    assert problem_details(err, config=ROW_KEYS).body["pk"] == 3


def test_the_row_another_transaction_moved_to_the_same_state_is_named(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=ROW_KEYS)
    with Sessions() as session:
        for task in session.scalars(sa.select(Task).order_by(Task.id)):
            task.status = "in_progress"
        move_row_3(engine)
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.flush()
    assert_names_row_3(stale.value)
    assert stored(engine) == ["pending", "pending", "in_progress"]


def test_the_row_moved_while_the_update_waited_for_its_lock_is_named(
    engine: sa.Engine, service: str
) -> None:
    """The flush's UPDATE waits for the transaction holding row 3; once that one commits the
    same move, the UPDATE skips row 3 (the compare-and-set) and updates rows 1 and 2."""
    Sessions = rdb.ResilientSession(engine, service=service, config=ROW_KEYS)
    outcome: list[BaseException | None] = []
    with Sessions() as session, engine.connect() as winner:
        for task in session.scalars(sa.select(Task).order_by(Task.id)):
            task.status = "in_progress"
        winner.exec_driver_sql("UPDATE tasks SET status = 'in_progress' WHERE id = 3")
        outcome.append(flush_behind(session, winner, engine))
        session.rollback()
    [err] = outcome
    assert isinstance(err, rdb.StaleTransitionError), err
    assert_names_row_3(err)
    assert stored(engine) == ["pending", "pending", "in_progress"]


def test_inside_a_savepoint_no_row_is_named(engine: sa.Engine, service: str) -> None:
    """The savepoint's rows carry its own transaction id: who wrote which can't be told, so
    the error says so and names no row (it named row 1)."""
    Sessions = rdb.ResilientSession(engine, service=service, config=ROW_KEYS)
    with Sessions() as session:
        tasks = list(session.scalars(sa.select(Task).order_by(Task.id)))
        move_row_3(engine)
        with pytest.raises(rdb.StaleTransitionError) as stale:
            savepoint_flush(session, tasks)
    err = stale.value
    assert (err.pk, err.from_state, err.to_state) == (None, "pending", "in_progress")
    assert "which of them can't be told" in err.reason
    assert problem_details(err, config=ROW_KEYS).body["pk"] is None
    assert stored(engine) == ["pending", "pending", "in_progress"]


def savepoint_flush(session: Session, tasks: list[Task]) -> None:
    with session.begin_nested():
        for task in tasks:
            task.status = "in_progress"


@pytest.mark.asyncio
async def test_async_psycopg_names_the_row_another_transaction_moved(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    aengine = create_async_engine(pg_server.url(pg_database, driver="psycopg"))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service, config=ROW_KEYS)
        async with Sessions() as session:
            for task in await session.scalars(sa.select(Task).order_by(Task.id)):
                task.status = "in_progress"
            move_row_3(engine)
            with pytest.raises(rdb.StaleTransitionError) as stale:
                await session.flush()
        assert_names_row_3(stale.value)
        assert stored(engine) == ["pending", "pending", "in_progress"]
    finally:
        await aengine.dispose()


@pytest.mark.parametrize(
    "rewrite",
    [
        "UPDATE tasks SET id = id WHERE id = 1",
        "UPDATE tasks SET status = status WHERE id = 1",
    ],
)
def test_a_row_this_transaction_rewrote_after_another_moved_it_is_still_stale(
    engine: sa.Engine, service: str, rewrite: str
) -> None:
    """Under READ COMMITTED this transaction's own UPDATE of the row (leaving its status as it
    is) writes a new version of the row another transaction had moved: its ``xmin`` is then
    this transaction's, yet the status is the other's. So a row's ``xmin`` never makes a
    missed compare-and-set "moved by this transaction itself" (a change tried and taken back:
    it let a cancel decided on 'pending' overwrite another worker's claim)."""
    Sessions = rdb.ResilientSession(engine, service=service, config=ROW_KEYS)
    with Sessions() as session:
        task = session.get_one(Task, 1)
        move_row_3(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress' WHERE id = 1")
        session.execute(sa.text(rewrite))
        task.status = "cancelled"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    assert "now holds 'in_progress'" in stale.value.reason
    assert stored(engine) == ["in_progress", "pending", "in_progress"]


def test_a_flush_renumbering_its_rows_names_the_row_that_moved(
    engine: sa.Engine, service: str
) -> None:
    """Rows 1 and 3 get new keys and a new status in one UPDATE; another transaction had moved
    row 3. Row 1, renumbered by the UPDATE itself, is not found by its loaded key: it was
    named ("the row no longer exists", pk 1). Row 3 moved elsewhere than the UPDATE's state
    is named; moved to that very state, which row the UPDATE missed can't be told (no row is
    named, rather than a wrong one)."""
    Sessions = rdb.ResilientSession(engine, service=service, config=ROW_KEYS)
    for moved_to, named in (("cancelled", 3), ("in_progress", None)):
        with Sessions() as session:
            one, three = session.get_one(Task, 1), session.get_one(Task, 3)
            with engine.begin() as conn:
                conn.exec_driver_sql(f"UPDATE tasks SET status = '{moved_to}' WHERE id = 3")
            one.id, three.id = 51, 53
            one.status = three.status = "in_progress"
            with pytest.raises(rdb.StaleTransitionError) as stale:
                session.flush()
        assert stale.value.pk == named
        assert "no longer exists" not in stale.value.reason
        assert stored(engine) == ["pending", "pending", moved_to]
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE tasks SET status = 'pending'")


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg-sync", "psycopg", "asyncpg"])
@pytest.mark.parametrize("rows", [[1, 2, 3], [3]])
async def test_of_two_guarded_columns_the_one_that_moved_is_named(
    engine: sa.Engine, pg_url: str, driver: str, rows: list[int], service: str
) -> None:
    """Another transaction moved only the phase of row 3, to the phase this flush writes; its
    status still holds 'new', where the flush writes 'run': the flush did not update the row.
    A many-row flush on psycopg named the status, and said another transaction had moved the
    row to 'run'; it names the phase now, as a one-row flush did."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Run), [{"id": n, "status": "new", "phase": "a"} for n in (1, 2, 3)])

    def move_phase_of_row_3() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE runs SET phase = 'b' WHERE id = 3")

    if driver == "psycopg-sync":
        with rdb.ResilientSession(engine, service=service, config=ROW_KEYS)() as session:
            runs = [session.get_one(Run, n) for n in rows]
            move_phase_of_row_3()
            for run in runs:
                run.status, run.phase = "run", "b"
            with pytest.raises(rdb.StaleTransitionError) as stale:
                session.flush()
    else:
        aengine = create_async_engine(sa.make_url(pg_url).set(drivername=f"postgresql+{driver}"))
        try:
            Sessions = rdb.AsyncResilientSession(aengine, service=service, config=ROW_KEYS)
            async with Sessions() as asession:
                runs = [await asession.get_one(Run, n) for n in rows]
                move_phase_of_row_3()
                for run in runs:
                    run.status, run.phase = "run", "b"
                with pytest.raises(rdb.StaleTransitionError) as stale:
                    await asession.flush()
        finally:
            await aengine.dispose()
    err = stale.value
    assert (err.pk, err.column, err.from_state, err.to_state) == (3, "phase", "a", "b")
    assert "the row now holds 'b'" in err.reason
    with engine.connect() as conn:
        held = conn.exec_driver_sql("SELECT id, status, phase FROM runs ORDER BY id").all()
    assert [tuple(r) for r in held] == [(1, "new", "a"), (2, "new", "a"), (3, "new", "b")]
