"""A status column that is a foreign key to a table of states, written by the ORM from a related
object (``task.state = session.get(State, "running")``, ``pending.tasks.append(Task())``), and
the bulk guard's condition under SQLAlchemy's ``"evaluate"`` synchronization.

- A new row whose status the flush copies from a related object was refused before the copy
  (``(new row) -> None``), even in its initial state, although docs/transition-guard.md promises
  such a row is judged as set: it is judged when inserted now.
- A new row whose relationship to its state has ``post_update=True`` was inserted in its
  column's default state, then moved by SQLAlchemy's second UPDATE to the related state, which
  no one judged: ``Late(state=done)`` was committed as a new row in 'done' (without the
  trigger). The related state is judged as the state the row starts in.
- A status moved through a many-to-one relationship had no compare-and-set: the flush judged
  it under lock from the state the row held then, so two workers claiming one task (pending ->
  running) both committed, the second overwriting the first's claim. It is judged from the
  loaded state and compare-and-set, as a status set on the column is.
- A bulk UPDATE under ``"evaluate"`` (or SQLAlchemy's default ``"auto"``) had the guard's legal
  condition evaluated against the session's objects, whose states may be older than the rows':
  an object kept its old state while its row moved. Such an UPDATE is synchronized by
  ``"fetch"`` (RETURNING: no round trip more).

Real server, real concurrent transactions, psycopg and asyncpg; plain ``sessionmaker`` is the
oracle where the outcome is not the guard's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import resilient_db as rdb
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


class State(Base):
    __tablename__ = "states"
    code: Mapped[str] = mapped_column(sa.String(20), primary_key=True)
    tasks: Mapped[list[Task]] = relationship(back_populates="state")


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="state_code",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(20), default="")
    state_code: Mapped[str] = mapped_column(sa.ForeignKey("states.code"))
    state: Mapped[State] = relationship(back_populates="tasks")


class Late(Base):
    """The status written through a relationship with ``post_update=True``: SQLAlchemy inserts
    the row with the column as it is (its default), then sets it by an UPDATE of its own."""

    __tablename__ = "late_tasks"
    __transitions__ = rdb.TransitionRules(
        column="state_code",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    state_code: Mapped[str] = mapped_column(sa.ForeignKey("states.code"), default="pending")
    state: Mapped[State] = relationship(post_update=True)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.exec_driver_sql("INSERT INTO states VALUES ('pending'), ('running'), ('done')")
    yield eng
    eng.dispose()


def stored(engine: sa.Engine) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        query = "SELECT id, owner, state_code FROM tasks ORDER BY id"
        return [tuple(r) for r in conn.exec_driver_sql(query)]


def test_a_new_rows_status_from_a_related_object_is_judged_as_inserted(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions.begin() as session:
        pending = session.get_one(State, "pending")
        session.add(Task(id=1, state=pending))
        pending.tasks.append(Task(id=2))
    with Sessions() as session:
        session.add(Task(id=3, state=session.get_one(State, "done")))
        with pytest.raises(rdb.IllegalTransitionError) as started_done:
            session.commit()
    assert (started_done.value.to_state, started_done.value.inserted) == ("done", True)
    with Sessions() as session:
        session.add(Task(id=4))  # no status at all: still refused
        with pytest.raises(rdb.IllegalTransitionError) as no_status:
            session.commit()
    assert no_status.value.to_state is None
    assert stored(engine) == [(1, "", "pending"), (2, "", "pending")]


def test_a_new_rows_status_from_a_post_update_relationship_is_judged_as_inserted(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        session.add(Late(id=1, state=session.get_one(State, "done")))
        with pytest.raises(rdb.IllegalTransitionError) as started_done:
            session.commit()
    err = started_done.value
    assert (err.pk, err.from_state, err.to_state, err.inserted) == (1, None, "done", True)
    with Sessions.begin() as session:
        session.add(Late(id=2, state=session.get_one(State, "pending")))
    with Sessions.begin() as session:  # a row it holds already moves as any: judged, legal
        session.get_one(Late, 2).state = session.get_one(State, "running")
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, state_code FROM late_tasks").all()
    assert [tuple(r) for r in rows] == [(2, "running")]


def claim(session: Session, owner: str) -> None:
    task = session.get_one(Task, 1)
    task.owner = owner
    task.state = session.get_one(State, "running")


def test_two_workers_claiming_through_the_relationship(engine: sa.Engine, service: str) -> None:
    """Both load the pending task; A claims it and commits; B's claim, decided on 'pending',
    is stale (it overwrote A's before)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks VALUES (1, '', 'pending')")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as b:
        read = b.get_one(Task, 1)  # B reads 'pending' (and holds it: the identity map is weak)
        with Sessions.begin() as a:
            claim(a, "A")
        claim(b, "B")
        assert read.owner == "B"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            b.commit()
    assert (stale.value.from_state, stale.value.to_state) == ("pending", "running")
    assert "now holds 'running'" in stale.value.reason
    assert stored(engine) == [(1, "A", "running")]


def test_an_illegal_move_through_the_relationship_is_refused_before_anything_is_sent(
    engine: sa.Engine, service: str
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks VALUES (1, '', 'pending')")
    Sessions = rdb.ResilientSession(engine, service=service)

    def skip(session: Session) -> None:
        session.get_one(Task, 1).state = session.get_one(State, "done")

    with pytest.raises(rdb.IllegalTransitionError) as illegal:
        Sessions.run(skip)
    assert (illegal.value.from_state, illegal.value.to_state) == ("pending", "done")
    Sessions.run(lambda s: claim(s, "C"))
    assert stored(engine) == [(1, "C", "running")]


@pytest.mark.asyncio
async def test_async_claims_through_the_relationship(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks VALUES (1, '', 'pending')")
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        async with Sessions() as b:
            read = await b.get_one(Task, 1)  # (held: the identity map is weak)
            await Sessions.run(lambda s: s.run_sync(claim, "A"))
            await b.run_sync(claim, "B")
            assert read.owner == "B"
            with pytest.raises(rdb.StaleTransitionError):
                await b.commit()

        async def insert(session: AsyncSession) -> None:
            session.add(Task(id=2, state=await session.get_one(State, "pending")))

        await Sessions.run(insert)
    finally:
        await aengine.dispose()
    assert stored(engine) == [(1, "A", "running"), (2, "", "pending")]


@pytest.mark.parametrize("how", ["evaluate", "auto", None])
def test_a_bulk_update_leaves_the_sessions_objects_as_their_rows(
    engine: sa.Engine, service: str, how: str | None
) -> None:
    """The object was loaded 'pending'; another transaction moved its row to 'running'; the
    bulk UPDATE to 'done' is legal from the row's state and moves it. Under "evaluate" the
    guard's condition (state_code IN ('running')) was judged against the object's 'pending':
    the object stayed 'pending' while its row became 'done'. Now as plain SQLAlchemy: both
    'done'."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks VALUES (1, '', 'pending')")
    options = {} if how is None else {"synchronize_session": how}
    outcomes = []
    for factory in (rdb.ResilientSession(engine, service=service), sessionmaker(engine)):
        with factory() as session:
            task = session.get_one(Task, 1)
            with engine.begin() as other:
                other.exec_driver_sql("UPDATE tasks SET state_code = 'running'")
            update = sa.update(Task).where(Task.id == 1).values(state_code="done")
            result = session.execute(update, execution_options=options)
            outcomes.append((result.rowcount, task.state_code))  # type: ignore[attr-defined]
            session.rollback()
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE tasks SET state_code = 'pending'")  # (no trigger)
    assert outcomes == [(1, "done"), (1, "done")]
