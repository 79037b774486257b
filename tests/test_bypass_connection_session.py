"""``bypass_transitions(connection)`` and a session bound to that connection
(``Session(bind=connection)``, the way to join a transaction begun outside the session). The
bypass was bound on the connection's transaction and audited, and the trigger let that
transaction's moves through, but the session guards of a session working in the very same
transaction stayed on: its flush and its bulk UPDATEs were judged, a repair refused at flush
that raw SQL on the same connection made. The session's guards are now off too while the
connection's bypassed transaction lasts; a later transaction on the connection, a session
bound to the engine, and a session with other binds are guarded as before. Real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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
    status: Mapped[str] = mapped_column(sa.String(20))


class Other(Base):
    __tablename__ = "others"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    for eng in seeded_engine(pg_url, Base, "INSERT INTO tasks VALUES (1, 'done'), (2, 'done')"):
        with eng.begin() as conn:  # (as installing a trigger does)
            conn.exec_driver_sql(
                "DO $$ BEGIN CREATE ROLE resilient_db_bypass NOLOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
        yield eng


def test_a_session_bound_to_a_bypassed_connection_is_not_judged(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=Config(bulk_update="raise"))
    with engine.connect() as conn:
        rdb.bypass_transitions(conn, reason="ticket 21: reopen")
        with Sessions(bind=conn) as session:
            session.get_one(Task, 1).status = "pending"  # done -> pending: a repair
            session.flush()
            session.execute(sa.update(Task).where(Task.id == 2).values(status="running"))
            session.add(Task(id=3, status="done"))  # not an initial state
            session.flush()
        conn.commit()
        # the next transaction of the connection is guarded again
        with Sessions(bind=conn) as session:
            session.get_one(Task, 3).status = "pending"
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                session.flush()
        assert refused.value.via == "flush"
        conn.rollback()
    assert statuses_by_id(engine) == {1: "pending", 2: "running", 3: "done"}


def test_other_sessions_stay_guarded(engine: sa.Engine, service: str) -> None:
    """A session bound to the engine (its own transaction), and one bound to the bypassed
    connection with other binds (whose connections are not bypassed)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with engine.connect() as conn:
        rdb.bypass_transitions(conn, reason="ticket 22")
        with Sessions() as session:
            session.get_one(Task, 1).status = "pending"
            with pytest.raises(rdb.IllegalTransitionError):
                session.flush()
        with Sessions(bind=conn, binds={Other: engine}) as session:
            session.get_one(Task, 1).status = "pending"
            with pytest.raises(rdb.IllegalTransitionError):
                session.flush()
        conn.rollback()
    assert statuses_by_id(engine) == {1: "done", 2: "done"}


def test_a_session_bound_to_another_connection_stays_guarded(
    engine: sa.Engine, service: str
) -> None:
    """One connection bypassed; a session bound to another connection alone (its own
    transaction) is judged."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with engine.connect() as bypassed, engine.connect() as conn:
        rdb.bypass_transitions(bypassed, reason="ticket 23")
        with Sessions(bind=conn) as session:
            session.get_one(Task, 1).status = "pending"
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                session.flush()
        assert refused.value.via == "flush"
        conn.rollback()
        bypassed.rollback()
    assert statuses_by_id(engine) == {1: "done", 2: "done"}
