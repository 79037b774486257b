"""ORM UPDATE statements that set a guarded status to a SQL expression, under each
``synchronize_session`` strategy, give what plain SQLAlchemy gives: the guard's legal condition
(which SQLAlchemy's Python evaluator can't evaluate) made ``"evaluate"`` fail with
``Could not evaluate current criteria in Python`` where the statement without it ran. Plain
``sessionmaker`` on the same server is the oracle; sync (psycopg) and async (asyncpg)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import resilient_db as rdb
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"in_progress"}, "in_progress": {"completed"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


def reset(engine: sa.Engine, *statuses: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM tasks")
        for n, status in enumerate(statuses, start=1):
            conn.exec_driver_sql(f"INSERT INTO tasks (id, status) VALUES ({n}, '{status}')")


def stored(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT status FROM tasks ORDER BY id")))


#: new states as SQL expressions: a function of a literal, a CASE over the row, the column itself
EXPRESSIONS: dict[str, Callable[[], Any]] = {
    "function": lambda: sa.func.lower("IN_PROGRESS"),
    "case": lambda: sa.case((Task.id == 1, "in_progress"), else_=Task.status),
    "no-op": lambda: Task.status,
}


@pytest.mark.parametrize("strategy", ["evaluate", "fetch", "auto", False])
@pytest.mark.parametrize("expression", list(EXPRESSIONS))
def test_a_status_set_to_an_expression_synchronizes_as_plain_sqlalchemy(
    engine: sa.Engine, service: str, strategy: Any, expression: str
) -> None:
    seen = {}
    for label, maker in (
        ("plain", sessionmaker(engine)),
        ("resilient", rdb.ResilientSession(engine, service=service)),
    ):
        reset(engine, "pending")
        with maker.begin() as session:
            task = session.get_one(Task, 1)
            statement = sa.update(Task).where(Task.id == 1).values(status=EXPRESSIONS[expression]())
            session.execute(statement.execution_options(synchronize_session=strategy))
            status = task.status
        seen[label] = (status, stored(engine))
    assert seen["resilient"] == seen["plain"]


def test_an_illegal_move_to_an_expression_under_evaluate_is_filtered(
    engine: sa.Engine, service: str
) -> None:
    """completed -> in_progress is illegal: the row is left out, the legal one moves."""
    reset(engine, "pending", "completed")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions.begin() as session:
        session.execute(
            sa.update(Task)
            .values(status=sa.func.lower("IN_PROGRESS"))
            .execution_options(synchronize_session="evaluate")
        )
    assert stored(engine) == ["in_progress", "completed"]


@pytest.mark.parametrize("strategy", ["evaluate", "auto", False])
def test_an_executemany_update_to_an_expression_runs_as_plain_sqlalchemy(
    engine: sa.Engine, service: str, strategy: Any
) -> None:
    """One statement run per parameter set (``dml_strategy="orm"``): "fetch", what "auto"
    falls back to, takes no parameter sets; the session's objects are left as plain
    SQLAlchemy leaves them."""
    seen = {}
    for label, maker in (
        ("plain", sessionmaker(engine)),
        ("resilient", rdb.ResilientSession(engine, service=service)),
    ):
        reset(engine, "pending", "pending")
        with maker.begin() as session:
            task = session.get_one(Task, 1)
            session.execute(
                sa.update(Task)
                .where(Task.id == sa.bindparam("tid"))
                .values(status=sa.func.lower(sa.bindparam("st")))
                .execution_options(synchronize_session=strategy, dml_strategy="orm"),
                [{"tid": 1, "st": "IN_PROGRESS"}, {"tid": 2, "st": "IN_PROGRESS"}],
            )
            status = task.status
        seen[label] = (status, stored(engine))
    assert seen["resilient"] == seen["plain"]
    assert seen["plain"][1] == ["in_progress", "in_progress"]


@pytest.mark.asyncio
async def test_async_a_status_set_to_an_expression_under_evaluate(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    try:
        seen = {}
        for label, maker in (
            ("plain", async_sessionmaker(aengine)),
            ("resilient", rdb.AsyncResilientSession(aengine, service=service)),
        ):
            reset(engine, "pending")
            async with maker.begin() as session:
                task = await session.get_one(Task, 1)
                await session.execute(
                    sa.update(Task)
                    .where(Task.id == 1)
                    .values(status=sa.func.lower("IN_PROGRESS"))
                    .execution_options(synchronize_session="evaluate")
                )
                await session.refresh(task, ["status"])  # (plain expires it: no lazy load)
                status = task.status
            seen[label] = (status, stored(engine))
        assert seen["resilient"] == seen["plain"] == ("in_progress", ["in_progress"])
    finally:
        await aengine.dispose()
