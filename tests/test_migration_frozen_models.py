"""The pattern docs/transition-guard.md gives for the transition trigger in an Alembic history: each
migration that installs it declares the trigger frozen as at that revision (a
``rdb.transitions.TransitionTrigger``: table, key, column, rules) and never imports the
application's model, whose rules and columns when the migration runs may be later ones. Loaded
into the application's process (by an upgrade run there), the migrations' descriptions are never
used to map the trigger's error back: the application's model is, and says when the installed
rules differ from its own.

A temporary Alembic project with two revisions: 0001 creates ``jobs`` with ``status`` and
installs its rules; 0002 renames the column to ``state`` and installs other rules (its downgrade
renames it back and installs 0001's rules again). Meanwhile the application's model, imported
in this process (and by the project's ``env.py``, for autogenerate), has the new column and
rules of its own, not migrated yet. Alembic runs for real, in this process, on a fresh database.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc

import resilient_db as rdb

APP = "frozen_models_app"

# The application's model today: the column is `state` (as 0002 left it) and the rules have
# moved on since 0002 (`held` is new), with no migration for that yet.
APP_SOURCE = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    __transitions__ = rdb.TransitionRules(
        column="state",
        transitions={"queued": {"running", "held"}, "held": {"queued"}, "running": {"done"}},
        initial={"queued"},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(20), server_default="queued")
"""

ENV_SOURCE = f"""
from alembic import context

from {APP} import Base

context.configure(
    connection=context.config.attributes["connection"], target_metadata=Base.metadata
)
with context.begin_transaction():
    context.run_migrations()
"""

REVISION_1 = '''
"""jobs, with the transition trigger on jobs.status

Revision ID: 0001_jobs
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import resilient_db as rdb

revision = "0001_jobs"
down_revision = None
branch_labels = None
depends_on = None

JOBS = rdb.transitions.TransitionTrigger(  # the trigger of jobs as at this revision
    model="Job",
    table="jobs",
    primary_key="id",
    type_=sa.String(20),
    rules=rdb.TransitionRules(
        column="status",
        transitions={"queued": {"running", "cancelled"}, "running": {"done"}},
        initial={"queued"},
    ),
)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(20), nullable=False, server_default="queued"),
    )
    rdb.install_transition_trigger(op, JOBS)


def downgrade() -> None:
    rdb.uninstall_transition_trigger(op, JOBS)
    op.drop_table("jobs")
'''

REVISION_2 = '''
"""jobs.status renamed to state, with new rules

Revision ID: 0002_jobs_state
Revises: 0001_jobs
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import resilient_db as rdb

revision = "0002_jobs_state"
down_revision = "0001_jobs"
branch_labels = None
depends_on = None

JOBS = rdb.transitions.TransitionTrigger(  # the trigger of jobs as at this revision
    model="Job",
    table="jobs",
    primary_key="id",
    type_=sa.String(20),
    rules=rdb.TransitionRules(
        column="state",
        transitions={"queued": {"running"}, "running": {"done", "queued"}},
        initial={"queued"},
    ),
)
JOBS_BEFORE = rdb.transitions.TransitionTrigger(  # as at 0001, which downgrade() restores
    model="Job",
    table="jobs",
    primary_key="id",
    type_=sa.String(20),
    rules=rdb.TransitionRules(
        column="status",
        transitions={"queued": {"running", "cancelled"}, "running": {"done"}},
        initial={"queued"},
    ),
)


def upgrade() -> None:
    op.alter_column("jobs", "status", new_column_name="state")
    # installs the trigger of `state`, and drops ours of `status`, a column the table lost
    rdb.install_transition_trigger(op, JOBS)


def downgrade() -> None:
    op.alter_column("jobs", "state", new_column_name="status")
    rdb.install_transition_trigger(op, JOBS_BEFORE)
'''


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The application's models, imported in this process."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / f"{APP}.py").write_text(APP_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "app"))
    try:
        yield importlib.import_module(APP)
    finally:
        sys.modules.pop(APP, None)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The Alembic project: env.py and the two revisions."""
    root = tmp_path / "migrations"
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(ENV_SOURCE)
    (root / "versions" / "0001_jobs.py").write_text(textwrap.dedent(REVISION_1).lstrip())
    (root / "versions" / "0002_jobs_state.py").write_text(textwrap.dedent(REVISION_2).lstrip())
    return root


def migrate(engine: sa.Engine, project: Path, action: str, revision: str) -> None:
    """``alembic upgrade|downgrade <revision>`` of ``project``, in one transaction."""
    cfg = Config()
    cfg.set_main_option("script_location", str(project))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        step = command.upgrade if action == "upgrade" else command.downgrade
        step(cfg, revision)


def frozen(project: Path, revision: str) -> Any:
    """The module of ``revision``, as Alembic loads it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(project))
    script = ScriptDirectory.from_config(cfg).get_revision(revision)
    assert script is not None
    return script.module


