"""An ORM bulk UPDATE of a guarded status racing another transaction that moves one of its rows
between the guard's check and the UPDATE. The check locked only the rows it found blocked: a row
it found legal could be moved meanwhile into a state the UPDATE's added condition then left out,
silently, in both modes (``raise`` answered "done" for a statement it was to refuse, ``filter``
neither logged nor counted the row). The check now locks every row the statement's criteria
match, so the other transaction waits for this one, and the answer holds for the UPDATE. Real
server, real concurrent transactions (a thread), ordered by the server's row locks; sync
(psycopg) and async (asyncpg)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import waiting_on_task_update
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer
from resilient_db.transitions._report import transition_stats


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={
            "pending": {"in_progress"},
            "in_progress": {"completed", "pending"},
        },
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.insert(Task), [{"id": n, "status": "in_progress"} for n in (1, 2)])
    yield eng
    eng.dispose()


def with_criteria(session: Session) -> int:
    result: Any = session.execute(sa.update(Task).where(Task.id > 0).values(status="pending"))
    return int(result.rowcount)


def per_parameter_set(session: Session) -> int:
    result: Any = session.execute(
        sa.update(Task)
        .where(Task.id == sa.bindparam("tid"))
        .values(status="pending")
        .execution_options(dml_strategy="orm"),
        [{"tid": 1}, {"tid": 2}],
    )
    return int(result.rowcount)


def mover_before_the_update(
    mover: threading.Thread, engine: sa.Engine, seen: dict[str, bool]
) -> Callable[..., None]:
    """A ``before_cursor_execute`` listener: just before the bulk UPDATE is sent (its check
    done), start ``mover`` and wait until it waits for a row lock (or ended); ``seen`` records
    whether it was still waiting then."""

    def before_update(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("UPDATE tasks") and mover.ident is None:
            mover.start()
            wait_for(
                lambda: waiting_on_task_update(engine) == 1 or not mover.is_alive(),
                "the UPDATE waiting on the row lock",
            )
            seen["mover waited for the check's lock"] = mover.is_alive()

    return before_update


@pytest.mark.parametrize("mode", ["raise", "filter"])
@pytest.mark.parametrize("unit", [with_criteria, per_parameter_set])
def test_a_row_moved_between_the_check_and_the_update_waits_for_it(
    engine: sa.Engine, service: str, mode: str, unit: Callable[[Session], int]
) -> None:
    """Both rows may go in_progress -> pending. Just before the UPDATE is sent (the check
    done), another transaction moves row 2 to completed (from where pending is illegal): it
    waits for the row lock the check took, so the UPDATE moves both rows as checked, and the
    other transaction's move comes after this one commits."""
    config = rdb.load_config(environ={}).replace(bulk_update=mode, max_retries=0)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    other = sa.create_engine(engine.url)  # the other transaction's, without the listener
    mover = threading.Thread(target=move_row_2, args=(other,))
    seen: dict[str, bool] = {}
    before_update = mover_before_the_update(mover, engine, seen)

    before = transition_stats()
    event.listen(engine, "before_cursor_execute", before_update)
    try:
        with Sessions() as session:
            updated = unit(session)
            statuses = list(session.scalars(sa.select(Task.status).order_by(Task.id)))
            session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", before_update)
        if mover.ident is not None:
            mover.join(timeout=60)
        other.dispose()
    assert seen == {"mover waited for the check's lock": True}
    assert (updated, statuses) == (2, ["pending", "pending"])
    after = transition_stats()
    assert after["bulk_rows_filtered"] == before["bulk_rows_filtered"]
    assert after["blocked_transitions"] == before["blocked_transitions"]
    with engine.connect() as conn:  # the other transaction's move, after this one's
        assert list(conn.scalars(sa.text("SELECT status FROM tasks ORDER BY id"))) == [
            "pending",
            "completed",
        ]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["raise", "filter"])
async def test_async_a_row_moved_between_the_check_and_the_update_waits_for_it(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str, mode: str
) -> None:
    """As above, through ``AsyncResilientSession`` on asyncpg (the listener runs in the
    session's greenlet, so the event loop waits with it: nothing else runs meanwhile)."""
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    config = rdb.load_config(environ={}).replace(bulk_update=mode, max_retries=0)
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=config)
    mover = threading.Thread(target=move_row_2, args=(engine,))
    seen: dict[str, bool] = {}
    before_update = mover_before_the_update(mover, engine, seen)

    event.listen(aengine.sync_engine, "before_cursor_execute", before_update)
    try:
        async with Sessions() as session:
            result: Any = await session.execute(
                sa.update(Task).where(Task.id > 0).values(status="pending")
            )
            updated = int(result.rowcount)
            statuses = list(await session.scalars(sa.select(Task.status).order_by(Task.id)))
            await session.commit()
    finally:
        event.remove(aengine.sync_engine, "before_cursor_execute", before_update)
        if mover.ident is not None:
            mover.join(timeout=60)
        await aengine.dispose()
    assert seen == {"mover waited for the check's lock": True}
    assert (updated, statuses) == (2, ["pending", "pending"])
    with engine.connect() as conn:
        assert list(conn.scalars(sa.text("SELECT status FROM tasks ORDER BY id"))) == [
            "pending",
            "completed",
        ]


def move_row_2(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET status = 'completed' WHERE id = 2")


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_rows_left_behind_are_still_refused_or_counted(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """Locking every matched row changes nothing of the answer without a race: row 2,
    completed, may not go back to pending."""
    move_row_2(engine)
    config = rdb.load_config(environ={}).replace(bulk_update=mode, max_retries=0)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    before = transition_stats()["bulk_rows_filtered"]
    with Sessions() as session:
        if mode == "raise":
            with pytest.raises(rdb.IllegalTransitionError) as info:
                with_criteria(session)
            err = info.value
            assert (err.pk, err.from_state, err.to_state) == (2, "completed", "pending")
            assert "1 matching row(s)" in err.reason
        else:
            assert with_criteria(session) == 1
            assert transition_stats()["bulk_rows_filtered"] == before + 1
        session.commit()
    with engine.connect() as conn:
        found = list(conn.scalars(sa.text("SELECT status FROM tasks ORDER BY id")))
    assert found == (["in_progress", "completed"] if mode == "raise" else ["pending", "completed"])
