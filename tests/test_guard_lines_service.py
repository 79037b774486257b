"""The transition guard's lines name the service of the session they happened on: drop-in use
too, not only a unit. A block in a drop-in ``Session.begin()`` (by the flush guard, the database
trigger or a bulk UPDATE's filter) and the audited bypass line said no ``service=``, so a
process with several services could not tell which one blocked or bypassed. The events keep
``service`` None (the guard's series is process-wide) and carry the service as
``unit_service``. Real server, real trigger."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"pending": {"done"}}, initial={"pending"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks VALUES (1, 'done'), (2, 'done')")
    rdb.install_transition_trigger(eng, Task)
    yield eng
    eng.dispose()


def test_drop_in_blocks_and_the_bypass_name_the_service(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with pytest.raises(rdb.IllegalTransitionError), Sessions.begin() as session:
        session.get_one(Task, 1).status = "pending"  # the flush guard
    with pytest.raises(rdb.IllegalTransitionError), Sessions.begin() as session:
        session.execute(sa.text("UPDATE tasks SET status = 'pending' WHERE id = 1"))  # trigger
    with Sessions.begin() as session:  # the bulk UPDATE's filter (default mode)
        session.execute(sa.update(Task).where(Task.id == 2).values(status="pending"))
    with Sessions.begin() as session:
        rdb.bypass_transitions(session, reason="repair 7")
    blocked = [e for e in events if e.name == "transition_blocked"]
    assert [e.fields["via"] for e in blocked] == ["flush", "db", "orm-update"]
    bypassed = [e for e in events if e.name == "transition_guard_bypassed"]
    for event in (*blocked, *bypassed):
        assert event.service is None
        assert event.fields["service"] is None  # (every event has the field)
        assert event.fields["unit_service"] == service
        assert f"service={service} " in event.message
