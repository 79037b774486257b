"""A new row whose status a ``post_update=True`` relationship writes from a related row the
same flush makes, whose key the database gives (a serial): SQLAlchemy inserts the row with the
column's default, inserts the related row, then sets the status by an UPDATE of its own. The
flush guard judged the related state as the state the row starts in only when the related key
was known before the flush; here it was not, and that UPDATE was judged by no one: without the
trigger, ``Task(state=State(name="done"))`` was committed in a state no new row may start in.
The row is now recorded when the flush starts, and the UPDATE judged when it is sent (the state
it writes must be an initial state), without reading anything.

Real server; psycopg and asyncpg. No trigger installed: the flush guard alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sent import Sent
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import resilient_db as rdb
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


class State(Base):
    __tablename__ = "states"
    id: Mapped[int] = mapped_column(primary_key=True)  # a serial: the database gives it
    name: Mapped[str]


class Task(Base):
    """States 1 and 2 may start a row; 3 may not."""

    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="state_id", transitions={1: {2}, 2: {3}}, initial={1, 2}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    state_id: Mapped[int] = mapped_column(sa.ForeignKey("states.id"), default=1)
    state: Mapped[State] = relationship(post_update=True)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.exec_driver_sql("INSERT INTO states (name) VALUES ('pending')")  # id 1
        conn.exec_driver_sql("INSERT INTO tasks VALUES (10, 1)")
    yield eng
    eng.dispose()


def stored(engine: sa.Engine) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, state_id FROM tasks ORDER BY id")
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_a_state_the_flush_makes(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    sent = Sent(engine)
    try:
        with Sessions.begin() as session:  # the new state gets id 2: may start a row
            session.add(Task(id=1, state=State(name="running")))
    finally:
        sent.stop()
    assert [s.split()[0] for s in sent.sql] == ["INSERT", "INSERT", "UPDATE"]  # nothing read
    with Sessions() as session:  # id 3: may not
        session.add(Task(id=2, state=State(name="done")))
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    err = refused.value
    assert (err.pk, err.from_state, err.to_state, err.inserted) == (2, None, 3, True)
    assert "new rows must start in one of: 1, 2" in err.reason
    with Sessions() as session:  # a row it holds already moves as any: judged as a move
        session.get_one(Task, 1).state = State(name="later")  # id 4: 2 may move to 3 only
        with pytest.raises(rdb.IllegalTransitionError) as moved:
            session.commit()
    assert (moved.value.from_state, moved.value.to_state, moved.value.inserted) == (2, 4, False)
    assert stored(engine) == [(1, 2), (10, 1)]


@pytest.mark.asyncio
async def test_async(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        async with Sessions() as session:
            session.add(Task(id=2, state=State(name="running")))
            session.add(Task(id=3, state=State(name="done")))
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                await session.commit()
    finally:
        await aengine.dispose()
    assert refused.value.to_state == 3
    assert stored(engine) == [(10, 1)]
