"""A row that the flush's own transaction moved since it was loaded, by a statement of its own
outside the unit of work: ``bulk_save_objects`` of the loaded object (which writes it and leaves
its change pending, so the flush writes it again, as plain SQLAlchemy does), a Core or text
UPDATE. The compare-and-set found the row no longer in the state it was loaded in and raised
StaleTransitionError ("the row now holds 'running'"; with `bulk_save_objects`, "changed by
another transaction meanwhile"), refusing a legal move that plain SQLAlchemy saves. No other
transaction can have touched such a row (this one holds its lock), so the move is judged from
the state the row holds: saved when legal, IllegalTransitionError when not. A row another
transaction moved is still stale. Real server, real concurrent transactions, both drivers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running", "cancelled"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(40))
    title: Mapped[str] = mapped_column(sa.String(40), default="")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    rdb.install_transition_trigger(eng, Task)
    with eng.begin() as conn:
        conn.execute(sa.insert(Task), [{"id": n, "status": "pending"} for n in (1, 2)])
    yield eng
    eng.dispose()


def stored(engine: sa.Engine) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT * FROM tasks ORDER BY id"))]


MOVE_1 = "UPDATE tasks SET status = 'running' WHERE id = 1"


def test_bulk_save_objects_of_a_loaded_object_then_commit(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Session) -> None:
        task = session.get(Task, 1)
        assert task is not None
        task.status, task.title = "running", "bulk"
        session.bulk_save_objects([task])

    Sessions.run(unit)
    with Sessions.begin() as session:  # the drop-in form, on row 2
        task = session.get(Task, 2)
        assert task is not None
        task.status = "running"
        session.bulk_save_objects([task])
    assert stored(engine) == [(1, "running", "bulk"), (2, "running", "")]


def test_moved_by_a_text_update_then_the_flush_writes_every_column(
    engine: sa.Engine, service: str
) -> None:
    """The flush's UPDATE is sent again, comparing with the state the row holds: the title it
    carries is written too (a compare-and-set that matched nothing would have lost it)."""
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Session) -> None:
        task = session.get(Task, 1)
        assert task is not None
        session.execute(sa.text(MOVE_1))
        task.status, task.title = "running", "after"

    Sessions.run(unit)
    assert stored(engine)[0] == (1, "running", "after")


def test_moved_here_to_a_state_the_move_is_illegal_from(engine: sa.Engine, service: str) -> None:
    """Loaded 'pending', moved to 'running' by this transaction, then set to 'cancelled' (legal
    from 'pending', not from 'running'): judged from the state the row holds."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        task = session.get(Task, 1)
        assert task is not None
        session.execute(sa.text(MOVE_1))
        task.status = "cancelled"
        with pytest.raises(rdb.IllegalTransitionError) as illegal:
            session.commit()
        assert not isinstance(illegal.value, rdb.StaleTransitionError)
        err = illegal.value
        assert (err.pk, err.from_state, err.to_state, err.via) == (1, "running", "cancelled", "flush")
    assert stored(engine)[0] == (1, "pending", "")


def test_a_row_another_transaction_moved_is_still_stale(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        task = session.get(Task, 1)
        assert task is not None
        with engine.begin() as other:
            other.execute(sa.text(MOVE_1))
        task.status = "running"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    assert "now holds 'running'" in stale.value.reason


def test_the_locked_check_path_judges_it_the_same(engine: sa.Engine, service: str) -> None:
    """With ``schema_translate_map`` the SQL sent is not the compiled one: the rows are checked
    under lock before the UPDATE instead of by its row count. A row this transaction moved is
    judged from the state it holds there too; one another transaction moved is stale."""
    translated = engine.execution_options(schema_translate_map={None: "public"})
    Sessions = rdb.ResilientSession(translated, service=service)
    with Sessions.begin() as session:
        task = session.get(Task, 1)
        assert task is not None
        session.execute(sa.text(MOVE_1))
        task.status, task.title = "running", "locked"
    assert stored(engine)[0] == (1, "running", "locked")
    with Sessions() as session:
        task = session.get(Task, 2)
        assert task is not None
        with engine.begin() as other:
            other.execute(sa.text("UPDATE tasks SET status = 'running' WHERE id = 2"))
        task.status = "cancelled"
        with pytest.raises(rdb.StaleTransitionError):
            session.commit()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_moved_here_is_saved(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str, driver: str
) -> None:
    aengine = create_async_engine(pg_server.url(pg_database, driver=driver))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)

        async def unit(session: AsyncSession) -> None:
            task = await session.get(Task, 1)
            assert task is not None
            await session.execute(sa.text(MOVE_1))
            task.status, task.title = "running", driver

        await Sessions.run(unit)

        async def bulk(session: AsyncSession) -> None:
            task = await session.get(Task, 2)
            assert task is not None
            task.status = "running"
            await session.run_sync(lambda s: s.bulk_save_objects([task]))

        await Sessions.run(bulk)
        assert stored(engine) == [(1, "running", driver), (2, "running", "")]
    finally:
        await aengine.dispose()
