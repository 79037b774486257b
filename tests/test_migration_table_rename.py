"""Renaming a guarded table in a migration, as docs/transition-guard.md says to: the triggers follow
the table (PostgreSQL keeps them on it) and go on judging writes, but their function is named for
the old table, so their errors are not ours to the application (a plain database error, SQLSTATE
RDB01) and ``trigger_drift`` of the renamed table says so; installing the trigger of the new name
in the same migration replaces them and drops the old function, and the downgrade, renaming the
table back, installs the old one again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb

RULES = rdb.TransitionRules(
    column="status",
    transitions={"queued": {"running"}, "running": {"done"}},
    initial={"queued"},
)
TASKS = rdb.TransitionTrigger(
    model="Job", table="tasks", primary_key="id", type_=sa.String(20), rules=RULES
)
JOBS = rdb.TransitionTrigger(
    model="Job", table="jobs", primary_key="id", type_=sa.String(20), rules=RULES
)


class Base(DeclarativeBase):
    pass


class Job(Base):
    """The application's model once the table is renamed."""

    __tablename__ = "jobs"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), server_default="queued")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def migrate(engine: sa.Engine, *steps: str) -> None:
    """The steps of a migration, in one transaction, through Alembic's ``op``."""
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        for step in steps:
            if step == "create":
                op.create_table(
                    "tasks",
                    sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("status", sa.String(20), server_default="queued"),
                )
            elif step == "rename":
                op.rename_table("tasks", "jobs")
            elif step == "rename back":
                op.rename_table("jobs", "tasks")
            else:
                rdb.install_transition_trigger(op, {"tasks": TASKS, "jobs": JOBS}[step])


def functions(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT proname::text FROM pg_proc WHERE proname LIKE 'rdb_transition%'")
            ).scalars()
        )


def blocked(engine: sa.Engine, table: str) -> BaseException:
    """What the application's factory raises for an illegal move of row 1 in raw SQL."""
    sessions = rdb.ResilientSession(engine, service="table-rename")
    refused = (sa_exc.DBAPIError, rdb.IllegalTransitionError)
    with pytest.raises(refused) as info, sessions.begin() as session:
        session.execute(sa.text(f"UPDATE {table} SET status = 'done' WHERE id = 1"))
    if isinstance(info.value, sa_exc.DBAPIError):
        assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE
    return info.value


def test_a_renamed_table_keeps_its_trigger_and_a_new_install_makes_it_ours(
    engine: sa.Engine,
) -> None:
    migrate(engine, "create", "tasks")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks (id) VALUES (1)")
    (old,) = functions(engine)

    migrate(engine, "rename")  # the table alone: its triggers follow it, still judging
    sa.orm.configure_mappers()
    assert not isinstance(blocked(engine, "jobs"), rdb.IllegalTransitionError)
    with engine.connect() as conn:
        drift = rdb.trigger_drift(conn, Job)
        assert rdb.trigger_drift(conn, JOBS) == drift
    assert drift is not None
    assert f"calls {old}()" in drift

    # the step as docs/transition-guard.md writes it: install the new name's
    migrate(engine, "jobs")
    (new,) = functions(engine)
    assert new != old
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Job) is None
    err = blocked(engine, "jobs")
    assert isinstance(err, rdb.IllegalTransitionError)
    assert (err.model, err.pk, err.from_state, err.to_state, err.via) == (
        "Job",
        1,
        "queued",
        "done",
        "db",
    )

    migrate(engine, "rename back", "tasks")  # its downgrade
    assert functions(engine) == [old]
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, TASKS) is None
    assert isinstance(blocked(engine, "tasks"), rdb.IllegalTransitionError)