def columns(engine: sa.Engine) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns("jobs")}


def ours(engine: sa.Engine) -> tuple[list[str], list[str]]:
    """Our trigger functions in the database, and our triggers."""
    with engine.connect() as conn:
        functions = conn.execute(
            sa.text("SELECT proname::text FROM pg_proc WHERE proname LIKE 'rdb_transition%'")
        ).scalars()
        triggers = conn.execute(
            sa.text(
                "SELECT tgname::text FROM pg_trigger WHERE tgname LIKE 'rdb_transition%' "
                "ORDER BY tgname"
            )
        ).scalars()
        return list(functions), list(triggers)


def refused(engine: sa.Engine, statement: str) -> None:
    """``statement`` (raw SQL) is refused by the transition trigger."""
    with pytest.raises(sa_exc.DBAPIError) as info, engine.begin() as conn:
        conn.exec_driver_sql(statement)
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE, statement


def run(engine: sa.Engine, statement: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)


def test_each_revision_installs_its_own_rules_up_and_down(
    pg_url: str, app: ModuleType, project: Path
) -> None:
    engine = sa.create_engine(pg_url)
    try:
        # the application's models are configured first, as in a process that migrates at
        # startup: what the migrations declare is loaded after them
        sa.orm.configure_mappers()
        migrate(engine, project, "upgrade", "head")  # on a fresh database, every step replayed
        assert {"state"} <= columns(engine)
        assert "status" not in columns(engine)
        functions, triggers = ours(engine)
        assert len(functions) == 1
        assert triggers == ["rdb_transition_state_ins", "rdb_transition_state_upd"]
        at_2 = frozen(project, "0002_jobs_state")
        with engine.connect() as conn:
            assert rdb.trigger_drift(conn, at_2.JOBS) is None
            # the application's newer rules are not installed: that takes a migration of its own
            drift = rdb.trigger_drift(conn, app.Job)
        assert drift is not None
        assert "installed function stamp" in drift
        # 0002's rules are enforced: running -> queued is legal (not in 0001's, nor the app's)
        run(engine, "INSERT INTO jobs (id) VALUES (1)")
        run(engine, "UPDATE jobs SET state = 'running' WHERE id = 1")
        run(engine, "UPDATE jobs SET state = 'queued' WHERE id = 1")
        refused(engine, "UPDATE jobs SET state = 'cancelled' WHERE id = 1")  # 0001's move
        refused(engine, "UPDATE jobs SET state = 'held' WHERE id = 1")  # the application's
        refused(engine, "INSERT INTO jobs (id, state) VALUES (2, 'running')")

        # the application's session maps the trigger's error back (an engine of its own:
        # the factory's hooks map the errors of its engine), with the application's rules:
        # the migrations' descriptions, loaded into this process, are never looked up
        resilient = sa.create_engine(pg_url)
        try:
            sessions = rdb.ResilientSession(resilient, service="frozen-models")
            with pytest.raises(rdb.IllegalTransitionError) as info, sessions.begin() as session:
                session.execute(sa.text("UPDATE jobs SET state = 'done' WHERE id = 1"))
            # queued -> held: legal for the application's model, not in 0002's rules
            with pytest.raises(rdb.IllegalTransitionError) as held, sessions.begin() as session:
                session.execute(sa.text("UPDATE jobs SET state = 'held' WHERE id = 1"))
        finally:
            resilient.dispose()
        err = info.value
        assert (err.column, err.from_state, err.to_state, err.via) == (
            "state",
            "queued",
            "done",
            "db",
        )
        assert (err.model, err.pk) == ("Job", 1)
        assert "differ" not in str(err)
        assert (held.value.from_state, held.value.to_state) == ("queued", "held")
        assert "whose rules differ from those declared on the model" in str(held.value)

        migrate(engine, project, "downgrade", "0001_jobs")
        assert {"status"} <= columns(engine)
        assert "state" not in columns(engine)
        functions, triggers = ours(engine)
        assert len(functions) == 1
        assert triggers == ["rdb_transition_status_ins", "rdb_transition_status_upd"]
        at_1 = frozen(project, "0001_jobs")
        with engine.connect() as conn:
            assert rdb.trigger_drift(conn, at_1.JOBS) is None
        # 0001's rules are back, on status: running -> queued is refused again
        run(engine, "UPDATE jobs SET status = 'running' WHERE id = 1")
        refused(engine, "UPDATE jobs SET status = 'queued' WHERE id = 1")
        run(engine, "INSERT INTO jobs (id) VALUES (2)")
        run(engine, "UPDATE jobs SET status = 'cancelled' WHERE id = 2")

        migrate(engine, project, "downgrade", "base")
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
        assert ours(engine) == ([], [])

        migrate(engine, project, "upgrade", "head")  # and up again
        with engine.connect() as conn:
            assert rdb.trigger_drift(conn, at_2.JOBS) is None
    finally:
        engine.dispose()
